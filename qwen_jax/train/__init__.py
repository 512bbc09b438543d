"""Training: the optimizer and schedule, sharded train/eval steps, the run loop behind
`train.py`, train-state checkpoints, metrics, FLOP accounting and the compile-only checks."""
