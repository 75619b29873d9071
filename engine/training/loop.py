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

then every ``--log-interval`` a console line and its scalars to TensorBoard and W&B
(`engine.training.metrics`, `engine.training.wandb_writer`), every ``--eval-interval`` the
validation loss and perplexity, every ``--save-interval`` a checkpoint, and after each
iteration the exit checks (`engine.training.exit`: SIGTERM, ``--exit-interval``,
``--exit-duration-in-mins``), all decided identically on every rank.

Everything that shapes the next iteration is either in the checkpoint (weights, optimizer state
and loss scaler, LR schedule, RNG states, ``consumed_samples``) or a pure function of the
configuration, so a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine import parallel_state
from engine.data.samplers import dataset_length
from engine.device import init_distributed
from engine.models.compile import compile_report
from engine.models.families import ModelFamily, register_family
from engine.pipeline_parallel.schedules import ForwardStepFunc
from engine.training import checkpoint as ckpt
from engine.training.arguments import job_to_dict
from engine.training.config import JobConfig
from engine.training.data import DatasetsProvider, build_datasets
from engine.training.divergence import DivergenceGuard, StepOutcome
from engine.training.exit import ExitConditions, SignalHandler, exit_with_launcher
from engine.training.liveness import StragglerMonitor, describe_failure, is_communication_error
from engine.training.metrics import (
    IntervalMeter,
    ScalarSink,
    TensorBoardWriter,
    detect_peak_tflops,
    memory_gb,
)
from engine.training.preflight import check_save_dir
from engine.training.state import TrainingRun
from engine.training.wandb_writer import WandbWriter, wandb_dir
from engine.wrappers import unwrap


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


# Evaluation -----------------------------------------------------------------------------------


def eval_batches(run: TrainingRun, dataset: torch.utils.data.Dataset | None) -> int:
    """Global batches an evaluation of ``dataset`` takes: ``--eval-iters``, or fewer when the
    split is smaller (packed SFT splits are not sized to the run); 0 means no evaluation."""
    if dataset is None:
        return 0
    return min(run.job.training.eval_iters, dataset_length(dataset) // run.global_batch)


def evaluate(run: TrainingRun, dataset: torch.utils.data.Dataset) -> dict[str, float]:
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


def data_parallel_owner(job: JobConfig) -> str:
    """Which of the overlapping data-parallel mechanisms owns this job (one does)."""
    if job.ddp.use_torch_fsdp2:
        return "FSDP2 shards weights, gradients and optimizer state"
    if job.ddp.use_distributed_optimizer:
        return "DDP reduces gradients, the distributed optimizer (ZeRO-1) shards its state"
    return "DDP reduces gradients, the optimizer state is replicated"


def _print(run: TrainingRun, message: str) -> None:
    if run.rank == 0:
        print(message, flush=True)


def _open_sinks(run: TrainingRun, sinks: list[ScalarSink]) -> None:
    """Appends the sinks the flags ask for (rank 0 only; the caller closes them, also when one
    fails to open). Rank 0 knows every scalar, the loss included: it is all-reduced from the
    last pipeline stage.

    Collective: when rank 0 cannot open one (an unwritable directory, W&B online without a
    login), every rank raises, rather than the others waiting for it in the next collective.
    """
    t = run.job.training
    problem: Exception | None = None
    if run.rank == 0:
        try:
            if t.tensorboard_dir is not None:
                sinks.append(TensorBoardWriter(t.tensorboard_dir))
            if t.wandb_project:
                directory = wandb_dir(t.wandb_save_dir, run.job.checkpoint.save)
                config = job_to_dict(run.job)
                wandb = WandbWriter(t.wandb_project, t.wandb_exp_name, directory, config)
                sinks.append(wandb)
                _print(run, f"W&B run {wandb.run.name} in {wandb.directory}")
        except Exception as error:  # noqa: BLE001 - W&B raises its own types; re-raised below
            problem = error
    failed = torch.tensor([0 if problem is None else 1], device=run.device)
    dist.all_reduce(failed)
    if problem is not None:
        raise problem
    if failed.item():
        raise RuntimeError(
            "rank 0 could not open --tensorboard-dir / --wandb-project logging (see its error)"
        )


def _log(
    run: TrainingRun, meter: IntervalMeter, sinks: Sequence[ScalarSink], iteration: int
) -> None:
    """One console line and its scalars; memory is the maximum over ranks."""
    what, gb = memory_gb(run.device)
    peak = torch.tensor([gb], device=run.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    entry = meter.summary(
        iteration, run.train_iters, lr=run.optimizer.param_groups[0]["lr"],
        loss_scale=run.optimizer.loss_scale, skipped_steps=run.optimizer.skipped_steps,
        nan_iterations=run.nan_iterations, memory=(what, peak.item()),
    )  # fmt: skip
    _print(run, entry.line())
    for sink in sinks:
        sink.scalars(entry.scalars(), iteration)
    meter.reset()


def _log_evaluation(
    run: TrainingRun, sinks: Sequence[ScalarSink], split: str, result: dict[str, float]
) -> None:
    _print(
        run,
        f"{split} at iteration {run.iteration} | loss {result['loss']:.6E} | "
        f"ppl {result['ppl']:.6E}",
    )
    for sink in sinks:
        sink.scalars(
            {f"{split}/loss": result["loss"], f"{split}/ppl": result["ppl"]}, run.iteration
        )


@dataclass
class Providers:
    """What a caller may supply instead of the defaults (Megatron-Core's ``pretrain``
    arguments): the model family, the forward step and the datasets."""

    model_provider: ModelFamily | None = None
    """The family to build (registered, and named in ``job.model.family``); None: the one
    ``job.model.family`` names (the built-in one by default, or ``--model-provider``'s)."""
    forward_step_func: ForwardStepFunc | None = None
    """``fn(data_iterator, model) -> (output, loss_func)``; None: `engine.training.step`'s."""
    datasets_provider: DatasetsProvider | None = None
    """``fn(job, global_batch_size, train_iters, tokenizer) -> Datasets``; None: the GPT /
    blended / SFT datasets of ``--data-path`` (`engine.training.data.build_datasets`)."""


def _train(job: JobConfig, finetuning: bool, providers: Providers) -> TrainResult:
    """Set up, load, train, evaluate and save; see the module docstring."""
    exit_with_launcher()
    device = init_distributed(timeout_s=job.training.distributed_timeout_minutes * 60)
    job.validate(dist.get_world_size())
    if providers.model_provider is not None:
        family = register_family(providers.model_provider)
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, family=family.name))
    run = TrainingRun(job, device, providers.forward_step_func)
    t = job.training
    sinks: list[ScalarSink] = []
    try:
        run.phase = "setting up (the --save check, loading, datasets)"
        check_save_dir(job.checkpoint.save, run.model_config, not job.checkpoint.no_save_optim)
        _open_sinks(run, sinks)
        loaded = ckpt.load(run, finetuning)
        if loaded is not None:
            _print(run, f"loaded {loaded} at iteration {run.iteration}")
        datasets_provider = providers.datasets_provider or build_datasets
        run.datasets = datasets_provider(job, run.global_batch, run.train_iters, run.tokenizer)
        result = TrainResult(run.iteration, run.consumed_samples)
        with SignalHandler() as handler:
            exits = ExitConditions(t.exit_interval, t.exit_duration_in_mins, handler)
            _loop(run, sinks, result, exits)
        return result
    except Exception as error:
        if is_communication_error(error):
            raise describe_failure(
                error, run.phase, run.iteration + 1, t.distributed_timeout_minutes
            ) from error
        raise
    finally:
        for sink in sinks:
            sink.close()
        parallel_state.destroy_model_parallel()


