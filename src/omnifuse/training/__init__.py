"""Training: data, collation, losses, stages, loop."""
