"""`LoraConfig`: which projections get low-rank adapters, their rank, scale and dropout
(the ``--lora-*`` flags), in the engine's projection names or HF / PEFT's module names."""

from __future__ import annotations

from dataclasses import dataclass

ENGINE_TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "out": ("out",),
    "gate_up": ("gate", "up"),
    "down": ("down",),
}
"""The engine's projections -> the blocks (HF modules, by canonical name) each one holds."""

HF_ALIASES: dict[str, str] = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "out",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
"""HF / PEFT module names -> the one block each names (``q_proj``: only Q of Q|K|V)."""


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters as PEFT's ``LoraConfig`` defines them: ``y = W x + B A dropout(x) *
    alpha / rank`` for every targeted HF module."""

    rank: int = 8
    """The adapters' rank ``r`` (``--lora-rank``): A is ``[r, in]``, B ``[out, r]``."""
    alpha: float = 16.0
    """The update is scaled by ``alpha / rank`` (``--lora-alpha``), as PEFT's ``lora_alpha``."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (``--lora-dropout``)."""
    target_modules: tuple[str, ...] = ("qkv", "out", "gate_up", "down")
    """The projections that get adapters (``--lora-target-modules``): the engine's ``qkv``,
    ``out``, ``gate_up``, ``down`` (every block of a fused one), or HF's ``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` (that block
    alone)."""

    @property
    def scaling(self) -> float:
        """``alpha / rank``, what the update ``B A x`` is multiplied by."""
        return self.alpha / self.rank

    def blocks(self) -> frozenset[str]:
        """The canonical blocks with an adapter (``q``, ``k``, ``v``, ``out``, ``gate``,
        ``up``, ``down``); ValueError naming the problems when the config has any."""
        errors = self.errors()
        if errors:
            raise ValueError("; ".join(errors))
        blocks: set[str] = set()
        for name in self.target_modules:
            blocks.update(ENGINE_TARGETS.get(name) or (HF_ALIASES[name],))
        return frozenset(blocks)

    def errors(self) -> list[str]:
        """What is wrong with the rank, alpha, dropout and target modules, by flag."""
        errors = []
        if self.rank < 1:
            errors.append(f"--lora-rank {self.rank} must be at least 1")
        if self.alpha <= 0:
            errors.append(f"--lora-alpha {self.alpha} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"--lora-dropout {self.dropout} must be in [0, 1)")
        if not self.target_modules:
            errors.append("--lora-target-modules is empty: name at least one projection")
        known = (*ENGINE_TARGETS, *HF_ALIASES)
        unknown = [name for name in self.target_modules if name not in known]
        if unknown:
            errors.append(
                f"--lora-target-modules {', '.join(unknown)}: not a projection (one of "
                f"{', '.join(known)})"
            )
        return errors
