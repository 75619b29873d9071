"""A model family's parameters, declared once as data.

Everything that must know a model's weights without running it reads this declaration:
checkpoint placement and resharding (`engine.checkpointing.format`), conversion's placements
and HuggingFace / Meta names (`engine.conversion`), the cost model's parameter counts
(`engine.planning`), `ModelConfig.num_parameters`, the layout-free weight view
(`engine.models.weights`) and the architecture check on load. The model itself builds the
optional parameters (biases) that its inventory declares, so adding a parameter is one edit.

Two kinds of record:

- a `CanonicalTensor` is a layout-free tensor: its name (``layers.{n}.attention.q.weight``,
  ``{n}`` the global layer number), full shape without vocabulary padding, and its names in
  HuggingFace ``transformers`` and Meta's original checkpoints;
- a `ParameterSpec` is one parameter of the model's modules (``layers.{n}.attention.qkv.weight``):
  the canonical tensors it fuses along dim 0 (Q|K|V, gate|up), its full shape (vocabulary
  padded for this TP size), the dimension tensor parallelism splits (0: column-parallel, each
  fused block on its own; 1: row-parallel; None: replicated), whether its gradient is partial
  over TP, which pipeline stage holds it (the first, every decoder layer, or the last), and
  for the tied output head's copy the parameter it copies.

An `Inventory` is the family's declaration for one configuration and TP size (the K/V
projection's fusion depends on TP: see the LLaMA inventory).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

Stage = Literal["first", "layer", "last"]
"""Where a parameter lives: the first pipeline stage (the embedding), every decoder layer, or
the last stage (final norm, output head)."""


@dataclass(frozen=True)
class CanonicalTensor:
    """One layout-free tensor (see the module docstring); names may contain ``{n}``."""

    name: str
    shape: tuple[int, ...]
    hf: str | None = None
    """Its name in a HuggingFace ``transformers`` state dict (None: not representable)."""
    meta: str | None = None
    """Its name in Meta's original ``consolidated.*.pth`` (None: not in that format)."""
    hf_transposed: bool = False
    """HF stores the transpose (``Conv1D`` layers, as GPT-2's, keep ``[in, out]``)."""

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of the HF tensor."""
        return self.shape[::-1] if self.hf_transposed else self.shape


@dataclass(frozen=True)
class ParameterSpec:
    """One module parameter of the model (see the module docstring)."""

    name: str
    parts: tuple[CanonicalTensor, ...]
    full_shape: tuple[int, ...]
    """The whole parameter over all TP ranks, vocabulary padding included."""
    tp_dim: int | None
    """The dimension TP splits; None: every TP rank holds all of it."""
    partition_sizes: tuple[int, ...] = ()
    """The full sizes of the blocks along ``tp_dim`` that are each split over TP on their own
    (``[q, kv, kv]`` for Q|K|V); one block for an unfused parameter."""
    partial_grad_over_tp: bool = False
    """Replicated, but each TP rank computes only part of its gradient (summed once a step)."""
    stage: Stage = "layer"
    tied_to: str | None = None
    """This parameter is a copy of that one (the tied output head off the first stage): never
    saved, loaded from the original, gradients summed with it."""
    vocab_padded: bool = False
    """Dim 0 is the vocabulary, padded for TP (the padding rows are not canonical)."""

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        """This parameter's shape on one TP rank."""
        if self.tp_dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.tp_dim] //= tp_size
        return tuple(shape)

    def local_numel(self, tp_size: int) -> int:
        return math.prod(self.local_shape(tp_size))

    def for_layer(self, layer_number: int) -> ParameterSpec:
        """The spec with ``{n}`` replaced by a global layer number."""
        n = str(layer_number)
        parts = tuple(
            replace(p, name=_at(p.name, n), hf=_at(p.hf, n), meta=_at(p.meta, n))
            for p in self.parts
        )
        return replace(self, name=_at(self.name, n), parts=parts)


def _at(name: str | None, layer: str) -> Any:
    """``name`` with ``{n}`` replaced by the layer number (None stays None)."""
    return None if name is None else name.replace("{n}", layer)


