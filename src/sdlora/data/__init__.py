"""The data stage: ingest photos, download public links, captions, the dataset contract."""
