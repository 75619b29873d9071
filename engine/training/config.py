"""One training job: `TrainingConfig` (batch sizes, run length, evaluation, logging,
stopping) and `JobConfig`, which composes every section's config and validates them together
before any process group starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.checkpointing.config import CheckpointConfig
from engine.data.config import DataConfig
from engine.distributed.config import DistributedDataParallelConfig
from engine.models.backends import resolve_backend
from engine.models.config import ModelConfig, layout_errors
from engine.optimizer.config import OptimizerConfig
from engine.parallel_state import ParallelConfig
from engine.peft.config import LoraConfig
from engine.training.wandb_writer import wandb_import_problem


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
    check_for_nan_in_loss_and_grad: bool = True
    """Stop the run once more than ``--max-consecutive-skipped-steps`` consecutive steps had a
    non-finite loss or gradients (``--check-for-nan-in-loss-and-grad``, on by default as in
    Megatron; ``--no-check-for-nan-in-loss-and-grad`` only skips such steps)."""
    max_consecutive_skipped_steps: int = 10
    """Consecutive steps with a non-finite loss or gradients tolerated before the run stops as
    diverged (``--max-consecutive-skipped-steps``); fp16 overflows while the dynamic loss
    scale can still back off do not count."""
    distributed_timeout_minutes: float = 10.0
    """How long a collective may wait for its peers before the job fails, naming the rank
    and the operation (``--distributed-timeout-minutes``, Megatron's default 10)."""
    seed: int = 1234
    """Seeds data order, dropout and the parameter init (``--seed``)."""
    compile: bool = False
    """torch.compile each decoder layer (``--compile``, `engine.models.compile`); compiling
    happens in the first iteration and its time is logged once."""
    compile_loss_head: bool = False
    """torch.compile the last stage's output head and loss as one graph
    (``--compile-loss-head``): the whole logits, which the compiler fuses with the cross
    entropy, instead of the chunked head (whose hand-written backward does not trace), so it
    takes ``--cross-entropy-chunk-size`` 0."""
    peak_tflops: float | None = None
    """Device peak TFLOP/s for MFU (``--peak-tflops``); None = detected from the device."""
    tensorboard_dir: str | None = None
    """Write TensorBoard event files here (``--tensorboard-dir``); None disables them."""
    wandb_project: str | None = None
    """Log the same scalars to this Weights & Biases project (``--wandb-project``; None or
    empty: no W&B, as in Megatron). Needs the ``wandb`` extra; ``WANDB_MODE=offline`` logs with
    no network."""
    wandb_exp_name: str | None = None
    """The W&B run's name (``--wandb-exp-name``); None: one W&B makes up."""
    wandb_save_dir: str | None = None
    """Where W&B keeps the run's files, under ``<dir>/wandb/`` (``--wandb-save-dir``); None:
    ``<--save>/wandb`` as in Megatron, or the working directory without ``--save``."""
    device_memory_gb: float | None = None
    """Memory of one device in GB (10^9 bytes) that the plan checks against
    (``--device-memory-gb``); None = detected or unchecked."""
    dry_run: bool = False
    """Print the plan (parameters, memory, FLOPs per rank) and exit without training
    (``--dry-run``)."""

    def errors(self, dp: int | None, require_train_length: bool = True) -> list[str]:
        """Batch sizes, run length and intervals, with ``dp`` data-parallel ranks (None when
        the layout gives none: the global batch is then not checked)."""
        errors = []
        for flag, value in (
            ("--micro-batch-size", self.micro_batch_size),
            ("--seq-length", self.seq_length),
        ):
            if value < 1:
                errors.append(f"{flag} must be at least 1, got {value}")
        if dp is not None:
            per_step = self.micro_batch_size * dp
            if self.global_batch_size is not None and (
                self.global_batch_size < 1 or per_step < 1 or self.global_batch_size % per_step != 0
            ):
                errors.append(
                    f"--global-batch-size ({self.global_batch_size}) must be a positive multiple "
                    f"of --micro-batch-size ({self.micro_batch_size}) x data-parallel size "
                    f"({dp}) = {per_step}"
                )
        if self.train_iters is not None and self.train_samples is not None:
            errors.append(
                f"give one of --train-iters ({self.train_iters}) and --train-samples "
                f"({self.train_samples}), not both"
            )
        elif require_train_length and self.train_iters is None and self.train_samples is None:
            errors.append("give --train-iters or --train-samples")
        positive = {
            "--train-iters": self.train_iters,
            "--train-samples": self.train_samples,
            "--eval-interval": self.eval_interval,
            "--log-interval": self.log_interval,
            "--exit-interval": self.exit_interval,
            "--exit-duration-in-mins": self.exit_duration_in_mins,
            "--peak-tflops": self.peak_tflops,
            "--device-memory-gb": self.device_memory_gb,
            "--distributed-timeout-minutes": self.distributed_timeout_minutes,
        }
        errors += [
            f"{flag} must be positive, got {value}"
            for flag, value in positive.items()
            if value is not None and value <= 0
        ]
        if self.eval_iters < 0:
            errors.append(f"--eval-iters must be at least 0, got {self.eval_iters}")
        if self.max_consecutive_skipped_steps < 0:
            errors.append(
                "--max-consecutive-skipped-steps must be at least 0, got "
                f"{self.max_consecutive_skipped_steps}"
            )
        return errors + self.wandb_errors()

    def wandb_errors(self) -> list[str]:
        """The W&B flags: their siblings need ``--wandb-project``, which needs the package
        (imported here, so that a missing one is a usage error before any process starts)."""
        if not self.wandb_project:
            return [
                f"{flag} ({value}) needs --wandb-project"
                for flag, value in (("--wandb-exp-name", self.wandb_exp_name),
                                    ("--wandb-save-dir", self.wandb_save_dir))
                if value
            ]  # fmt: skip
        problem = wandb_import_problem()
        return [] if problem is None else [f"--wandb-project {self.wandb_project}: {problem}"]


@dataclass
class JobConfig:
    """Everything one training job needs, one section per owner; `validate` runs every
    section's own checks before any process group starts, and the derived sizes (DP, gradient
    accumulation) are computed here only."""

    model: ModelConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    ddp: DistributedDataParallelConfig = dataclasses.field(
        default_factory=DistributedDataParallelConfig
    )
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    lora: LoraConfig | None = None
    """Train LoRA adapters on a frozen base (``--lora-rank`` and its siblings); None: every
    parameter trains."""

    def data_parallel_size(self, world_size: int) -> int:
        """DP = world size / (TP x CP x PP)."""
        problems = self.parallel.errors(world_size)
        if problems:
            raise ValueError("; ".join(problems))
        return world_size // self.parallel.replica_size

    def global_batch_size(self, world_size: int) -> int:
        """``--global-batch-size``, or micro batch x DP when it is not given."""
        if self.training.global_batch_size is not None:
            return self.training.global_batch_size
        return self.training.micro_batch_size * self.data_parallel_size(world_size)

    def num_microbatches(self, world_size: int) -> int:
        """Gradient accumulation steps: global batch / (micro batch x DP)."""
        per_step = self.training.micro_batch_size * self.data_parallel_size(world_size)
        return self.global_batch_size(world_size) // per_step

    def packed_document_errors(self) -> list[str]:
        """Packed documents (``--sft`` rows, ``--reset-attention-mask``) under ring attention
        need masks across blocks of different positions, which the Triton kernels lack."""
        documents = self.data.sft or self.data.reset_attention_mask
        cp = self.parallel.context_parallel_size
        model = self.model
        if not documents or cp == 1 or model.cp_comm_type != "p2p":
            return []
        if resolve_backend(model.attention_backend) != "triton":
            return []
        flag = "--sft" if self.data.sft else "--reset-attention-mask"
        return [
            f"{flag} packs documents, which ring attention (--cp-comm-type p2p, "
            f"--context-parallel-size {cp}) masks with the torch attention backend only, not "
            f"--attention-backend {model.attention_backend} (Triton): use --cp-comm-type a2a "
            "or --attention-backend torch"
        ]

    def validate(self, world_size: int, require_train_length: bool = True) -> None:
        """Run every check; raise one ValueError listing each problem with its flag and value.

        ``require_train_length=False`` skips the ``--train-iters``/``--train-samples`` check
        (planning a layout needs no run length).
        """
        t = self.training
        errors = layout_errors(self.model, self.parallel, world_size, t.seq_length)
        dp = None
        if world_size >= 1 and not self.parallel.errors(world_size):
            dp = self.data_parallel_size(world_size)
        errors += t.errors(dp, require_train_length)
        errors += self.optimizer.errors(t.train_iters, t.train_samples)
        errors += self.ddp.errors()
        errors += self.data.errors()
        errors += self.packed_document_errors()
        errors += self.checkpoint.errors()
        chunk = self.model.cross_entropy_chunk_size
        if t.compile_loss_head and chunk:
            errors.append(
                f"--compile-loss-head compiles the head over the whole logits: "
                f"--cross-entropy-chunk-size must be 0 or unset, got {chunk}"
            )
        if self.lora is not None:
            errors += self.lora.errors()
        else:
            c = self.checkpoint
            for flag, value in (("--pretrained-checkpoint", c.pretrained_checkpoint),
                                ("--load-peft-adapter", c.load_peft_adapter)):  # fmt: skip
                if value is not None:
                    errors.append(f"{flag} is for a LoRA run: give --lora-rank")
        if errors:
            raise ValueError("; ".join(errors))
