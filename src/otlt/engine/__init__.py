"""Training engine: trainer, checkpoints, logging, distributed helpers."""
