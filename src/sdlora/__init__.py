"""sdlora: photos of one object in, a tested Stable Diffusion LoRA out."""

__version__ = "0.1.0"
