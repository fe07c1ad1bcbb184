"""Training: the trainer (AMP, DDP, resumable), the expanding phase's loop, the demo ancestry's recipe."""
