"""Sharing a run: its model card (card.py) and its upload to the Hugging Face Hub (push.py).

The card is written into every run folder as README.md whenever the report is refreshed, so a run
that is never pushed still says what it is, how it was trained and how to load it; `sdlora push`
stages the files a user shares (the LoRA for each loader, the token's embedding, a few samples and
the card) in runs/<name>/hub/ and uploads that folder as one commit.
"""

from sdlora.publish.card import build_card, write_run_card
from sdlora.publish.push import push_run, stage_hub_folder

__all__ = ["build_card", "write_run_card", "push_run", "stage_hub_folder"]
