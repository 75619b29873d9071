"""Model FLOPs per token, the numerator of MFU (computed once, here, for the trainer's log and
the cost model): the decoder formula below, or the model family's own
(`ModelFamily.flops_per_token`) when it declares one."""

from __future__ import annotations

from engine.models.config import ModelConfig
from engine.models.families import family_of


def flops_parameters(model: ModelConfig) -> int:
    """N of the ``6·N`` FLOPs per token: every matmul's weights, i.e. all parameters but the
    input embedding (a lookup) unless it is tied to the output head."""
    embedding = 0 if model.tie_word_embeddings else model.vocab_size * model.hidden_size
    return model.num_parameters() - embedding


def flops_per_token(model: ModelConfig, seq_length: int) -> int:
    """Forward + backward FLOPs per token: the family's count if it declares one, else
    `decoder_flops_per_token`."""
    own = family_of(model).flops_per_token
    return (own or decoder_flops_per_token)(model, seq_length)


def decoder_flops_per_token(model: ModelConfig, seq_length: int) -> int:
    """``6·N + 12·L·h·s`` for a decoder of causal self-attention and matmuls: N the matmul
    weights (`flops_parameters`), the second term attention's ``QK^T`` and ``PV``, which have
    no weights."""
    return 6 * flops_parameters(model) + 12 * model.num_layers * model.hidden_size * seq_length
