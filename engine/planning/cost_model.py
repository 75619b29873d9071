"""What a job costs per rank, by arithmetic alone: parameters, memory, FLOPs, whether it fits.

Nothing is allocated and no process group is needed, so ``tools/plan.py`` and the trainer's
``--dry-run`` answer in milliseconds for any model and layout. ``docs/plan.md`` explains every
number for LLaMA-2-7B at TP=8, PP=1, DP=4.

Memory per rank is the sum of

- **weights**: this rank's parameters (its pipeline stage, sharded over TP) in their dtype;
- **gradients**: the DDP buffer, float32 by default (``--accumulate-allreduce-grads-in-fp32``);
- **optimizer state**: Adam's two moments in float32, plus float32 main parameters when the
  model is 16-bit; divided over DP with ``--use-distributed-optimizer`` (ZeRO-1);
- **activations**: what backward keeps of each layer (`activation_bytes_per_layer`) times the
  layers of the stage times the microbatches in flight (`in_flight_microbatches`), plus the
  output head's on the last stage (and, with full recompute, one layer brought back);
- **communication buffers**: the pipeline's receive buffers. Gradient reduction and the
  distributed optimizer's all-gather work in place in the DDP buffers, and TP collectives write
  tensors already counted as activations.

With context parallelism (``--context-parallel-size``) every rank holds ``s/cp`` tokens of each
sequence: activations and pipeline messages shrink by CP, the gradients are reduced and the
distributed optimizer shards over DP x CP, and attention sends K/V around the ring (or runs
all-to-alls) every layer (`context_parallel_bytes`).

With LoRA (``--lora-rank``, `engine.planning.lora`) the weights are the frozen base plus the
adapters, both in the model's dtype; gradients, DDP buffers and optimizer state exist for the
adapters only; the activations add the adapters' own (`lora_activation_bytes_per_layer`).

Allocator fragmentation, the CUDA context and library workspaces are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from engine.models.config import ModelConfig
from engine.models.flops import flops_parameters, flops_per_token
from engine.planning.lora import (
    lora_activation_bytes_per_layer,
    lora_parameters,
    lora_parameters_per_rank,
    targeted_modules,
)
from engine.tensor_parallel import pad_vocab_size
from engine.tensor_parallel.linear_cross_entropy import default_chunk_size
from engine.training.config import JobConfig

GB = 10**9
"""Memory is reported in GB (10^9 bytes), as device datasheets give it."""


def compute_bytes(job: JobConfig) -> int:
    """Bytes of one value in the dtype layers compute in: 2 with --bf16 / --fp16, else 4."""
    return 2 if job.optimizer.bf16 or job.optimizer.fp16 else 4


def layer_parameters(model: ModelConfig, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank, as the model's inventory declares them
    (for LLaMA: Q, the output projection and the SwiGLU matrices split over TP; K/V split when
    there are at least as many K/V heads as TP ranks and replicated otherwise; the two norm
    weights replicated)."""
    return model.inventory(tp).stage_parameters([0], first=False, last=False)


def stage_layers(model: ModelConfig, pp: int) -> list[int]:
    """Decoder layers of each pipeline rank (the uneven split, if any, from ``model``)."""
    return model.layers_per_rank(pp)


def rank_parameters(model: ModelConfig, tp: int, pp: int) -> list[int]:
    """Parameters held by each pipeline rank (all its virtual chunks) on one TP rank.

    The first rank holds the vocabulary-parallel embedding, the last the final norm and the
    output head; with tied embeddings and PP > 1 the last rank keeps its own copy of the
    shared weight (as Megatron does), so it is counted on both.
    """
    inventory = model.inventory(tp)
    return [
        inventory.stage_parameters(range(layers), first=rank == 0, last=rank == pp - 1)
        for rank, layers in enumerate(stage_layers(model, pp))
    ]


