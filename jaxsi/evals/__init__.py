"""Evaluation: decoding held-out prompts and scoring them."""
