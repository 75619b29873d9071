"""Loss scaling for fp16: multiply the loss before backward so small gradients stay
representable, divide the gradients by the same scale before the step.

Dynamic scaling (Megatron's): start high (``--initial-loss-scale``); when a step's gradients
hold an inf/nan, the step is skipped, and after ``hysteresis`` such steps the scale halves
(never below ``--min-loss-scale``); after ``--loss-scale-window`` clean steps in a row it
doubles again. bf16 and fp32 need no scaling (bf16 has fp32's exponent range).
"""

from __future__ import annotations

from typing import Any


class ConstantGradScaler:
    """A fixed loss scale (``--loss-scale``)."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        """A constant scale ignores overflows (the step is still skipped)."""

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])


class DynamicGradScaler:
    """The dynamic loss scale (see the module docstring).

    Args:
        initial_scale: first scale (Megatron's default 2^32).
        min_scale: lower bound.
        growth_factor / backoff_factor: multiply by these on growth / overflow (2, 0.5).
        growth_interval: clean steps before growing (``--loss-scale-window``).
        hysteresis: overflowing steps tolerated before backing off.
    """

    def __init__(
        self,
        initial_scale: float,
        min_scale: float = 1.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
    ):
        if not (initial_scale > 0 and min_scale > 0 and growth_factor > 1):
            raise ValueError(
                f"need --initial-loss-scale ({initial_scale}) > 0, --min-loss-scale "
                f"({min_scale}) > 0 and growth factor ({growth_factor}) > 1"
            )
        if not 0 < backoff_factor < 1 or growth_interval < 1 or hysteresis < 1:
            raise ValueError(
                f"need 0 < backoff factor ({backoff_factor}) < 1, --loss-scale-window "
                f"({growth_interval}) >= 1 and --hysteresis ({hysteresis}) >= 1"
            )
        self.scale = float(initial_scale)
        self.min_scale, self.growth_factor, self.backoff_factor = (
            min_scale,
            growth_factor,
            backoff_factor,
        )
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker = 0  # clean steps since the last overflow
        self.hysteresis_tracker = hysteresis  # overflows left before backing off

    def update(self, found_inf: bool) -> None:
        """Account for one step whose gradients did (or did not) overflow."""
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
