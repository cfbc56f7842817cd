"""Training: data order, the loop, checkpoints, export and logging."""
