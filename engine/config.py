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


@dataclass
class TrainingConfig:
    """Batch sizes, run length, evaluation, logging and stopping (Megatron's flags)."""

    micro_batch_size: int = 1
    """Sequences per microbatch on one rank (``--micro-batch-size``)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all DP ranks (``--global-batch-size``); None =
    micro batch x DP (no gradient accumulation), as in Megatron."""
    seq_length: int = 2048
    """Tokens per sample (``--seq-length``)."""
    train_iters: int | None = None
    """Optimizer steps to run (``--train-iters``); exclusive with ``train_samples``."""
    train_samples: int | None = None
    """Samples to train on (``--train-samples``): the run lasts train_samples / global batch
    steps and LR spans are counted in samples."""
    eval_interval: int = 1000
    """Evaluate on the validation split every this many steps (``--eval-interval``)."""
    eval_iters: int = 100
    """Validation batches per evaluation (``--eval-iters``); 0 disables evaluation."""
    log_interval: int = 100
    """Print and record metrics every this many steps (``--log-interval``)."""
    exit_interval: int | None = None
    """Save and exit when the iteration is a multiple of this (``--exit-interval``)."""
    exit_duration_in_mins: float | None = None
    """Save and exit after this many minutes of training (``--exit-duration-in-mins``)."""
    exit_on_nan: bool = False
    """Save and exit on a non-finite loss instead of skipping the step (``--exit-on-nan``)."""
    seed: int = 1234
    """Seeds data order, dropout and the parameter init (``--seed``)."""
    peak_tflops: float | None = None
    """Device peak TFLOP/s for MFU (``--peak-tflops``); None = detected from the device."""
    tensorboard_dir: str | None = None
    """Write TensorBoard event files here (``--tensorboard-dir``); None disables them."""
    device_memory_gb: float | None = None
    """Memory of one device in GB (10^9 bytes) that the plan checks against
    (``--device-memory-gb``); None = detected or unchecked."""
    dry_run: bool = False
    """Print the plan (parameters, memory, FLOPs per rank) and exit without training
    (``--dry-run``)."""


