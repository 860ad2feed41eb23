"""Training systems, data, callbacks and Hydra entry points: the only package that imports lightning, hydra, wandb."""
