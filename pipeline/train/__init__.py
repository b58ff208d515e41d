"""Train: the trainer loop, optimizers and schedules, precision, checkpoints, the training config, and the
process layout of a run (ranks, devices, locks)."""
