"""The keys and values a decoding model attends over: preallocated per layer, extended one
step at a time (`engine.inference.generation` drives it; attention calls `KVCache.update`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch
from torch import nn


class _CachedAttention(Protocol):
    local_kv_heads: int
    """K/V heads this rank computes."""
    head_dim: int


class _CachedLayer(Protocol):
    """What the cache reads of each of the model's ``layers``."""

    layer_number: int
    attention: _CachedAttention


class KVCache:
    """Keys and values of this rank's layers, preallocated for ``max_len`` positions.

    ``keys[n]`` / ``values[n]`` (global layer number n): ``[max_len, b, kv_heads_local, d]``,
    sequence-first like the model's activations, where ``kv_heads_local`` is
    ``kv_heads / tp`` (sharded K/V) or 1 (replicated K/V: the head this rank uses).
    ``valid [b, max_len]`` marks real (not padding) tokens. A step calls `prepare`, runs the
    model (each layer's attention calls `update`), then `advance`.
    """

    def __init__(
        self, model: nn.Module, batch_size: int, max_len: int, device: torch.device | None = None
    ):
        param = next(model.parameters())
        device = param.device if device is None else device
        self.max_len, self.offset, self.step_len = max_len, 0, 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer in cast(Sequence[_CachedLayer], model.layers):
            attention = layer.attention
            shape = (max_len, batch_size, attention.local_kv_heads, attention.head_dim)
            self.keys[layer.layer_number] = torch.zeros(shape, dtype=param.dtype, device=device)
            self.values[layer.layer_number] = torch.zeros(shape, dtype=param.dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.attention_mask: torch.Tensor | None = None

    def prepare(self, valid: torch.Tensor) -> None:
        """Start a step of ``s`` new tokens; ``valid [b, s]`` marks the real ones. Sets
        ``attention_mask [b, 1, s, offset + s]``: causal over the prefix, pads hidden."""
        s = valid.size(1)
        end = self.offset + s
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.valid[:, self.offset : end] = valid
        query = torch.arange(self.offset, end, device=valid.device).view(1, s, 1)
        key = torch.arange(end, device=valid.device).view(1, 1, end)
        mask = (key <= query) & self.valid[:, None, :end]
        # A pad query would see no key at all (a NaN row in softmax): let it see itself. Its
        # output is never used, and no real query ever attends to it.
        mask |= key == query
        self.attention_mask = mask.unsqueeze(1)
        self.step_len = s

    def update(
        self, layer_number: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ``[s, b, kv_heads_local, d]`` at the offset; return the whole prefix
        ``[offset + s, b, kv_heads_local, d]`` (views of the cache)."""
        end = self.offset + k.size(0)
        keys, values = self.keys[layer_number], self.values[layer_number]
        keys[self.offset : end] = k
        values[self.offset : end] = v
        return keys[:end], values[:end]

    def advance(self) -> None:
        """The step's tokens are now part of the prefix."""
        self.offset += self.step_len
        self.step_len = 0