@dataclass(frozen=True)
class Inventory:
    """A model's parameters for one configuration and TP size, with everything derived from
    them. ``specs`` are in the model's parameter order within a stage: the first stage's, one
    decoder layer's (with ``{n}``), the last stage's."""

    specs: tuple[ParameterSpec, ...]
    num_layers: int
    tp_size: int

    def stage_specs(
        self, layer_numbers: Iterable[int], first: bool, last: bool, with_tied_copy: bool = True
    ) -> list[ParameterSpec]:
        """The concrete specs a chunk holds, in the model's parameter order: the first stage's
        (if ``first``), each layer's, the last stage's (if ``last``). A tied copy exists only
        on a last stage that is not also the first (there the head uses the embedding itself);
        ``with_tied_copy=False`` leaves it out (what is saved)."""
        out = [s for s in self.specs if s.stage == "first"] if first else []
        layer = [s for s in self.specs if s.stage == "layer"]
        out += [spec.for_layer(n) for n in layer_numbers for spec in layer]
        if last:
            out += [
                s
                for s in self.specs
                if s.stage == "last" and (s.tied_to is None or (with_tied_copy and not first))
            ]
        return out

    def all_specs(self, with_tied_copy: bool = False) -> list[ParameterSpec]:
        """Every parameter of the whole model (one stage holding all layers)."""
        return self.stage_specs(range(self.num_layers), True, True, with_tied_copy)

    def spec(self, name: str) -> ParameterSpec:
        """The concrete spec of parameter ``name`` (a global layer number in it)."""
        match = re.match(r"^layers\.(\d+)\.(.*)$", name)
        template = f"layers.{{n}}.{match.group(2)}" if match else name
        for spec in self.specs:
            if spec.name == template:
                return spec.for_layer(int(match.group(1))) if match else spec
        raise KeyError(f"parameter {name} is not in the model's inventory")

    def declares(self, name: str) -> bool:
        """Whether the inventory has parameter ``name`` (a template with ``{n}`` or concrete)."""
        try:
            self.spec(name.replace("{n}", "0"))
        except KeyError:
            return False
        return True

    def canonical_tensors(self) -> list[CanonicalTensor]:
        """Every canonical tensor of the model, once (the tied head is the embedding), in
        stage order."""
        return [part for spec in self.all_specs() for part in spec.parts]

    def canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.canonical_tensors()}

    def canonical_by_name(self) -> dict[str, CanonicalTensor]:
        """Every canonical tensor (tied copies too, under their own names), by name."""
        tied = [spec for spec in self.specs if spec.tied_to is not None]
        return {part.name: part for spec in self.all_specs() + tied for part in spec.parts}

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of the unsharded, unpadded model (the tied head counted once)."""
        return sum(
            part.numel()
            for spec in self.all_specs()
            if include_embeddings or not spec.vocab_padded
            for part in spec.parts
        )

    def stage_parameters(self, layer_numbers: Sequence[int], first: bool, last: bool) -> int:
        """Parameters one TP rank of a stage holds (a tied copy included)."""
        specs = self.stage_specs(layer_numbers, first, last)
        return sum(spec.local_numel(self.tp_size) for spec in specs)

    def renamer(self, source: str, target: str) -> Callable[[str], str]:
        """Maps a canonical tensor's name from one naming to another (``"name"``, ``"hf"``,
        ``"meta"``), for every layer; KeyError naming a tensor that has no counterpart."""
        table: dict[str, str] = {}
        patterns: list[tuple[re.Pattern[str], str]] = []
        for spec in self.specs:
            for part in spec.parts:
                src, dst = getattr(part, source), getattr(part, target)
                if src is None or dst is None:
                    continue
                if "{n}" in src:
                    regex = "^" + re.escape(src).replace(r"\{n\}", r"(\d+)") + "$"
                    patterns.append((re.compile(regex), dst))
                else:
                    table[src] = dst

        def rename(name: str) -> str:
            if name in table:
                return table[name]
            for pattern, dst in patterns:
                match = pattern.match(name)
                if match:
                    return dst.replace("{n}", match.group(1))
            raise KeyError(f"tensor {name} has no counterpart in the model")

        return rename