def _loop(
    run: TrainingRun, sinks: Sequence[ScalarSink], result: TrainResult, exits: ExitConditions
) -> None:
    """Iterations from the loaded one to the last (or an exit); fills ``result``."""
    job, t = run.job, run.job.training
    peak = t.peak_tflops if t.peak_tflops is not None else detect_peak_tflops(run.device)
    meter = IntervalMeter(run.model_config, t.seq_length, run.world_size, peak)
    datasets = run.datasets
    assert datasets is not None, "built before the loop"
    train_iterators = run.iterators(datasets.train, run.consumed_samples)
    tokens_per_iteration = run.global_batch * t.seq_length
    # A loaded checkpoint is already saved: a run with nothing left to do writes no copy.
    saved_at = run.iteration if run.iteration > 0 else None
    # The validation split, if there is one and it holds a global batch.
    valid = datasets.valid if eval_batches(run, datasets.valid) > 0 else None
    guard = DivergenceGuard(
        t.check_for_nan_in_loss_and_grad, t.max_consecutive_skipped_steps,
        fp16=job.optimizer.fp16, warn=run.rank == 0,
    )  # fmt: skip
    _print(
        run,
        f"training {run.train_iters} iterations from iteration {run.iteration}: global batch "
        f"{run.global_batch} = micro batch {t.micro_batch_size} x {run.num_microbatches} "
        f"microbatches x DP {parallel_state.get_data_parallel_world_size()}; "
        f"{data_parallel_owner(job)}",
    )
    stragglers = StragglerMonitor(t.distributed_timeout_minutes, warn=run.rank == 0)
    report_compile = t.compile or t.compile_loss_head
    while run.iteration < run.train_iters:
        start = time.perf_counter()
        run.optimizer.zero_grad()
        run.phase = "the forward-backward pass (pipeline sends/receives, gradient reduction)"
        loss = run.run_schedule(train_iterators, forward_only=False)
        outcome = StepOutcome(run.iteration + 1, loss, updated=False, grad_norm=None)
        if math.isfinite(loss):
            run.phase = "the optimizer step (gradient norm, parameter all-gather)"
            step = run.optimizer.step()
            outcome.updated, outcome.grad_norm = step.updated, step.grad_norm
            outcome.rescalable_overflow = step.grad_norm is None and run.optimizer.can_rescale
            if step.updated:
                run.scheduler.step(run.scheduler_increment)
        else:
            run.nan_iterations += 1  # the gradients are discarded by the next zero_grad
        run.iteration += 1
        run.consumed_samples += run.global_batch
        result.losses[run.iteration] = loss
        meter.add(loss, outcome.grad_norm, tokens_per_iteration, time.perf_counter() - start)
        if report_compile:  # the first iteration compiled the layers (forward and backward)
            report_compile = False
            _print(run, compile_report(unwrap(chunk) for chunk in run.chunks))

        run.phase = "logging"
        if run.iteration % t.log_interval == 0:
            _log(run, meter, sinks, run.iteration)
        guard.observe(outcome, run.optimizer.loss_scale)  # raises once the run has diverged
        run.phase = "evaluation"
        if valid is not None and run.iteration % t.eval_interval == 0:
            evaluation_start = time.perf_counter()
            result.evaluations[run.iteration] = evaluate(run, valid)
            _log_evaluation(run, sinks, "validation", result.evaluations[run.iteration])
            start += time.perf_counter() - evaluation_start  # slow by design: not a straggler
        run.phase = "the exit check (SIGTERM, time limit)"
        reason = exits.reason(run.iteration)
        if reason is None and not math.isfinite(loss) and t.exit_on_nan:
            reason = f"non-finite loss ({loss}) with --exit-on-nan"
        every = job.checkpoint.save_interval
        due = every is not None and run.iteration % every == 0
        if due and guard.in_streak:
            # A step skipped for non-finite values may be the start of a divergence: saving it
            # could push the last checkpoint from before it out of --keep-last-n.
            _print(run, f"not saving at iteration {run.iteration}: inside a run of skipped steps")
            due = False
        run.phase = "saving a checkpoint"
        result.checkpoint = ckpt.poll(run) or result.checkpoint  # an --async-save published
        if job.checkpoint.save and (reason or due):
            # None: not saved (non-finite state); the last good checkpoint stays the result.
            save_start = time.perf_counter()
            result.checkpoint, saved_at = ckpt.save(run) or result.checkpoint, run.iteration
            start += time.perf_counter() - save_start  # slow by design: not a straggler
        if reason is not None:
            result.exit_reason = reason
            _print(run, f"exiting at iteration {run.iteration}: {reason}")
            break
        # The whole iteration but evaluation: a stalled peer holds up any collective in it.
        stragglers.observe(run.iteration, time.perf_counter() - start)
    run.phase = "the final evaluation and save"
    if result.exit_reason is None:
        if valid is not None and run.iteration not in result.evaluations:
            result.evaluations[run.iteration] = evaluate(run, valid)
            _log_evaluation(run, sinks, "validation", result.evaluations[run.iteration])
        if datasets.test is not None and eval_batches(run, datasets.test) > 0:
            result.test = evaluate(run, datasets.test)
            _log_evaluation(run, sinks, "test", result.test)
        if job.checkpoint.save and saved_at != run.iteration:
            result.checkpoint = ckpt.save(run) or result.checkpoint
    result.checkpoint = ckpt.finish(run) or result.checkpoint  # waits for an --async-save
    result.iteration, result.consumed_samples = run.iteration, run.consumed_samples
    result.skipped_steps, result.nan_iterations = run.optimizer.skipped_steps, run.nan_iterations


