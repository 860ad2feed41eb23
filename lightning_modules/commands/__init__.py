"""The ``ctrlkit`` commands (train, generate, evaluate, extract, pretrain-base), their CLI and config checks."""
