"""The trainer: `pretrain` and `finetune` over any layout (see `engine.training.loop`)."""

from engine.training.loop import TrainResult, finetune, pretrain

__all__ = ["TrainResult", "finetune", "pretrain"]
