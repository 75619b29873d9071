"""The model's configuration: `ModelConfig`, its named presets, and the checks that it can be
laid out over a TP / PP layout (run before any process group starts).

Field names follow Megatron-LM's flags (``num_layers`` is ``--num-layers``), so a Megatron
user can read them off their scripts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from engine.models.backends import BACKEND_CHOICES
from engine.models.families import family_of
from engine.models.inventory import Inventory
from engine.models.rope import RopeScaling, rope_scaling_from_dict
from engine.parallel_state import ParallelConfig
from engine.pipeline_parallel.layout import virtual_stage_layers

RECOMPUTE_GRANULARITIES = ("full", "selective")
"""``--recompute-granularity``: whole decoder layers, or core attention only."""

CP_COMM_TYPES = ("p2p", "a2a")
"""``--cp-comm-type``: K/V blocks passed around a ring (p2p), or heads scattered and the
sequence gathered around attention (a2a, Ulysses)."""


@dataclass
class ModelConfig:
    """A decoder's architecture and how its layers execute (the LLaMA family's fields; the
    family in ``family`` declares its parameters)."""

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
    rope_scaling: RopeScaling | None = None
    """Stretched rotary frequencies for long context (`engine.models.rope`: ``linear``,
    ``llama3``, ``yarn``); None: plain RoPE (``--use-rope-scaling``, ``--rope-scaling-factor``)."""
    kv_channels: int | None = None
    """Per-head width when it is not ``hidden_size / num_attention_heads`` (``--kv-channels``,
    Qwen3's ``head_dim``); None: the quotient."""
    qkv_bias: bool = False
    """Biases on the Q, K and V projections (``--add-qkv-bias``; Qwen2)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before the rotary embedding (``--qk-layernorm``;
    Qwen3's ``q_norm`` / ``k_norm``)."""
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
    cross_entropy_chunk_size: int | None = None
    """Compute the output layer and the loss this many tokens at a time, so the whole
    ``[s, b, V/tp]`` logits never exist (``--cross-entropy-chunk-size``). None (the default):
    chunks whose logits are about the size of the head's input
    (`engine.tensor_parallel.linear_cross_entropy.default_chunk_size`); 0: the whole logits at
    once. Generation and logits are unaffected."""
    cp_comm_type: str = "p2p"
    """How attention communicates under context parallelism (``--cp-comm-type``): "p2p"
    (ring attention) or "a2a" (all-to-all over heads); see `engine.context_parallel`."""
    attention_backend: str = "auto"
    """"torch" (scaled_dot_product_attention), "triton" (kernels.flash_attention) or "auto"
    (Triton on CUDA, PyTorch elsewhere) (``--attention-backend``)."""
    norm_backend: str = "auto"
    """"torch" (reference RMSNorm), "triton" (kernels.rmsnorm) or "auto" (``--norm-backend``)."""
    params_dtype: torch.dtype = torch.float32
    """Dtype the parameters are created in."""
    pipeline_dtype: torch.dtype | None = None
    """Dtype of the activations pipeline stages send each other, when the layers compute in
    another dtype than the parameters' (FSDP2 with --bf16: float32 sharded weights, bf16
    compute); None: ``params_dtype``."""
    family: str = "llama"
    """The model family that builds this configuration (`engine.models.families`)."""

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if isinstance(self.rope_scaling, dict):  # as `dataclasses.asdict` saved it
            self.rope_scaling = rope_scaling_from_dict(self.rope_scaling)

    @property
    def kv_heads(self) -> int:
        """K/V heads: ``num_query_groups`` (every query head under MHA)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head width d: ``kv_channels``, else ``hidden_size / num_attention_heads``."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A named architecture (see `PRESETS`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def validate(
        self,
        parallel: ParallelConfig,
        world_size: int | None = None,
        seq_length: int | None = None,
    ) -> None:
        """Check that the model can be laid out as ``parallel`` says (on ``world_size`` ranks,
        for ``seq_length`` tokens); raise ValueError naming every problem's flags and values.

        Runs before any process group starts, so a bad layout costs nothing.
        """
        errors = layout_errors(self, parallel, world_size, seq_length)
        if errors:
            raise ValueError("; ".join(errors))

    def virtual_stage_layers(
        self,
        pipeline_model_parallel_size: int,
        virtual_pipeline_model_parallel_size: int | None = None,
    ) -> list[list[int]]:
        """Global layer numbers of every virtual stage (`virtual_stage_layers` with this
        model's uneven split, if any)."""
        return virtual_stage_layers(
            self.num_layers, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size,
            self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers,
        )  # fmt: skip

    def layers_per_rank(self, pipeline_model_parallel_size: int) -> list[int]:
        """Decoder layers of each pipeline rank (all its virtual chunks)."""
        return [len(layers) for layers in self.virtual_stage_layers(pipeline_model_parallel_size)]

    def inventory(self, tp_size: int = 1) -> Inventory:
        """Every parameter of the model over ``tp_size`` TP ranks, as its family declares."""
        return family_of(self).inventory(self, tp_size)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of the unsharded, unpadded model (from the inventory)."""
        return self.inventory().num_parameters(include_embeddings)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ModelConfig:
        """The configuration a checkpoint's metadata records (``dataclasses.asdict`` as JSON,
        the dtype as its name); unknown keys are ignored, missing ones take the defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in fields}
        params_dtype = _dtype(values.pop("params_dtype", "torch.float32"))
        pipeline = values.pop("pipeline_dtype", None)
        pipeline_dtype = None if pipeline is None else _dtype(pipeline)
        return cls(**values, params_dtype=params_dtype, pipeline_dtype=pipeline_dtype)


