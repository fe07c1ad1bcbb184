"""Training: data sets and the trainer (AMP, DDP, resumable)."""
