"""Training: the loop, its losses and monitoring, and LoRA export (diffusers and kohya formats)."""
