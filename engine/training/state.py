"""The state of one training run on this rank: process groups, model chunks in DDP,
optimizer, LR schedule, data iterators and counters (built here, driven by
`engine.training.loop`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from engine import parallel_state
from engine.checkpointing import read_latest_iteration
from engine.distributed import (
    DataParallelChunk,
    DistributedDataParallel,
    FullyShardedDataParallel,
    finalize_model_grads,
)
from engine.models.build import build_model_chunks
from engine.models.compile import compile_layers, compile_loss_head
from engine.models.config import ModelConfig
from engine.optimizer import build_lr_scheduler, build_optimizer
from engine.peft import apply_lora
from engine.pipeline_parallel.schedules import ForwardStepFunc, get_forward_backward_func
from engine.tensor_parallel.random import model_parallel_seed
from engine.training.config import JobConfig
from engine.training.data import Datasets, batch_iterator, build_job_tokenizer, iterations_for
from engine.training.step import forward_step


def compute_dtype(job: JobConfig) -> torch.dtype:
    """The dtype layers compute in: the precision flags', else the model's."""
    if job.optimizer.bf16:
        return torch.bfloat16
    if job.optimizer.fp16:
        return torch.float16
    return job.model.params_dtype


def _model_config(job: JobConfig, tokenizer_vocab: int | None) -> ModelConfig:
    """The model as trained: the tokenizer's vocabulary (when there is a tokenizer: the
    embedding must cover its ids), the whole-logits head under ``--compile-loss-head``, and
    the parameters in the precision flags' dtype; under FSDP2 they stay float32 (the sharded
    master weights) and FSDP casts them for compute."""
    vocab = job.model.vocab_size if tokenizer_vocab is None else tokenizer_vocab
    model = dataclasses.replace(job.model, vocab_size=vocab)
    if job.training.compile_loss_head:  # the compiled head takes the whole logits
        model = dataclasses.replace(model, cross_entropy_chunk_size=0)
    if job.ddp.use_torch_fsdp2:
        return dataclasses.replace(model, pipeline_dtype=compute_dtype(job))
    return dataclasses.replace(model, params_dtype=compute_dtype(job))


def loads_every_weight(job: JobConfig) -> bool:
    """Whether `engine.training.checkpoint.load` fills every weight of the model at the start,
    from either entry point (`pretrain`, `finetune`): ``--load`` with ``--finetune`` (which
    must hold a checkpoint) or holding one, or a LoRA run's ``--pretrained-checkpoint`` (the
    base; its adapters are attached after, initialised). The model is then built
    uninitialised. A ``--load`` that holds no checkpoint yet trains from scratch: initialised.
    """
    checkpoint = job.checkpoint
    if job.lora is not None:
        return checkpoint.pretrained_checkpoint is not None
    if checkpoint.load is None:
        return False
    return checkpoint.finetune or read_latest_iteration(checkpoint.load) is not None


class TrainingRun:
    """The state of one training run on this rank: process groups, model chunks in DDP,
    optimizer, LR schedule, counters (built here, driven by `_loop`)."""

    def __init__(
        self,
        job: JobConfig,
        device: torch.device,
        forward_step_func: ForwardStepFunc | None = None,
    ):
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
            timeout=timedelta(minutes=t.distributed_timeout_minutes),
            context_parallel_size=p.context_parallel_size,
        )
        model_parallel_seed(t.seed)
        # Built where it trains (FSDP2: on the host; it moves each layer's shards itself), and
        # uninitialised when a checkpoint fills every weight: none is drawn to be overwritten.
        chunks = build_model_chunks(
            self.model_config,
            initialise=not loads_every_weight(job),
            device="cpu" if job.ddp.use_torch_fsdp2 else device,
        )
        if job.lora is not None:
            # Before DDP: what requires a gradient (the adapters only) decides what DDP
            # buckets and the optimizer steps; the frozen base gets neither.
            for chunk in chunks:
                apply_lora(chunk, job.lora)
        if t.compile:
            # Before DDP and FSDP2 wrap the chunks: their hooks stay outside the compiled
            # layers (torchtitan's order), and the adapters above are compiled with the layer.
            compile_layers(chunks)
        if t.compile_loss_head:
            compile_loss_head(chunks)
        self.chunks: list[DataParallelChunk]
        if job.ddp.use_torch_fsdp2:
            dtype = compute_dtype(job)
            self.chunks = [FullyShardedDataParallel(chunk, job.ddp, param_dtype=dtype,
                                                    device=device)
                           for chunk in chunks]  # fmt: skip
        else:
            self.chunks = [DistributedDataParallel(chunk, job.ddp) for chunk in chunks]
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
        self.base_digest: str | None = None
        """The ``--pretrained-checkpoint`` a LoRA run's adapters train on (its digest)."""
        self.iteration, self.consumed_samples = 0, 0
        self.nan_iterations = 0
        self.phase = "setting up"
        """What the loop is doing (named when a collective in it fails)."""
        self.datasets: Datasets | None = None
        self.forward_backward = get_forward_backward_func()
        self.forward_step_func = forward_step_func or forward_step

    @property
    def cp_size(self) -> int:
        return parallel_state.get_context_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def iterators(self, dataset: torch.utils.data.Dataset, consumed: int) -> list[Iterator]:
        """One batch iterator per model chunk (interleaving runs every chunk on the same
        microbatches), starting after ``consumed`` samples."""
        train = None if self.datasets is None else self.datasets.train
        shuffle = self.job.data.sft and dataset is train
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
                (parallel_state.get_context_parallel_rank(), self.cp_size),
            )
            for _ in self.chunks
        ]

    def run_schedule(self, iterators: list[Iterator], forward_only: bool) -> float:
        """Forward (and backward) one global batch; return its global mean loss on every rank."""
        logged = self.forward_backward(
            forward_step_func=self.forward_step_func,
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
        is the gradient of). The last stage's TP rank 0 contributes; one world all-reduce.
        Under context parallelism each CP rank logs CP x its share of the loss
        (`engine.training.step`), so their mean is the whole sequence's."""
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
