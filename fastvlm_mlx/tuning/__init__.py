"""Fine-tuning FastVLM on mlx-lm's tuner: ``data`` reads and tokenizes the JSONL folder, ``trainer`` gives mlx-lm's
``train`` the batches, the loss and the image-feature cache; ``fastvlm_mlx.lora`` is the command."""

from .data import Example, load_splits, tokenize
from .trainer import FeatureStore, make_loss, make_trainable

__all__ = ["Example", "FeatureStore", "load_splits", "make_loss", "make_trainable", "tokenize"]
