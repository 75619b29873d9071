"""The trainer: `pretrain` and `finetune` over any layout (see `engine.training.loop`)."""

from engine.training.loop import Providers, TrainResult, finetune, pretrain

__all__ = ["Providers", "TrainResult", "finetune", "pretrain"]
