"""Typed configuration, validated in one place before any process group starts.

Field names follow Megatron-LM's flags (``num_layers`` is ``--num-layers``), so a Megatron
user can read them off their scripts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class ModelConfig:
    """A LLaMA-family decoder: architecture and how its layers execute."""

    num_layers: int
    """Decoder layers (``--num-layers``)."""
    hidden_size: int
    """Model width h (``--hidden-size``)."""
    num_attention_heads: int
    """Query heads (``--num-attention-heads``)."""
    ffn_hidden_size: int
    """SwiGLU inner width (``--ffn-hidden-size``)."""
    vocab_size: int
    """Tokenizer vocabulary; padded for TP by ``make_vocab_size_divisible_by``."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention (``--num-query-groups``); None = MHA."""
    max_position_embeddings: int = 4096
    """Longest sequence the rotary cache covers (``--max-position-embeddings``)."""
    rotary_base: float = 10000.0
    """Rotary embedding theta (``--rotary-base``): 10000 for LLaMA-2, 500000 for LLaMA-3."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (``--norm-epsilon``)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output head (LLaMA does not)."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding per TP rank (``--make-vocab-size-divisible-by``)."""
    init_method_std: float = 0.02
    """Std of the normal init (``--init-method-std``); output projections get it / sqrt(2L)."""
    init_seed: int = 1234
    """Seed of the parameter init; each parameter draws from its own seeded generator."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (``--attention-dropout``); LLaMA uses 0."""
    decoder_first_pipeline_num_layers: int | None = None
    """Layers of the first pipeline rank when the split is uneven
    (``--decoder-first-pipeline-num-layers``); the other ranks share the rest."""
    decoder_last_pipeline_num_layers: int | None = None
    """Layers of the last pipeline rank (``--decoder-last-pipeline-num-layers``)."""
    sequence_parallel: bool = False
    """Shard norms and residuals along the sequence over TP (``--sequence-parallel``)."""
    recompute_granularity: str | None = None
    """None, "full" (recompute whole layers) or "selective" (core attention only)."""
    attention_backend: str = "auto"
    """"torch" (scaled_dot_product_attention), "triton" (kernels.flash_attention) or "auto"
    (Triton on CUDA, PyTorch elsewhere) (``--attention-backend``)."""
    norm_backend: str = "auto"
    """"torch" (reference RMSNorm), "triton" (kernels.rmsnorm) or "auto" (``--norm-backend``)."""
    params_dtype: torch.dtype = torch.float32
    """Dtype the parameters are created in."""

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A named architecture (see `PRESETS`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of the unsharded, unpadded model."""
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        per_layer = h * h * 2 + 2 * h * kv + 3 * h * self.ffn_hidden_size + 2 * h
        total = self.num_layers * per_layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
        vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama2-13b": ModelConfig(
        num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824,
        vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama2-70b": ModelConfig(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
        ffn_hidden_size=28672, vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama3-8b": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=8192,
        rotary_base=500000.0,
    ),
    # Tiny models for tests and the CPU quickstart.
    "tiny": ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176,
        vocab_size=1000, max_position_embeddings=256,
    ),
    "tiny-gqa": ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2,
        ffn_hidden_size=176, vocab_size=1000, max_position_embeddings=256,
    ),
}  # fmt: skip


@dataclass
class ParallelConfig:
    """How the job is split (``--tensor-model-parallel-size`` etc.)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None


def validate(
    model: ModelConfig,
    parallel: ParallelConfig,
    world_size: int | None = None,
    seq_length: int | None = None,
) -> None:
    """Check that the model can be laid out as asked; raise ValueError naming the values.

    Runs before any process group starts, so a bad layout costs nothing.
    """
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    heads, groups = model.num_attention_heads, model.num_query_groups
    errors = []
    if tp < 1 or pp < 1 or vpp < 1:
        errors.append(
            f"parallel sizes must be at least 1: --tensor-model-parallel-size {tp}, "
            f"--pipeline-model-parallel-size {pp}, virtual pipeline size {vpp}"
        )
        raise ValueError("; ".join(errors))
    if model.hidden_size % heads != 0:
        errors.append(
            f"--hidden-size ({model.hidden_size}) must be divisible by "
            f"--num-attention-heads ({heads})"
        )
    if heads % groups != 0:
        errors.append(
            f"--num-attention-heads ({heads}) must be divisible by --num-query-groups ({groups})"
        )
    if heads % tp != 0:
        errors.append(
            f"--num-attention-heads ({heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if groups % tp != 0 and tp % groups != 0:
        errors.append(
            f"--num-query-groups ({groups}) and --tensor-model-parallel-size ({tp}) are "
            "incompatible: one must divide the other (K/V heads are sharded when there are at "
            "least as many as TP ranks, replicated otherwise)"
        )
    if model.ffn_hidden_size % tp != 0:
        errors.append(
            f"--ffn-hidden-size ({model.ffn_hidden_size}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    try:
        # Imported here: the partition module imports this one.
        from engine.pipeline_parallel.partition import virtual_stage_layers

        virtual_stage_layers(
            model.num_layers, pp, parallel.virtual_pipeline_model_parallel_size,
            model.decoder_first_pipeline_num_layers, model.decoder_last_pipeline_num_layers,
        )  # fmt: skip
    except ValueError as error:
        errors.append(str(error))
    if world_size is not None and world_size % (tp * pp) != 0:
        errors.append(
            f"world size ({world_size}) must be divisible by --tensor-model-parallel-size ({tp}) "
            f"x --pipeline-model-parallel-size ({pp}) = {tp * pp}"
        )
    if model.sequence_parallel and seq_length is not None and seq_length % tp != 0:
        errors.append(
            f"--seq-length ({seq_length}) must be divisible by --tensor-model-parallel-size "
            f"({tp}) with --sequence-parallel"
        )
    if seq_length is not None and seq_length > model.max_position_embeddings:
        errors.append(
            f"--seq-length ({seq_length}) exceeds --max-position-embeddings "
            f"({model.max_position_embeddings})"
        )
    if model.recompute_granularity not in (None, "full", "selective"):
        errors.append(
            f"--recompute-granularity must be 'full' or 'selective', got "
            f"{model.recompute_granularity!r}"
        )
    for name in ("attention_backend", "norm_backend"):
        if getattr(model, name) not in ("auto", "torch", "triton"):
            errors.append(
                f"--{name.replace('_', '-')} must be 'auto', 'torch' or 'triton', got "
                f"{getattr(model, name)!r}"
            )
    if errors:
        raise ValueError("; ".join(errors))


@dataclass
class DistributedDataParallelConfig:
    """How gradients are reduced over the data-parallel group (`engine.distributed.ddp`)."""

    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in float32 whatever the parameters' dtype
    (``--accumulate-allreduce-grads-in-fp32``; on by default here, as Megatron forces for bf16)."""
    overlap_grad_reduce: bool = False
    """Launch each bucket's reduction as soon as its gradients are ready in the last
    microbatch's backward (``--overlap-grad-reduce``)."""
    use_distributed_optimizer: bool = False
    """ZeRO-1: reduce-scatter gradients, shard optimizer state (``--use-distributed-optimizer``)."""
    overlap_param_gather: bool = False
    """Distributed optimizer: all-gather updated parameters during the next forward
    (``--overlap-param-gather``)."""
    bucket_size: int | None = 40_000_000
    """Elements per gradient bucket (``--ddp-bucket-size``); None puts everything in one."""


@dataclass
class OptimizerConfig:
    """AdamW, mixed precision, clipping and the learning-rate schedule (Megatron's flags)."""

    lr: float = 3e-4
    """Peak learning rate (``--lr``)."""
    min_lr: float = 0.0
    """Floor the schedule decays to (``--min-lr``)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (``--weight-decay``); never applied to norms and biases."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip to this global L2 norm (``--clip-grad``); 0 disables clipping."""
    bf16: bool = False
    """bf16 parameters and activations, fp32 main parameters (``--bf16``)."""
    fp16: bool = False
    """fp16 parameters with dynamic loss scaling (``--fp16``)."""
    loss_scale: float | None = None
    """A constant loss scale for fp16 (``--loss-scale``); None means dynamic."""
    initial_loss_scale: float = 2.0**32
    """Dynamic scaling's first scale (``--initial-loss-scale``)."""
    min_loss_scale: float = 1.0
    """Dynamic scaling never goes below this (``--min-loss-scale``)."""
    loss_scale_window: int = 1000
    """Steps without inf/nan before the scale doubles (``--loss-scale-window``)."""
    hysteresis: int = 2
    """Overflowing steps tolerated before the scale is lowered (``--hysteresis``)."""
    lr_decay_style: str = "linear"
    """constant, linear, cosine, inverse-square-root or WSD (``--lr-decay-style``)."""
    lr_warmup_iters: int = 0
    lr_warmup_samples: int = 0
    lr_warmup_fraction: float | None = None
    """Warm-up as a fraction of the decay span (``--lr-warmup-fraction``)."""
    lr_decay_iters: int | None = None
    lr_decay_samples: int | None = None
    lr_wsd_decay_style: str = "exponential"
    """WSD's final decay: exponential, linear, cosine or minus_sqrt (``--lr-wsd-decay-style``)."""
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_samples: int | None = None
    start_weight_decay: float | None = None
    """Weight decay schedule start (``--start-weight-decay``); None = ``weight_decay``."""
    end_weight_decay: float | None = None
    weight_decay_incr_style: str = "constant"
    """constant, linear or cosine (``--weight-decay-incr-style``)."""