def activation_bytes_per_layer(
    model: ModelConfig,
    seq_length: int,
    micro_batch_size: int,
    tp: int,
    bytes_per_value: int = 2,
    cp: int = 1,
) -> int:
    """Bytes one decoder layer keeps for backward, for one microbatch, on one TP (and CP) rank.

    ``s`` this rank's tokens (``seq_length / cp``), ``b`` micro batch, ``h`` hidden, ``f`` FFN,
    ``t`` TP, ``kv`` the K/V heads of this rank, ``d`` the head dim; values counted in elements,
    times ``bytes_per_value``:

    - two RMSNorms keep their normalised input, ``s·b·h`` each (``/t`` with sequence
      parallelism), and float32 ``1/rms`` per token;
    - the QKV and gate|up projections keep their input, ``s·b·h`` each (``/t`` with sequence
      parallelism: they keep the shard and all-gather it again in the backward);
    - attention keeps the rotated Q ``s·b·h/t`` and K ``s·b·kv·d``, the fused QKV output
      ``s·b·(h/t + 2·kv·d)`` (V is a view of it), the output ``s·b·h/t`` (also the output
      projection's input) and float32 log-sum-exp per head; flash attention keeps no ``s×s``
      matrix (with fewer K/V heads than TP ranks, see the code);
    - SwiGLU keeps gate|up ``2·s·b·f/t``, ``silu(gate)`` and the product, ``s·b·f/t`` each.

    Selective recompute re-runs core attention, which drops only the log-sum-exp: with flash
    attention the ``5·a·s²·b`` term it exists to remove is already gone. Full recompute keeps
    only the layer input ``s·b·h`` (``/t`` with sequence parallelism).

    Ring attention (``--cp-comm-type p2p``) keeps what flash attention keeps. All-to-all
    (``a2a``) keeps the gathered Q ``s·b·h/t``, K and V ``s·b·kv·d`` each (``h/cp`` heads of
    ``cp·s`` tokens: the same count) and the output before and after the return all-to-all,
    ``s·b·h/t`` each, instead of the rotated Q/K and the fused QKV output.
    """
    s, b, h, f, d = (
        seq_length // cp, micro_batch_size, model.hidden_size, model.ffn_hidden_size,
        model.head_dim,
    )  # fmt: skip
    sp = tp if model.sequence_parallel else 1
    if model.recompute_granularity == "full":
        return s * b * h // sp * bytes_per_value
    groups = model.kv_heads
    all_to_all = cp > 1 and model.cp_comm_type == "a2a"
    if all_to_all and model.recompute_granularity != "selective" and groups >= tp:
        # Gathered Q, K, V; the output gathered and returned.
        attention = 3 * s * b * h // tp + 2 * s * b * (groups // tp) * d
    elif groups >= tp:
        # Q, K, the fused QKV output and the attention output.
        attention = 3 * s * b * h // tp + 3 * s * b * (groups // tp) * d
    else:
        # Fewer K/V heads than TP ranks: Q, K, the K|V output and the attention output, the
        # rank's K|V weight rows (sliced out of the replicated weight every forward), and,
        # with sequence parallelism, a second all-gathered input.
        attention = 2 * s * b * h // tp + 3 * s * b * d + 2 * d * h
        attention += s * b * h if model.sequence_parallel else 0
    values = (
        2 * s * b * h // sp  # norm inputs
        + 2 * s * b * h // sp  # QKV and gate|up inputs
        + attention
        + 4 * s * b * f // tp  # SwiGLU
    )
    float32_bytes = 2 * 4 * s * b // sp  # 1/rms of both norms
    if model.recompute_granularity != "selective":
        float32_bytes += 4 * s * b * (model.num_attention_heads // tp)  # log-sum-exp
    return values * bytes_per_value + float32_bytes


def output_activation_bytes(
    model: ModelConfig,
    seq_length: int,
    micro_batch_size: int,
    tp: int,
    bytes_per_value: int = 2,
    cp: int = 1,
) -> int:
    """What the last stage keeps after the decoder layers, per microbatch: the final norm's
    input and the output head's input (the sequence shard with sequence parallelism), for its
    ``seq_length / cp`` tokens, and the cross entropy's:

    - chunked (`linear_cross_entropy`: by default where the vocabulary slice is wider than
      the hidden size, `default_chunk_size`): a float32 log-sum-exp and the input's gradient
      per token (the whole sequence) and the weight's float32 gradient, computed in the
      forward (a chunk's logits live only during it);
    - whole logits (``--cross-entropy-chunk-size 0``, or by default a narrower slice): the
      float32 softmax over this rank's vocabulary slice.
    """
    s, b, h = seq_length // cp, micro_batch_size, model.hidden_size
    sp = tp if model.sequence_parallel else 1
    vocab_shard = pad_vocab_size(model.vocab_size, tp, model.make_vocab_size_divisible_by) // tp
    inputs = 2 * s * b * h // sp * bytes_per_value
    chunk = model.cross_entropy_chunk_size
    if chunk is None:
        chunk = default_chunk_size(s * b, h, vocab_shard)
    if chunk == 0:
        return inputs + s * b * 4 * vocab_shard
    return inputs + s * b * (4 + h * bytes_per_value) + vocab_shard * h * 4


def rank_trainable_parameters(job: JobConfig) -> list[int]:
    """Parameters each pipeline rank trains on one TP rank (its gradients and optimizer
    state): all of them, or with LoRA only the adapters."""
    model = job.model
    tp = job.parallel.tensor_model_parallel_size
    pp = job.parallel.pipeline_model_parallel_size
    if job.lora is None:
        return rank_parameters(model, tp, pp)
    return [lora_parameters_per_rank(model, job.lora, tp, n) for n in stage_layers(model, pp)]


def in_flight_microbatches(pp: int, vpp: int | None, num_microbatches: int, rank: int) -> int:
    """Model-chunk forwards whose activations pipeline rank ``rank`` holds at its peak.

    1F1B: the warm-up runs ``p - rank - 1`` forwards before the first backward, so the first
    rank holds ``p`` microbatches, the last one. Interleaved (``v`` chunks): Megatron's warm-up
    of ``2·(p - rank - 1) + (v - 1)·p`` chunk forwards, plus the one in steady state. Never more
    than the step has.
    """
    v = vpp or 1
    if v == 1:
        return min(num_microbatches, pp - rank)
    return min(num_microbatches * v, 2 * (pp - rank - 1) + (v - 1) * pp + 1)


def context_parallel_bytes(job: JobConfig) -> int:
    """Bytes one rank sends for context parallelism per layer and microbatch (``S = s/cp``
    tokens, ``kv·d`` this TP rank's K/V width, ``v`` bytes per value).

    - ring (p2p): the forward passes the K|V block, ``2·S·b·kv·d`` values, ``cp - 1`` hops;
      the backward passes it again and the float32 dK|dV accumulator ``cp`` hops (the last
      takes it home); recomputation (selective or full) runs the forward ring once more.
    - all-to-all (a2a): Q, K, V and the output each move ``(cp-1)/cp`` of their
      ``S·b·(h/t)`` or ``S·b·kv·d`` values, forward and (reversed) backward; recomputation
      repeats the forward's.
    """
    model, t = job.model, job.training
    cp, tp = job.parallel.context_parallel_size, job.parallel.tensor_model_parallel_size
    if cp == 1:
        return 0
    value_bytes = compute_bytes(job)
    tokens = t.seq_length // cp * t.micro_batch_size
    kv_width = (model.kv_heads // tp if model.kv_heads >= tp else 1) * model.head_dim
    forwards = 2 if model.recompute_granularity is not None else 1
    if model.cp_comm_type == "a2a":
        q_width = model.num_attention_heads // tp * model.head_dim
        values = 2 * tokens * q_width + 2 * tokens * kv_width  # Q and output, K and V
        return (forwards + 1) * (cp - 1) * values * value_bytes // cp
    block = 2 * tokens * kv_width
    return (forwards + 1) * (cp - 1) * block * value_bytes + cp * block * 4


def fsdp_gathered_bytes(job: JobConfig, stage_params: int, layers: int, world_size: int) -> int:
    """FSDP2's unsharded memory at the peak on a pipeline rank holding ``stage_params`` over
    ``layers`` decoder layers: the layer computing and the next one all-gathered ahead, in the
    compute dtype; the root's own parameters (embedding, final norm, head: FSDP keeps the
    root unsharded from forward to backward); and, when gradients are reduced once per step
    over several microbatches, every unsharded float32 gradient of the stage in between."""
    model, tp = job.model, job.parallel.tensor_model_parallel_size
    value_bytes = compute_bytes(job)
    layer = layer_parameters(model, tp)
    root = stage_params - layers * layer
    gathered = (min(layers, 2) * layer + root) * value_bytes
    accumulating = job.num_microbatches(world_size) > 1
    if accumulating and not job.ddp.fsdp_reduce_every_microbatch:
        gathered += stage_params * 4
    return gathered


def communication_bytes(job: JobConfig, world_size: int) -> dict[str, int]:
    """Bytes one rank sends per iteration (ring algorithms), by kind of parallelism.

    - ``tensor``: each layer runs 4 all-reduces of ``s·b·h`` values per microbatch, 2 in
      forward and 2 in backward (with sequence parallelism, all-gather + reduce-scatter pairs of
      the same total); a ring all-reduce sends ``2·(t-1)/t`` of the tensor.
    - ``data``: the gradients once per iteration, ``2·(d-1)/d`` of their bytes (all-reduce), or
      with the distributed optimizer a reduce-scatter of the gradients plus an all-gather of the
      16-bit parameters, ``(d-1)/d`` each; with LoRA only the adapters'. FSDP2 all-gathers
      the parameters (compute dtype) for every microbatch's forward and again for its
      backward, and reduce-scatters the float32 gradients once per iteration (or per
      microbatch with ``--fsdp-reduce-every-microbatch``), ``(d-1)/d`` each.
    - ``pipeline``: each microbatch's activations forward and their gradients backward across
      a stage boundary, ``s·b·h`` values (``/t`` with sequence parallelism) each way.
    - ``context``: `context_parallel_bytes` per layer and microbatch.

    With context parallelism ``s`` is the rank's ``s/cp`` tokens and ``d`` counts DP x CP
    (gradients are reduced over both).
    """
    model, t = job.model, job.training
    tp = job.parallel.tensor_model_parallel_size
    pp = job.parallel.pipeline_model_parallel_size
    cp = job.parallel.context_parallel_size
    dp = job.data_parallel_size(world_size) * cp
    m = job.num_microbatches(world_size)
    value_bytes = compute_bytes(job)
    grad_bytes = 4 if job.ddp.grad_reduce_in_fp32 else value_bytes
    tokens = t.seq_length // cp * t.micro_batch_size
    layers = max(stage_layers(model, pp))
    params = max(rank_trainable_parameters(job))
    tensor = 4 * 2 * (tp - 1) * tokens * model.hidden_size // tp * value_bytes * layers * m
    if job.ddp.use_torch_fsdp2:
        reductions = m if job.ddp.fsdp_reduce_every_microbatch else 1
        data = (dp - 1) * params * (2 * m * value_bytes + reductions * 4) // dp
    elif job.ddp.use_distributed_optimizer:
        data = (dp - 1) * params * (grad_bytes + value_bytes) // dp
    else:
        data = 2 * (dp - 1) * params * grad_bytes // dp
    sp = tp if model.sequence_parallel else 1
    pipeline = 2 * tokens * model.hidden_size // sp * value_bytes * m if pp > 1 else 0
    context = context_parallel_bytes(job) * layers * m
    return {"tensor": tensor, "data": data, "pipeline": pipeline, "context": context}


@dataclass
class RankPlan:
    """One pipeline rank's share (every TP and DP rank of a stage holds the same)."""

    pipeline_rank: int
    layers: int
    parameters: int
    """The base model's parameters on one TP rank (frozen under LoRA)."""
    adapter_parameters: int
    """LoRA's A and B on one TP rank (0 without LoRA)."""
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    comm_bytes: int
    in_flight: int
    """Model-chunk forwards held at the peak (see `in_flight_microbatches`)."""
    gathered_bytes: int = 0
    """FSDP2: what is unsharded at the peak (`fsdp_gathered_bytes`); 0 otherwise."""

    @property
    def total_bytes(self) -> int:
        return (
            self.weight_bytes + self.grad_bytes + self.optimizer_bytes
            + self.activation_bytes + self.comm_bytes + self.gathered_bytes
        )  # fmt: skip


@dataclass
class Plan:
    """The job's arithmetic; `format_plan` prints it."""

    world_size: int
    data_parallel_size: int
    num_microbatches: int
    global_batch_size: int
    total_parameters: int
    lora_parameters: int | None
    """Every adapter parameter of the model (no TP); None without LoRA."""
    flops_parameters: int
    flops_per_iteration: int
    activation_bytes_per_layer: int
    communication_bytes: dict[str, int]
    """Bytes a rank sends per iteration for TP, DP and PP (see `communication_bytes`)."""
    ranks: list[RankPlan]
    device_memory_bytes: int | None

    @property
    def peak_rank(self) -> RankPlan:
        return max(self.ranks, key=lambda rank: rank.total_bytes)

    @property
    def fits(self) -> bool | None:
        """Whether the fullest rank fits the device memory (None when it is not known)."""
        if self.device_memory_bytes is None:
            return None
        return self.peak_rank.total_bytes <= self.device_memory_bytes


def plan(job: JobConfig, world_size: int) -> Plan:
    """The plan of ``job`` on ``world_size`` ranks (validated first: a layout that cannot run
    has no plan)."""
    job.validate(world_size, require_train_length=False)
    model, t = job.model, job.training
    tp = job.parallel.tensor_model_parallel_size
    pp = job.parallel.pipeline_model_parallel_size
    vpp = job.parallel.virtual_pipeline_model_parallel_size
    cp = job.parallel.context_parallel_size
    dp = job.data_parallel_size(world_size)
    m = job.num_microbatches(world_size)
    value_bytes = compute_bytes(job)
    sixteen_bit = value_bytes == 2
    grad_bytes = 4 if job.ddp.grad_reduce_in_fp32 else value_bytes
    # Adam's exp_avg and exp_avg_sq, plus float32 main parameters unless the model is float32
    # itself (then the main parameters are the model's).
    state_bytes = 8 + (4 if sixteen_bit else 0)
    fsdp = job.ddp.use_torch_fsdp2
    state_shards = dp * cp if job.ddp.use_distributed_optimizer or fsdp else 1
    if fsdp:  # float32 sharded weights are the main parameters; gradients float32, sharded
        state_bytes, grad_bytes = 8, 4
    per_layer = activation_bytes_per_layer(
        model, t.seq_length, t.micro_batch_size, tp, value_bytes, cp
    )
    adapter_bytes = 0
    if job.lora is not None:
        adapter_bytes = lora_activation_bytes_per_layer(
            model, job.lora, t.seq_length // cp, t.micro_batch_size, tp, value_bytes
        )
    # Full recompute re-runs one layer at a time in backward: its activations come back, once
    # (the adapters' with them); otherwise every layer keeps the adapters' too.
    recompute_bytes = 0
    if model.recompute_granularity == "full":
        recompute_bytes = adapter_bytes + activation_bytes_per_layer(
            dataclasses.replace(model, recompute_granularity=None),
            t.seq_length, t.micro_batch_size, tp, value_bytes, cp,
        )  # fmt: skip
    else:
        per_layer += adapter_bytes
    sp = tp if model.sequence_parallel else 1
    # Forward and backward receive buffers of the activations crossing a stage boundary.
    p2p_bytes = 2 * t.seq_length // cp * t.micro_batch_size * model.hidden_size // sp * value_bytes

    ranks = []
    layer_counts = stage_layers(model, pp)
    trainable = rank_trainable_parameters(job)
    for rank, params in enumerate(rank_parameters(model, tp, pp)):
        adapters = 0 if job.lora is None else trainable[rank]
        in_flight = in_flight_microbatches(pp, vpp, m, rank)
        activations = in_flight * layer_counts[rank] // (vpp or 1) * per_layer + recompute_bytes
        if rank == pp - 1:
            # The head runs in the last chunk only: one in flight per v chunk forwards.
            activations += math.ceil(in_flight / (vpp or 1)) * output_activation_bytes(
                model, t.seq_length, t.micro_batch_size, tp, value_bytes, cp
            )
        ranks.append(
            RankPlan(
                pipeline_rank=rank,
                layers=layer_counts[rank],
                parameters=params,
                adapter_parameters=adapters,
                weight_bytes=(
                    math.ceil((params + adapters) / state_shards) * 4
                    if fsdp
                    else (params + adapters) * value_bytes
                ),
                grad_bytes=math.ceil(trainable[rank] / (state_shards if fsdp else 1)) * grad_bytes,
                optimizer_bytes=math.ceil(trainable[rank] / state_shards) * state_bytes,
                activation_bytes=activations,
                comm_bytes=p2p_bytes if pp > 1 else 0,
                in_flight=in_flight,
                gathered_bytes=(
                    fsdp_gathered_bytes(job, params, layer_counts[rank], world_size) if fsdp else 0
                ),
            )
        )
    global_batch = job.global_batch_size(world_size)
    memory_bytes = None if t.device_memory_gb is None else int(t.device_memory_gb * GB)
    if memory_bytes is None and torch.cuda.is_available():
        # Planning on the machine that will train: its own device is the one to fit.
        memory_bytes = torch.cuda.get_device_properties(0).total_memory
    return Plan(
        world_size=world_size,
        data_parallel_size=dp,
        num_microbatches=m,
        global_batch_size=global_batch,
        total_parameters=model.num_parameters(),
        lora_parameters=None if job.lora is None else lora_parameters(model, job.lora),
        flops_parameters=flops_parameters(model),
        flops_per_iteration=flops_per_token(model, t.seq_length) * global_batch * t.seq_length,
        communication_bytes=communication_bytes(job, world_size),
        activation_bytes_per_layer=per_layer,
        ranks=ranks,
        device_memory_bytes=memory_bytes,
    )


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / GB:8.2f} GB"  # 11 characters, the table's column width


def format_plan(job: JobConfig, world_size: int) -> str:
    """The plan as a printable report (what ``--dry-run`` and ``tools/plan.py`` show)."""
    p = plan(job, world_size)
    model, t, par = job.model, job.training, job.parallel
    cp = par.context_parallel_size
    context = f" x CP {cp} ({model.cp_comm_type})" if cp > 1 else ""
    lines = [
        f"layout: world {world_size} = TP {par.tensor_model_parallel_size}{context} x PP "
        f"{par.pipeline_model_parallel_size} x DP {p.data_parallel_size}"
        + (
            f" (virtual {par.virtual_pipeline_model_parallel_size})"
            if par.virtual_pipeline_model_parallel_size
            else ""
        ),
        f"batch: global {p.global_batch_size} = micro {t.micro_batch_size} x DP "
        f"{p.data_parallel_size} x {p.num_microbatches} microbatches; seq {t.seq_length}"
        + (f" ({t.seq_length // cp} tokens per CP rank)" if cp > 1 else ""),
        f"parameters: {p.total_parameters:,} total, {p.flops_parameters:,} in matmuls",
        f"activations per layer per microbatch: {p.activation_bytes_per_layer / 2**20:.1f} MiB "
        f"(recompute {model.recompute_granularity or 'none'}, sequence parallel "
        f"{'on' if model.sequence_parallel else 'off'})",
    ]
    if job.lora is not None and p.lora_parameters is not None:
        lines.append(
            f"LoRA r={job.lora.rank} on {targeted_modules(job.lora)}: {p.lora_parameters:,} "
            f"adapter parameters ({100 * p.lora_parameters / p.total_parameters:.2f}% of the "
            "model); base frozen: gradients and optimizer state for the adapters only"
        )
    adapters_header = "     adapters |" if job.lora is not None else ""
    lines += [
        "",
        "pipeline rank | layers |   parameters |" + adapters_header + "     weights |       grads |"
        "   optimizer |   activations (in flight) |        comm |       total",
    ]
    for r in p.ranks:
        adapters = f" {r.adapter_parameters:12,d} |" if job.lora is not None else ""
        lines.append(
            f"{r.pipeline_rank:13d} | {r.layers:6d} | {r.parameters:12,d} |{adapters} "
            f"{_gb(r.weight_bytes)} | {_gb(r.grad_bytes)} | {_gb(r.optimizer_bytes)} | "
            f"{_gb(r.activation_bytes)} ({r.in_flight:4d} chunks) | {_gb(r.comm_bytes)} | "
            f"{_gb(r.total_bytes)}"
        )
    if job.ddp.use_torch_fsdp2:
        lines += [
            "",
            "FSDP2: weights (float32, the main parameters), gradients and optimizer state sharded "
            f"over {p.data_parallel_size * cp} ranks; unsharded at the peak (two layers, the "
            "root's embedding and head"
            + ("" if job.ddp.fsdp_reduce_every_microbatch or p.num_microbatches == 1
               else ", gradients held across microbatches")
            + "): " + ", ".join(f"rank {r.pipeline_rank} {r.gathered_bytes / GB:.2f} GB"
                                for r in p.ranks),
        ]  # fmt: skip
    tflop = p.flops_per_iteration / 1e12
    lines += [
        "",
        f"FLOPs per iteration: {tflop:,.1f} TFLOP "
        f"({flops_per_token(model, t.seq_length) / 1e9:.1f} GFLOP/token x "
        f"{p.global_batch_size * t.seq_length:,} tokens), {tflop / world_size:,.2f} TFLOP per rank",
    ]  # fmt: skip
    sent = ", ".join(f"{kind} {n / GB:,.2f} GB" for kind, n in p.communication_bytes.items())
    lines.append(f"sent per rank per iteration: {sent}")
    if t.peak_tflops:
        seconds = tflop / world_size / t.peak_tflops
        lines.append(f"time per iteration at 100% MFU ({t.peak_tflops:g} TFLOP/s): {seconds:.2f} s")
    peak = p.peak_rank
    where = f"peak memory {peak.total_bytes / GB:.2f} GB (pipeline rank {peak.pipeline_rank})"
    if p.fits is None:
        lines.append(f"{where}; give --device-memory-gb to check the fit")
    else:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"{where} {verdict} in {(p.device_memory_bytes or 0) / GB:g} GB")
    return "\n".join(lines)