# Entry points ---------------------------------------------------------------------------------


def pretrain(
    job: JobConfig,
    model_provider: ModelFamily | None = None,
    forward_step_func: ForwardStepFunc | None = None,
    datasets_provider: DatasetsProvider | None = None,
) -> TrainResult:
    """Pretrain on ``--data-path`` (GPT / blended datasets) as ``job`` says, or on what the
    providers give (see `Providers`: a model family of your own, its forward step, datasets).

    Starts the default process group if needed (torchrun's environment, or a group of one),
    builds the TP/PP/DP groups, trains, and tears the groups down again (the default group
    stays up for the caller). ``--load`` resumes exactly where a checkpoint stopped.
    """
    providers = Providers(model_provider, forward_step_func, datasets_provider)
    return _train(job, finetuning=False, providers=providers)


def finetune(
    job: JobConfig,
    model_provider: ModelFamily | None = None,
    forward_step_func: ForwardStepFunc | None = None,
    datasets_provider: DatasetsProvider | None = None,
) -> TrainResult:
    """Supervised fine-tuning (``--sft`` data: chat JSONL or its preprocessed prefix) from the
    weights of ``--load``.

    The first run loads weights only (fresh optimizer, schedule and data position); once this
    run has saved to ``--save``, a restart resumes from its own latest checkpoint exactly.
    """
    job = dataclasses.replace(job, data=dataclasses.replace(job.data, sft=True))
    providers = Providers(model_provider, forward_step_func, datasets_provider)
    return _train(job, finetuning=True, providers=providers)
