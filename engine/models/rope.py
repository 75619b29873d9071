"""Rope scaling as `transformers` defines it: the "linear", "llama3" and "yarn" rope types.

`inverse_frequencies` gives the rotary inverse frequencies ``[head_dim/2]`` and the attention
scaling that multiplies cos and sin, with transformers' semantics (its ``ROPE_INIT_FUNCTIONS``)
down to the defaults and fallbacks; `rope_scaling_from_hf` / `rope_scaling_to_hf` read and write
the ``config.json`` entry (transformers 5's ``rope_parameters``, 4.x's ``rope_scaling``), and
`rope_scaling_from_dict` reads the ``dataclasses.asdict`` form kept in checkpoint metadata.

The three types (head dimension pair i has inverse frequency f_i = base^(-2i/head_dim) and
wavelength 2*pi/f_i; L is ``original_max_position_embeddings``, s the ``factor``):

- linear: every f_i / s (positions interpolated s times);
- llama3: wavelengths above L / low_freq_factor get f_i / s, below L / high_freq_factor keep
  f_i, and in between blend the two by how many turns the pair makes over L;
- yarn: pairs making more than ``beta_fast`` turns over L keep f_i, fewer than ``beta_slow``
  get f_i / s, a linear ramp over the dimensions in between; cos and sin are then scaled by
  0.1 ln(s) + 1 (the paper's attention temperature) unless ``attention_factor`` is given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

ROPE_TYPES: tuple[str, ...] = ("linear", "llama3", "yarn")
"""The rope types the engine computes (transformers' ``rope_type`` names); "default" (plain
RoPE) is ``scaling=None``."""

_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    # The optional fields each type reads, besides `factor` (which all of them need).
    "linear": (),
    "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "yarn": (
        "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
        "mscale_all_dim", "attention_factor", "truncate",
    ),
}  # fmt: skip
_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "yarn": (),
}

# transformers' yarn defaults (`_compute_yarn_parameters`), as in the YaRN paper.
_YARN_BETA_FAST = 32.0
_YARN_BETA_SLOW = 1.0


@dataclass(frozen=True)
class RopeScaling:
    """Rope scaling as transformers' ``rope_parameters`` / ``rope_scaling`` describe it (the
    base, ``rope_theta``, is the model's ``rotary_base``)."""

    rope_type: str
    """One of `ROPE_TYPES`: "linear", "llama3" or "yarn"."""
    factor: float
    """How many times the context is stretched: 8 for LLaMA-3.1, 32 for LLaMA-3.2, 4 for
    Qwen2.5's yarn."""
    original_max_position_embeddings: int | None = None
    """llama3, yarn: the context length of pre-training; None falls back to the model's
    ``max_position_embeddings``, as transformers does."""
    low_freq_factor: float | None = None
    """llama3 (required): wavelengths above original / low_freq_factor are divided by factor."""
    high_freq_factor: float | None = None
    """llama3 (required): wavelengths below original / high_freq_factor are kept."""
    beta_fast: float | None = None
    """yarn: pairs turning more than this often over the original context keep their
    frequency; None (or 0, as transformers reads it) = 32."""
    beta_slow: float | None = None
    """yarn: pairs turning less than this often are interpolated fully; None (or 0) = 1."""
    mscale: float | None = None
    """yarn (DeepSeek's variant): with ``mscale_all_dim``, the attention scaling is
    mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    mscale_all_dim: float | None = None
    """yarn: the denominator's multiplier of ln(factor) in that ratio."""
    attention_factor: float | None = None
    """yarn: the scaling of cos and sin, overriding the one derived from factor."""
    truncate: bool | None = None
    """yarn: round the ramp's ends to whole dimensions (floor, ceil); None = True, as in
    transformers (gpt-oss sets False)."""

    def errors(self) -> list[str]:
        """What is wrong with these parameters, each naming the field and its value."""
        if self.rope_type not in ROPE_TYPES:
            return [
                f"rope_type {self.rope_type!r} is not supported (supported: "
                f"{', '.join(map(repr, ROPE_TYPES))}; plain RoPE is no rope scaling)"
            ]
        errors = []
        if not self.factor > 0:
            errors.append(f"factor {self.factor} must be > 0")
        for name in _REQUIRED_FIELDS[self.rope_type]:
            if getattr(self, name) is None:
                errors.append(f"{name} is required for rope_type {self.rope_type!r}")
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None and name not in _TYPE_FIELDS[self.rope_type]:
                owners = " / ".join(repr(t) for t in ROPE_TYPES if name in _TYPE_FIELDS[t])
                errors.append(
                    f"{name} {value} is not a {self.rope_type!r} parameter (it belongs to {owners})"
                )
        original = self.original_max_position_embeddings
        if original is not None and original < 1:
            errors.append(f"original_max_position_embeddings {original} must be >= 1")
        low, high = self.low_freq_factor, self.high_freq_factor
        if low is not None and not low > 0:
            errors.append(f"low_freq_factor {low} must be > 0")
        if low is not None and high is not None and not high > low:
            errors.append(f"high_freq_factor {high} must be greater than low_freq_factor {low}")
        if self.rope_type == "yarn":
            fast, slow = self.beta_fast or _YARN_BETA_FAST, self.beta_slow or _YARN_BETA_SLOW
            if fast < slow:
                errors.append(f"beta_fast {fast} must not be below beta_slow {slow} (None: 32, 1)")
        if self.attention_factor is not None and self.attention_factor < 0:
            errors.append(f"attention_factor {self.attention_factor} must be >= 0")
        return errors


