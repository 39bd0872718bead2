"""Scoring generated images against the real photos: DINO, CLIP-I, CLIP-T (DreamBooth paper)."""

from sdlora.evaluate.score import dino_similarity_to_val, pairwise_mean, remove_token, score_run

__all__ = ["dino_similarity_to_val", "pairwise_mean", "remove_token", "score_run"]