def _dtype(name: str) -> torch.dtype:
    """A dtype as `str(dtype)` wrote it (``"torch.bfloat16"``)."""
    return getattr(torch, str(name).removeprefix("torch."))


def flag_rope_scaling(factor: float = 8.0) -> RopeScaling:
    """The rope scaling of Megatron's ``--use-rope-scaling``: LLaMA-3.1/3.2's published one
    (``rope_type`` "llama3") with ``factor`` (8 for 3.1, 32 for 3.2)."""
    return RopeScaling(
        "llama3", factor, original_max_position_embeddings=8192, low_freq_factor=1.0,
        high_freq_factor=4.0,
    )  # fmt: skip


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
    "llama3.1-8b": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=131072,
        rotary_base=500000.0, rope_scaling=flag_rope_scaling(8.0),
    ),
    "llama3.2-1b": ModelConfig(
        num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=8192, vocab_size=128256, max_position_embeddings=131072,
        rotary_base=500000.0, rope_scaling=flag_rope_scaling(32.0), tie_word_embeddings=True,
    ),
    "llama3.2-3b": ModelConfig(
        num_layers=28, hidden_size=3072, num_attention_heads=24, num_query_groups=8,
        ffn_hidden_size=8192, vocab_size=128256, max_position_embeddings=131072,
        rotary_base=500000.0, rope_scaling=flag_rope_scaling(32.0), tie_word_embeddings=True,
    ),
    "mistral-7b-v0.3": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=32768, max_position_embeddings=32768,
        rotary_base=1000000.0, family="mistral",
    ),
    "qwen2.5-7b": ModelConfig(
        num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
        ffn_hidden_size=18944, vocab_size=152064, max_position_embeddings=131072,
        rotary_base=1000000.0, norm_epsilon=1e-6, qkv_bias=True, family="qwen2",
    ),
    "qwen3-8b": ModelConfig(
        num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, ffn_hidden_size=12288, vocab_size=151936, max_position_embeddings=40960,
        rotary_base=1000000.0, norm_epsilon=1e-6, qk_layernorm=True, family="qwen3",
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


# Field -> (flag, lowest allowed value, whether the lowest value itself is allowed).
_LOWER_BOUNDS: dict[str, tuple[str, float, bool]] = {
    "num_layers": ("--num-layers", 1, True),
    "hidden_size": ("--hidden-size", 1, True),
    "num_attention_heads": ("--num-attention-heads", 1, True),
    "num_query_groups": ("--num-query-groups", 1, True),
    "ffn_hidden_size": ("--ffn-hidden-size", 1, True),
    "vocab_size": ("--vocab-size", 1, True),
    "max_position_embeddings": ("--max-position-embeddings", 1, True),
    "kv_channels": ("--kv-channels", 1, True),
    "make_vocab_size_divisible_by": ("--make-vocab-size-divisible-by", 1, True),
    "rotary_base": ("--rotary-base", 0, False),
    "norm_epsilon": ("--norm-epsilon", 0, False),
    "init_method_std": ("--init-method-std", 0, True),
    "cross_entropy_chunk_size": ("--cross-entropy-chunk-size", 0, True),
}


def range_errors(model: ModelConfig) -> list[str]:
    """Fields outside the values a model can have (sizes below 1, a non-positive epsilon,
    a dropout probability outside [0, 1)), each naming its flag, the value and the range."""
    errors = []
    for field, (flag, low, inclusive) in _LOWER_BOUNDS.items():
        value = getattr(model, field)
        if value is not None and (value < low if inclusive else value <= low):
            bound = f"at least {low}" if inclusive else f"greater than {low}"
            errors.append(f"{flag} must be {bound}, got {value}")
    if not 0 <= model.attention_dropout < 1:
        errors.append(
            f"--attention-dropout must be in [0, 1) (a probability), got {model.attention_dropout}"
        )
    return errors


def layout_errors(
    model: ModelConfig,
    parallel: ParallelConfig,
    world_size: int | None = None,
    seq_length: int | None = None,
) -> list[str]:
    """Why ``model`` cannot be laid out as ``parallel`` says (empty: it can), each message
    naming the flags and values."""
    range_problems = range_errors(model)
    errors = range_problems + parallel.errors(world_size)
    if parallel.invalid_sizes() or range_problems:
        return errors  # nothing below can be computed with a size out of range
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    heads, groups = model.num_attention_heads, model.kv_heads
    if model.kv_channels is None and model.hidden_size % heads != 0:
        errors.append(
            f"--hidden-size ({model.hidden_size}) must be divisible by "
            f"--num-attention-heads ({heads}) (or give the head width, --kv-channels)"
        )
    if model.head_dim % 2 != 0:
        errors.append(f"the head width ({model.head_dim}) must be even for rotary embeddings")
    if model.rope_scaling is not None:
        errors += [f"rope scaling: {e}" for e in model.rope_scaling.errors()]
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
        model.virtual_stage_layers(pp, parallel.virtual_pipeline_model_parallel_size)
    except ValueError as error:
        errors.append(str(error))
    if model.sequence_parallel and seq_length is not None and seq_length % tp != 0:
        errors.append(
            f"--seq-length ({seq_length}) must be divisible by --tensor-model-parallel-size "
            f"({tp}) with --sequence-parallel"
        )
    errors += context_parallel_errors(model, parallel, seq_length)
    if seq_length is not None and seq_length > model.max_position_embeddings:
        errors.append(
            f"--seq-length ({seq_length}) exceeds --max-position-embeddings "
            f"({model.max_position_embeddings})"
        )
    if model.recompute_granularity not in (None, *RECOMPUTE_GRANULARITIES):
        errors.append(
            f"--recompute-granularity must be {_one_of(RECOMPUTE_GRANULARITIES)}, got "
            f"{model.recompute_granularity!r}"
        )
    for name in ("attention_backend", "norm_backend"):
        if getattr(model, name) not in BACKEND_CHOICES:
            errors.append(
                f"--{name.replace('_', '-')} must be {_one_of(BACKEND_CHOICES)}, got "
                f"{getattr(model, name)!r}"
            )
    return errors


def context_parallel_errors(
    model: ModelConfig, parallel: ParallelConfig, seq_length: int | None
) -> list[str]:
    """Why the sequence cannot be split over ``--context-parallel-size`` ranks as
    ``--cp-comm-type`` says (empty: it can)."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    if model.cp_comm_type not in CP_COMM_TYPES:
        return [f"--cp-comm-type must be {_one_of(CP_COMM_TYPES)}, got {model.cp_comm_type!r}"]
    if cp == 1:
        return []
    errors = []
    sp = tp if model.sequence_parallel else 1
    if seq_length is not None and seq_length % (2 * cp * sp) != 0:
        sp_part = f" x --tensor-model-parallel-size ({tp})" if sp > 1 else ""
        sp_why = ", each sharded over TP by --sequence-parallel" if sp > 1 else ""
        errors.append(
            f"--seq-length ({seq_length}) must be divisible by 2 x --context-parallel-size "
            f"({cp}){sp_part} = {2 * cp * sp}: each CP rank holds two chunks of the "
            f"load-balanced split{sp_why}"
        )
    if model.attention_dropout > 0:
        errors.append(
            f"--attention-dropout ({model.attention_dropout}) is not supported with "
            f"--context-parallel-size ({cp}): use --attention-dropout 0"
        )
    if model.cp_comm_type == "a2a" and model.num_attention_heads % tp == 0:
        heads = model.num_attention_heads // tp
        kv_heads = model.kv_heads // tp if model.kv_heads >= tp else 1
        if heads % cp != 0:
            errors.append(
                f"--cp-comm-type a2a scatters attention heads over --context-parallel-size "
                f"({cp}): the {heads} query heads per TP rank (--num-attention-heads "
                f"{model.num_attention_heads} / --tensor-model-parallel-size {tp}) must be "
                "divisible by it; use --cp-comm-type p2p"
            )
        elif kv_heads % cp != 0:
            errors.append(
                f"--cp-comm-type a2a scatters attention heads over --context-parallel-size "
                f"({cp}): the {kv_heads} K/V heads per TP rank (--num-query-groups "
                f"{model.kv_heads}, --tensor-model-parallel-size {tp}) must be divisible by "
                "it; use --cp-comm-type p2p"
            )
    return errors


def _one_of(choices: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(choice) for choice in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]