@dataclass
class DataConfig:
    """Where the tokens come from and how samples are cut (Megatron's data flags)."""

    data_path: list[str] = dataclasses.field(default_factory=list)
    """Dataset prefixes (``.bin/.idx`` without the suffix), optionally blended with weights:
    ``["0.7", "a", "0.3", "b"]`` (``--data-path 0.7 a 0.3 b``)."""
    split: str = "969,30,1"
    """Relative sizes of the train, validation and test splits (``--split``)."""
    data_cache_path: str | None = None
    """Directory for the cached sample indices (``--data-cache-path``); None = beside the
    data."""
    tokenizer_type: str | None = None
    """Tokenizer family, e.g. ``Llama2Tokenizer``, ``HuggingFaceTokenizer``
    (``--tokenizer-type``)."""
    tokenizer_model: str | None = None
    """Tokenizer file or directory (``--tokenizer-model``)."""
    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token (``--reset-position-ids``)."""
    reset_attention_mask: bool = False
    """Block attention across documents (``--reset-attention-mask``)."""
    eod_mask_loss: bool = False
    """No loss on end-of-document tokens (``--eod-mask-loss``)."""
    sft: bool = False
    """Supervised fine-tuning data: chat conversations, loss on answers only (``--sft``)."""
    chat_template: str = "llama2"
    """How conversations are rendered for ``sft`` (``--chat-template``; see
    `engine.data.sft_dataset.TEMPLATES`)."""
    num_workers: int = 2
    """Data-loader worker processes per rank (``--num-workers``)."""


@dataclass
class CheckpointConfig:
    """Saving and loading (Megatron's checkpoint flags)."""

    save: str | None = None
    """Directory to save checkpoints in (``--save``)."""
    load: str | None = None
    """Directory to load the latest checkpoint from (``--load``)."""
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


@dataclass
class JobConfig:
    """Everything one training job needs; `validate` checks it all before any process group
    starts, and the derived sizes (DP, gradient accumulation) are computed here only."""

    model: ModelConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    ddp: DistributedDataParallelConfig = dataclasses.field(
        default_factory=DistributedDataParallelConfig
    )
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def data_parallel_size(self, world_size: int) -> int:
        """DP = world size / (TP x PP)."""
        model_parallel = (
            self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        )
        if world_size % model_parallel != 0:
            raise ValueError(
                f"world size ({world_size}) must be divisible by --tensor-model-parallel-size x "
                f"--pipeline-model-parallel-size ({model_parallel})"
            )
        return world_size // model_parallel

    def global_batch_size(self, world_size: int) -> int:
        """``--global-batch-size``, or micro batch x DP when it is not given."""
        if self.training.global_batch_size is not None:
            return self.training.global_batch_size
        return self.training.micro_batch_size * self.data_parallel_size(world_size)

    def num_microbatches(self, world_size: int) -> int:
        """Gradient accumulation steps: global batch / (micro batch x DP)."""
        per_step = self.training.micro_batch_size * self.data_parallel_size(world_size)
        return self.global_batch_size(world_size) // per_step

    def validate(self, world_size: int, require_train_length: bool = True) -> None:
        """Run every check; raise one ValueError listing each problem with its flag and value.

        ``require_train_length=False`` skips the ``--train-iters``/``--train-samples`` check
        (planning a layout needs no run length).
        """
        errors: list[str] = []
        try:
            validate(self.model, self.parallel, world_size, self.training.seq_length)
        except ValueError as error:
            errors.append(str(error))
        errors += _training_errors(self, world_size, require_train_length)
        errors += _optimizer_errors(self.optimizer, self.ddp, self.training)
        errors += _data_errors(self.data)
        errors += _checkpoint_errors(self.checkpoint)
        if errors:
            raise ValueError("; ".join(errors))


def _training_errors(job: JobConfig, world_size: int, require_train_length: bool) -> list[str]:
    """Batch sizes, run length and intervals."""
    t, errors = job.training, []
    for flag, value in (("--micro-batch-size", t.micro_batch_size), ("--seq-length", t.seq_length)):
        if value < 1:
            errors.append(f"{flag} must be at least 1, got {value}")
    tp = job.parallel.tensor_model_parallel_size
    pp = job.parallel.pipeline_model_parallel_size
    if world_size >= 1 and tp >= 1 and pp >= 1 and world_size % (tp * pp) == 0:
        dp = job.data_parallel_size(world_size)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size is not None and (
            t.global_batch_size < 1 or per_step < 1 or t.global_batch_size % per_step != 0
        ):
            errors.append(
                f"--global-batch-size ({t.global_batch_size}) must be a positive multiple of "
                f"--micro-batch-size ({t.micro_batch_size}) x data-parallel size ({dp}) = "
                f"{per_step}"
            )
    if t.train_iters is not None and t.train_samples is not None:
        errors.append(
            f"give one of --train-iters ({t.train_iters}) and --train-samples "
            f"({t.train_samples}), not both"
        )
    elif require_train_length and t.train_iters is None and t.train_samples is None:
        errors.append("give --train-iters or --train-samples")
    positive = {
        "--train-iters": t.train_iters,
        "--train-samples": t.train_samples,
        "--eval-interval": t.eval_interval,
        "--log-interval": t.log_interval,
        "--exit-interval": t.exit_interval,
        "--exit-duration-in-mins": t.exit_duration_in_mins,
        "--peak-tflops": t.peak_tflops,
        "--device-memory-gb": t.device_memory_gb,
    }
    errors += [
        f"{flag} must be positive, got {value}"
        for flag, value in positive.items()
        if value is not None and value <= 0
    ]
    if t.eval_iters < 0:
        errors.append(f"--eval-iters must be at least 0, got {t.eval_iters}")
    return errors


def _optimizer_errors(
    opt: OptimizerConfig, ddp: DistributedDataParallelConfig, t: TrainingConfig
) -> list[str]:
    """Mixed precision, the LR schedule's units and the DDP options."""
    # Imported here: the schedule module imports this one.
    from engine.optimizer.lr_schedule import LR_DECAY_STYLES, WD_INCR_STYLES, WSD_DECAY_STYLES

    errors = []
    if opt.fp16 and opt.bf16:
        errors.append("--fp16 and --bf16 are exclusive: choose one")
    if opt.lr <= 0 or not 0 <= opt.min_lr <= opt.lr:
        errors.append(f"need 0 <= --min-lr ({opt.min_lr}) <= --lr ({opt.lr}) and --lr > 0")
    for flag, value, allowed in (
        ("--lr-decay-style", opt.lr_decay_style, LR_DECAY_STYLES),
        ("--lr-wsd-decay-style", opt.lr_wsd_decay_style, WSD_DECAY_STYLES),
        ("--weight-decay-incr-style", opt.weight_decay_incr_style, WD_INCR_STYLES),
    ):
        if value not in allowed:
            errors.append(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    # As in Megatron, spans are counted in the unit of the run length.
    iter_flags = {
        "--lr-warmup-iters": opt.lr_warmup_iters,
        "--lr-decay-iters": opt.lr_decay_iters,
        "--lr-wsd-decay-iters": opt.lr_wsd_decay_iters,
    }
    sample_flags = {
        "--lr-warmup-samples": opt.lr_warmup_samples,
        "--lr-decay-samples": opt.lr_decay_samples,
        "--lr-wsd-decay-samples": opt.lr_wsd_decay_samples,
    }
    if t.train_samples is not None:
        wrong, unit = iter_flags, "--train-samples"
    elif t.train_iters is not None:
        wrong, unit = sample_flags, "--train-iters"
    else:
        wrong, unit = {}, ""
    errors += [
        f"{flag} ({value}) does not apply with {unit}: use the "
        f"{'samples' if unit == '--train-samples' else 'iters'} variant"
        for flag, value in wrong.items()
        if value
    ]
    if opt.lr_warmup_fraction is not None and (opt.lr_warmup_iters or opt.lr_warmup_samples):
        errors.append(
            f"--lr-warmup-fraction ({opt.lr_warmup_fraction}) and --lr-warmup-iters "
            f"({opt.lr_warmup_iters}) / --lr-warmup-samples ({opt.lr_warmup_samples}) are "
            "exclusive"
        )
    if opt.lr_decay_style == "WSD" and not (opt.lr_wsd_decay_iters or opt.lr_wsd_decay_samples):
        errors.append("--lr-decay-style WSD needs --lr-wsd-decay-iters (or -samples)")
    if opt.clip_grad < 0:
        errors.append(f"--clip-grad must be >= 0 (0 disables clipping), got {opt.clip_grad}")
    if ddp.overlap_param_gather and not ddp.use_distributed_optimizer:
        errors.append("--overlap-param-gather needs --use-distributed-optimizer")
    if ddp.bucket_size is not None and ddp.bucket_size < 1:
        errors.append(f"--ddp-bucket-size must be positive, got {ddp.bucket_size}")
    return errors


def _data_errors(data: DataConfig) -> list[str]:
    """Blend weights, split, tokenizer and the EOD options."""
    # Imported here: the data modules import torch and numpy (and this module stays light).
    from engine.data.blended_dataset import parse_data_path
    from engine.data.gpt_dataset import parse_split
    from engine.data.sft_dataset import TEMPLATES
    from engine.data.tokenizer import TOKENIZER_TYPES

    errors = []
    if data.data_path:
        try:
            parse_data_path(data.data_path)
        except ValueError as error:
            errors.append(str(error))
    try:
        parse_split(data.split)
    except ValueError as error:
        errors.append(str(error))
    if data.tokenizer_type is not None and data.tokenizer_type not in TOKENIZER_TYPES:
        errors.append(
            f"--tokenizer-type {data.tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}"
        )
    if (data.tokenizer_type is None) != (data.tokenizer_model is None):
        errors.append(
            f"--tokenizer-type ({data.tokenizer_type}) and --tokenizer-model "
            f"({data.tokenizer_model}) go together"
        )
    eod_options = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
    eod_flags = ["--" + name.replace("_", "-") for name in eod_options if getattr(data, name)]
    if eod_flags and data.tokenizer_type is None:
        errors.append(
            f"{', '.join(eod_flags)} need the end-of-document id: give --tokenizer-type and "
            "--tokenizer-model"
        )
    if data.sft and data.chat_template not in TEMPLATES:
        errors.append(f"--chat-template {data.chat_template!r}: use one of {sorted(TEMPLATES)}")
    if data.num_workers < 0:
        errors.append(f"--num-workers must be at least 0, got {data.num_workers}")
    return errors


def _checkpoint_errors(ckpt: CheckpointConfig) -> list[str]:
    """Save/load options that need a directory."""
    errors = []
    if ckpt.save_interval is not None:
        if ckpt.save is None:
            errors.append(f"--save-interval ({ckpt.save_interval}) needs --save")
        if ckpt.save_interval < 1:
            errors.append(f"--save-interval must be positive, got {ckpt.save_interval}")
    if ckpt.keep_last_n is not None:
        if ckpt.save is None:
            errors.append(f"--keep-last-n ({ckpt.keep_last_n}) needs --save")
        if ckpt.keep_last_n < 1:
            errors.append(f"--keep-last-n must be at least 1, got {ckpt.keep_last_n}")
    if ckpt.finetune and ckpt.load is None:
        errors.append("--finetune needs --load (the checkpoint to start from)")
    return errors