_OPTIONAL_FIELDS = tuple(f.name for f in dataclasses.fields(RopeScaling))[2:]
"""Every field after ``rope_type`` and ``factor``."""


def _refuse_errors(scaling: RopeScaling) -> RopeScaling:
    """``scaling`` itself, or a ValueError listing its `RopeScaling.errors`."""
    if problems := scaling.errors():
        raise ValueError("rope scaling: " + "; ".join(problems))
    return scaling


def inverse_frequencies(
    head_dim: int,
    base: float,
    scaling: RopeScaling | None,
    max_position_embeddings: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies and the attention scaling, as transformers computes them.

    Args:
        head_dim: width of a head; the rotation pairs dimension i with i + head_dim/2.
        base: ``rope_theta`` (the model's ``rotary_base``).
        scaling: None for plain RoPE.
        max_position_embeddings: the model's context; where ``scaling`` has no
            ``original_max_position_embeddings`` it stands in for it.
        device: where the frequencies are computed (transformers computes them on the device
            the model is built on).

    Returns:
        inv_freq ``[head_dim/2]`` float32, and the attention scaling that multiplies cos and
        sin (1.0 except for yarn).
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if scaling is not None:
        _refuse_errors(scaling)
    # Integer exponents, cast, then divided: the same float32 rounding as transformers.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    powers = base**exponents  # base^(2i/d), one per pair
    inv_freq = 1.0 / powers
    if scaling is None:
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor, 1.0
    original = scaling.original_max_position_embeddings or max_position_embeddings
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling, original), 1.0
    return _yarn(powers, head_dim, base, scaling, original), _yarn_attention_scaling(scaling)


def _llama3(inv_freq: torch.Tensor, scaling: RopeScaling, original: int) -> torch.Tensor:
    """LLaMA-3.1's frequencies ``[d/2]`` from plain ones: long wavelengths / factor, short
    ones kept, a smooth blend in between."""
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    assert low is not None and high is not None  # errors() requires them
    factor = scaling.factor
    wavelength = 2 * math.pi / inv_freq
    long_wavelength, short_wavelength = original / low, original / high
    scaled = torch.where(wavelength > long_wavelength, inv_freq / factor, inv_freq)
    # Turns over the original context, mapped to [0, 1] across the band: 0 at the long end
    # (fully divided), 1 at the short end (kept).
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(in_band, blended, scaled)


def _yarn(
    powers: torch.Tensor, head_dim: int, base: float, scaling: RopeScaling, original: int
) -> torch.Tensor:
    """YaRN's frequencies ``[d/2]`` from base^(2i/d): high frequencies kept (extrapolated),
    low ones divided by factor (interpolated), a linear ramp over the dimensions between."""
    fast = scaling.beta_fast or _YARN_BETA_FAST  # `or`: transformers reads 0 as the default
    slow = scaling.beta_slow or _YARN_BETA_SLOW

    def dimension_turning(turns: float) -> float:
        """The (fractional) dimension whose pair turns ``turns`` times over the context."""
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    start, end = dimension_turning(fast), dimension_turning(slow)
    if scaling.truncate is None or scaling.truncate:
        start, end = math.floor(start), math.ceil(end)
    start, end = max(start, 0), min(end, head_dim - 1)
    if start == end:
        end += 0.001  # a one-dimension ramp would divide by zero
    pairs = torch.arange(head_dim // 2, dtype=torch.float32, device=powers.device)
    ramp = torch.clamp((pairs - start) / (end - start), 0, 1)  # 0: kept ... 1: interpolated
    kept = 1 - ramp  # blended as 1 - kept (not ramp): transformers' float32 rounding
    interpolated = 1.0 / (scaling.factor * powers)
    return interpolated * (1 - kept) + (1.0 / powers) * kept


def _yarn_attention_scaling(scaling: RopeScaling) -> float:
    """The factor on cos and sin: ``attention_factor``, else DeepSeek's ratio when both
    mscales are set (non-zero), else 0.1 ln(factor) + 1."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def magnitude(multiplier: float) -> float:
        return 1.0 if scaling.factor <= 1 else 0.1 * multiplier * math.log(scaling.factor) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return float(magnitude(scaling.mscale) / magnitude(scaling.mscale_all_dim))
    return magnitude(1.0)


def rope_scaling_from_hf(config: dict[str, Any]) -> RopeScaling | None:
    """The rope scaling of a HF ``config.json`` dict.

    Reads ``rope_scaling`` (transformers 4.x, ``type`` or ``rope_type``; it wins when both are
    there, as in transformers) or ``rope_parameters`` (transformers 5). None when absent or
    "default". A yarn ``factor`` of null is max_position_embeddings / original, as
    transformers derives it.

    Raises:
        ValueError: naming an unsupported rope_type ('dynamic', 'longrope', ...), a missing or
            non-numeric field, or a value `RopeScaling.errors` refuses.
    """
    params = config.get("rope_scaling") or config.get("rope_parameters")
    if not params:
        return None
    nested = sorted(key for key, value in params.items() if isinstance(value, dict))
    if nested:
        raise ValueError(f"per-layer rope parameters ({', '.join(nested)}) are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported (supported: 'default', "
            f"{', '.join(map(repr, ROPE_TYPES))})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"partial_rotary_factor {params['partial_rotary_factor']} is not supported (1.0 only)"
        )
    if "factor" not in params:
        raise ValueError(f"rope_type {rope_type!r} needs the field 'factor'")
    fields: dict[str, Any] = {"truncate": bool(params["truncate"])} if "truncate" in params else {}
    for name in _TYPE_FIELDS[rope_type]:
        if name != "truncate" and params.get(name) is not None:
            fields[name] = _number(params, name, int if name.startswith("original") else float)
    if params["factor"] is None and rope_type == "yarn":
        fields["factor"] = _yarn_implicit_factor(config, fields)
    else:
        fields["factor"] = _number(params, "factor", float)
    return _refuse_errors(RopeScaling(rope_type, **fields))


def _number(params: dict[str, Any], name: str, kind: type) -> Any:
    """``params[name]`` as ``kind`` (int or float), refusing booleans, strings and floats that
    are not whole where an int is wanted."""
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or kind(value) != value:
        wanted = "an int" if kind is int else "a number"
        raise ValueError(f"rope parameter {name} {value!r} is not {wanted}")
    return kind(value)


def _yarn_implicit_factor(config: dict[str, Any], fields: dict[str, Any]) -> float:
    """transformers' factor for a yarn ``factor`` of null: the context's stretch."""
    context = config.get("max_position_embeddings")
    if context is None:
        raise ValueError("yarn with factor null needs max_position_embeddings to derive it")
    return context / fields.get("original_max_position_embeddings", context)


def rope_scaling_to_hf(scaling: RopeScaling | None, rope_theta: float) -> dict[str, Any]:
    """The ``rope_parameters`` dict transformers 5 writes: rope_type, rope_theta and the
    type's fields that are set (unset ones keep transformers' defaults when read back)."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": float(rope_theta)}
    _refuse_errors(scaling)
    fields = {
        name: getattr(scaling, name)
        for name in _TYPE_FIELDS[scaling.rope_type]
        if getattr(scaling, name) is not None
    }
    return {
        "rope_type": scaling.rope_type,
        "rope_theta": float(rope_theta),
        "factor": scaling.factor,
        **fields,
    }


def rope_scaling_from_dict(saved: dict[str, Any] | None) -> RopeScaling | None:
    """The rope scaling of its ``dataclasses.asdict`` JSON (checkpoint metadata); None stays
    None.

    Raises:
        ValueError: naming fields this version does not know, or values it refuses.
    """
    if saved is None:
        return None
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(RopeScaling)})
    if unknown:
        raise ValueError(f"unknown rope scaling fields {', '.join(unknown)} in {saved}")
    return _refuse_errors(RopeScaling(**saved))
