"""Saving and loading: `CheckpointConfig` (Megatron's checkpoint flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """Saving and loading (Megatron's checkpoint flags)."""

    save: str | None = None
    """Directory to save checkpoints in (``--save``)."""
    load: str | None = None
    """Directory to load the latest checkpoint from (``--load``)."""
    pretrained_checkpoint: str | None = None
    """The frozen base of a LoRA run (``--pretrained-checkpoint``, Megatron-Bridge's name):
    its weights are loaded first; ``--load`` / ``--save`` then hold the adapters only."""
    load_peft_adapter: str | None = None
    """A PEFT LoRA adapter directory to start a LoRA run's adapters from
    (``--load-peft-adapter``), when ``--load`` holds no checkpoint yet."""
    save_interval: int | None = None
    """Save every this many steps (``--save-interval``); needs ``save``."""
    keep_last_n: int | None = None
    """Keep only the newest n checkpoints, deleting older ones once a new one is complete
    (``--keep-last-n``); None keeps all."""
    finetune: bool = False
    """Load model weights only; start at iteration 0 with fresh optimizer, RNG and data
    position (``--finetune``)."""
    no_load_optim: bool = False
    """Do not load the optimizer state (``--no-load-optim``)."""
    no_load_rng: bool = False
    """Do not load the RNG states (``--no-load-rng``)."""
    no_save_optim: bool = False
    """Do not save the optimizer state (``--no-save-optim``)."""
    no_save_rng: bool = False
    """Do not save the RNG states (``--no-save-rng``)."""
    async_save: bool = False
    """Write checkpoints in the background (``--async-save``): training stalls only while the
    state is copied to host memory, a thread per rank writes the files, and the checkpoint is
    published (``latest`` updated) once every rank has written it; needs ``save``."""

    def errors(self) -> list[str]:
        """Save / load options that need a directory, and the counts."""
        errors = []
        if self.save_interval is not None:
            if self.save is None:
                errors.append(f"--save-interval ({self.save_interval}) needs --save")
            if self.save_interval < 1:
                errors.append(f"--save-interval must be positive, got {self.save_interval}")
        if self.keep_last_n is not None:
            if self.save is None:
                errors.append(f"--keep-last-n ({self.keep_last_n}) needs --save")
            if self.keep_last_n < 1:
                errors.append(f"--keep-last-n must be at least 1, got {self.keep_last_n}")
        if self.async_save and self.save is None:
            errors.append("--async-save needs --save")
        if self.finetune and self.load is None:
            errors.append("--finetune needs --load (the checkpoint to start from)")
        return errors
