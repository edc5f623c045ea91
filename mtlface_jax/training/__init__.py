"""Training: optimizers, state, jitted steps, checkpoints, metric writers, the loop."""
