"""The training loop: `pretrain` and `finetune`.

One iteration, on every rank (Megatron-LM's order)::

    optimizer.zero_grad()                          # the DDP gradient buffers
    losses = forward_backward_func(...)            # the pipeline schedule over m microbatches,
                                                   # DDP's no_sync / grad-sync hooks, then
                                                   # finalize_model_grads (DP, TP, embedding)
    loss = the global mean loss                    # one all-reduce; every rank knows it
    if loss is finite: optimizer.step()            # unscale, clip, AdamW, (ZeRO) all-gather
                       scheduler.step(...)         # LR and weight decay of the next step
    else: skip the step, count it (or save and stop with --exit-on-nan)

then every ``--log-interval`` a console line and TensorBoard scalars (`engine.metrics`), every
``--eval-interval`` the validation loss and perplexity, every ``--save-interval`` a checkpoint,
and after each iteration the exit checks (`engine.signals`: SIGTERM, ``--exit-interval``,
``--exit-duration-in-mins``), all decided identically on every rank.

Everything that shapes the next iteration is either in the checkpoint (weights, optimizer state
and loss scaler, LR schedule, RNG states, ``consumed_samples``) or a pure function of the
configuration, so a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine import training_checkpoint as ckpt
from engine.config import JobConfig, ModelConfig
from engine.device import init_distributed
from engine.distributed import DistributedDataParallel, finalize_model_grads
from engine.metrics import IntervalMeter, TensorBoardWriter, detect_peak_tflops, memory_gb
from engine.optimizer import build_lr_scheduler, build_optimizer
from engine.pipeline_parallel.partition import build_model_chunks
from engine.pipeline_parallel.schedules import get_forward_backward_func
from engine.signals import ExitConditions, SignalHandler
from engine.tensor_parallel.random import model_parallel_seed
from engine.training_data import (
    Batch,
    Datasets,
    batch_iterator,
    build_datasets,
    build_job_tokenizer,
    iterations_for,
)


@dataclass
class TrainResult:
    """What a run did, returned on every rank."""

    iteration: int
    """The last completed iteration."""
    consumed_samples: int
    losses: dict[int, float] = field(default_factory=dict)
    """The global training loss of every iteration this run executed (nan when skipped)."""
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)
    """Iteration -> ``{"loss", "ppl"}`` of the validation split."""
    test: dict[str, float] | None = None
    """``{"loss", "ppl"}`` of the test split, evaluated once at the end."""
    skipped_steps: int = 0
    nan_iterations: int = 0
    exit_reason: str | None = None
    """Why the run stopped early (None: it reached the last iteration)."""
    checkpoint: str | None = None
    """The directory of the last checkpoint saved, if any."""


# The forward step ------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def forward_step(
    data_iterator: Iterator[Batch], model: nn.Module
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """One microbatch through one model chunk (the schedules' ``forward_step_func``).

    Every chunk reads the batch (so all chunks' iterators stay in step); the first stage uses
    the tokens, the last the labels and loss mask. The loss of a microbatch is the mean of its
    per-token losses over the loss mask (what Megatron's GPT loss is).
    """
    batch = next(data_iterator)
    inner = _unwrap(model)
    output = model(
        batch["tokens"] if inner.pre_process else None,
        position_ids=batch["position_ids"],
        labels=batch["labels"] if inner.post_process else None,
    )
    mask = batch["loss_mask"].float()

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A row with no loss tokens (possible in SFT) gives 0, not 0/0.
        loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, loss.detach()

    return output, loss_func


# Setup ----------------------------------------------------------------------------------------


def _model_config(job: JobConfig, tokenizer_vocab: int | None) -> ModelConfig:
    """The model as trained: the tokenizer's vocabulary (when there is a tokenizer: the
    embedding must cover its ids) and the parameters in the precision flags' dtype."""
    dtype = job.model.params_dtype
    if job.optimizer.bf16:
        dtype = torch.bfloat16
    elif job.optimizer.fp16:
        dtype = torch.float16
    vocab = job.model.vocab_size if tokenizer_vocab is None else tokenizer_vocab
    return dataclasses.replace(job.model, vocab_size=vocab, params_dtype=dtype)


class _Run:
    """The state of one training run on this rank: process groups, model chunks in DDP,
    optimizer, LR schedule, counters (built here, driven by `_loop`)."""

    def __init__(self, job: JobConfig, device: torch.device):
        world = dist.get_world_size()
        self.job, self.device, self.world_size = job, device, world
        self.rank = dist.get_rank()
        self.global_batch = job.global_batch_size(world)
        self.num_microbatches = job.num_microbatches(world)
        t = job.training
        self.train_iters = iterations_for(t.train_iters, t.train_samples, self.global_batch)
        self.tokenizer = build_job_tokenizer(job.data)
        vocab = None if self.tokenizer is None else self.tokenizer.vocab_size
        self.model_config = _model_config(job, vocab)
        p = job.parallel
        parallel_state.initialize_model_parallel(
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.virtual_pipeline_model_parallel_size,
        )
        model_parallel_seed(t.seed)
        self.chunks = [
            DistributedDataParallel(chunk.to(device), job.ddp)
            for chunk in build_model_chunks(self.model_config)
        ]
        self.optimizer = build_optimizer(job.optimizer, self.chunks)
        if t.train_samples is not None:
            self.scheduler = build_lr_scheduler(
                self.optimizer, job.optimizer, train_samples=t.train_samples
            )
            self.scheduler_increment = self.global_batch
        else:
            self.scheduler = build_lr_scheduler(
                self.optimizer, job.optimizer, train_iters=self.train_iters
            )
            self.scheduler_increment = 1
        self.iteration, self.consumed_samples = 0, 0
        self.nan_iterations = 0
        self.datasets: Datasets | None = None
        self.forward_backward = get_forward_backward_func()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def iterators(self, dataset: torch.utils.data.Dataset, consumed: int) -> list[Iterator]:
        """One batch iterator per model chunk (interleaving runs every chunk on the same
        microbatches), starting after ``consumed`` samples."""
        shuffle = self.job.data.sft and dataset is self.datasets.train
        return [
            batch_iterator(
                dataset,
                consumed,
                self.job.training.micro_batch_size,
                self.dp_rank,
                parallel_state.get_data_parallel_world_size(),
                shuffle,
                self.job.training.seed,
                self.job.data.num_workers,
                self.device,
            )
            for _ in self.chunks
        ]

    def run_schedule(self, iterators: list[Iterator], forward_only: bool) -> float:
        """Forward (and backward) one global batch; return its global mean loss on every rank."""
        logged = self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=self.job.training.seq_length,
            micro_batch_size=self.job.training.micro_batch_size,
            forward_only=forward_only,
            no_sync_func=[c.no_sync for c in self.chunks],
            grad_sync_func=[c.start_grad_sync for c in self.chunks],
            finalize_model_grads_func=finalize_model_grads,
            grad_scale_func=None if forward_only else self.optimizer.scale_loss,
        )
        return self.global_loss(logged)

    def global_loss(self, logged: list[torch.Tensor]) -> float:
        """Mean over microbatches and DP replicas of the microbatch losses (what the gradient
        is the gradient of). The last stage's TP rank 0 contributes; one world all-reduce."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if logged and parallel_state.get_tensor_model_parallel_rank() == 0:
            total[0] = sum(float(loss) for loss in logged)
            total[1] = len(logged)
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def sync_params(self) -> None:
        """Finish overlapped parameter all-gathers (distributed optimizer) before the
        parameters are read outside a forward (evaluation, checkpoints)."""
        for chunk in self.chunks:
            chunk.finish_param_sync()


# Evaluation -----------------------------------------------------------------------------------


def eval_batches(run: _Run, dataset: torch.utils.data.Dataset | None) -> int:
    """Global batches an evaluation of ``dataset`` takes: ``--eval-iters``, or fewer when the
    split is smaller (packed SFT splits are not sized to the run); 0 means no evaluation."""
    if dataset is None:
        return 0
    return min(run.job.training.eval_iters, len(dataset) // run.global_batch)


def evaluate(run: _Run, dataset: torch.utils.data.Dataset) -> dict[str, float]:
    """Mean loss and perplexity over `eval_batches` global batches of ``dataset`` (the same
    batches every time), with no gradients."""
    run.sync_params()
    for chunk in run.chunks:
        chunk.eval()
    iterators = run.iterators(dataset, 0)
    try:
        with torch.no_grad():
            losses = [
                run.run_schedule(iterators, forward_only=True)
                for _ in range(eval_batches(run, dataset))
            ]
    finally:
        for chunk in run.chunks:
            chunk.train()
    loss = sum(losses) / len(losses)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


# The loop -------------------------------------------------------------------------------------


def _print(run: _Run, message: str) -> None:
    if run.rank == 0:
        print(message, flush=True)


def _log(run: _Run, meter: IntervalMeter, writer: TensorBoardWriter | None, iteration: int) -> None:
    """One console line and its TensorBoard scalars; memory is the maximum over ranks."""
    what, gb = memory_gb(run.device)
    peak = torch.tensor([gb], device=run.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    entry = meter.summary(
        iteration, run.train_iters, lr=run.optimizer.param_groups[0]["lr"],
        loss_scale=run.optimizer.loss_scale, skipped_steps=run.optimizer.skipped_steps,
        nan_iterations=run.nan_iterations, memory=(what, peak.item()),
    )  # fmt: skip
    _print(run, entry.line())
    if writer is not None:
        writer.scalars(entry.scalars(), iteration)
    meter.reset()


def _log_evaluation(
    run: _Run, writer: TensorBoardWriter | None, split: str, result: dict[str, float]
) -> None:
    _print(
        run,
        f"{split} at iteration {run.iteration} | loss {result['loss']:.6E} | "
        f"ppl {result['ppl']:.6E}",
    )
    if writer is not None:
        writer.scalars(
            {f"{split}/loss": result["loss"], f"{split}/ppl": result["ppl"]}, run.iteration
        )


def _train(job: JobConfig, finetuning: bool) -> TrainResult:
    """Set up, load, train, evaluate and save; see the module docstring."""
    device = init_distributed()
    job.validate(dist.get_world_size())
    run = _Run(job, device)
    t = job.training
    writer = None
    try:
        if t.tensorboard_dir is not None and run.rank == 0:
            writer = TensorBoardWriter(t.tensorboard_dir)
        loaded = ckpt.load(run, finetuning)
        if loaded is not None:
            _print(run, f"loaded {loaded} at iteration {run.iteration}")
        run.datasets = build_datasets(job, run.global_batch, run.train_iters, run.tokenizer)
        result = TrainResult(run.iteration, run.consumed_samples)
        with SignalHandler() as handler:
            exits = ExitConditions(t.exit_interval, t.exit_duration_in_mins, handler)
            _loop(run, writer, result, exits)
        return result
    finally:
        if writer is not None:
            writer.close()
        parallel_state.destroy_model_parallel()


def _loop(
    run: _Run, writer: TensorBoardWriter | None, result: TrainResult, exits: ExitConditions
) -> None:
    """Iterations from the loaded one to the last (or an exit); fills ``result``."""
    job, t = run.job, run.job.training
    peak = t.peak_tflops if t.peak_tflops is not None else detect_peak_tflops(run.device)
    meter = IntervalMeter(run.model_config, t.seq_length, run.world_size, peak)
    train_iterators = run.iterators(run.datasets.train, run.consumed_samples)
    tokens_per_iteration = run.global_batch * t.seq_length
    # A loaded checkpoint is already saved: a run with nothing left to do writes no copy.
    saved_at = run.iteration if run.iteration > 0 else None
    can_evaluate = eval_batches(run, run.datasets.valid) > 0
    _print(
        run,
        f"training {run.train_iters} iterations from iteration {run.iteration}: global batch "
        f"{run.global_batch} = micro batch {t.micro_batch_size} x {run.num_microbatches} "
        f"microbatches x DP {parallel_state.get_data_parallel_world_size()}",
    )
    while run.iteration < run.train_iters:
        start = time.perf_counter()
        run.optimizer.zero_grad()
        loss = run.run_schedule(train_iterators, forward_only=False)
        grad_norm = None
        if math.isfinite(loss):
            step = run.optimizer.step()
            grad_norm = step.grad_norm
            if step.updated:
                run.scheduler.step(run.scheduler_increment)
        else:
            run.nan_iterations += 1  # the gradients are discarded by the next zero_grad
        run.iteration += 1
        run.consumed_samples += run.global_batch
        result.losses[run.iteration] = loss
        meter.add(loss, grad_norm, tokens_per_iteration, time.perf_counter() - start)

        if run.iteration % t.log_interval == 0:
            _log(run, meter, writer, run.iteration)
        if can_evaluate and run.iteration % t.eval_interval == 0:
            result.evaluations[run.iteration] = evaluate(run, run.datasets.valid)
            _log_evaluation(run, writer, "validation", result.evaluations[run.iteration])
        reason = exits.reason(run.iteration)
        if reason is None and not math.isfinite(loss) and t.exit_on_nan:
            reason = f"non-finite loss ({loss}) with --exit-on-nan"
        every = job.checkpoint.save_interval
        if job.checkpoint.save and (reason or (every and run.iteration % every == 0)):
            result.checkpoint, saved_at = ckpt.save(run), run.iteration
        if reason is not None:
            result.exit_reason = reason
            _print(run, f"exiting at iteration {run.iteration}: {reason}")
            break
    if result.exit_reason is None:
        if can_evaluate and run.iteration not in result.evaluations:
            result.evaluations[run.iteration] = evaluate(run, run.datasets.valid)
            _log_evaluation(run, writer, "validation", result.evaluations[run.iteration])
        if eval_batches(run, run.datasets.test) > 0:
            result.test = evaluate(run, run.datasets.test)
            _log_evaluation(run, writer, "test", result.test)
        if job.checkpoint.save and saved_at != run.iteration:
            result.checkpoint = ckpt.save(run)
    result.iteration, result.consumed_samples = run.iteration, run.consumed_samples
    result.skipped_steps, result.nan_iterations = run.optimizer.skipped_steps, run.nan_iterations


# Entry points ---------------------------------------------------------------------------------


def pretrain(job: JobConfig) -> TrainResult:
    """Pretrain on ``--data-path`` (GPT / blended datasets) as ``job`` says.

    Starts the default process group if needed (torchrun's environment, or a group of one),
    builds the TP/PP/DP groups, trains, and tears the groups down again (the default group
    stays up for the caller). ``--load`` resumes exactly where a checkpoint stopped.
    """
    return _train(job, finetuning=False)


def finetune(job: JobConfig) -> TrainResult:
    """Supervised fine-tuning (``--sft`` data: chat JSONL or its preprocessed prefix) from the
    weights of ``--load``.

    The first run loads weights only (fresh optimizer, schedule and data position); once this
    run has saved to ``--save``, a restart resumes from its own latest checkpoint exactly.
    """
    job = dataclasses.replace(job, data=dataclasses.replace(job.data, sft=True))
    return _train(job, finetuning=True)
