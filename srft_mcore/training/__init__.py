"""Training: the SRFT loop (trainer), micro-batches, checkpoints, a rank's lifecycle, metrics and plots."""
