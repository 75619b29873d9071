"""AdamW over float32 main parameters, for fp32, bf16 and fp16 models alike.

The optimizer never sees the model's parameters directly. It steps *main parameters*: float32
flat tensors, one per `ParamShard` (a contiguous range of one model parameter). For a float32
model the main parameter is a view of the model parameter itself (no copy); for bf16/fp16 it is
a float32 copy, and after each step the updated values are cast back into the model. Gradients
come from the data-parallel wrapper's flat buffer (``param.main_grad``, float32 by default).

`MixedPrecisionOptimizer` holds one shard per whole parameter (optimizer state replicated on
every DP rank); `engine.optimizer.distributed_optimizer.DistributedOptimizer` reuses all of
it with shards cut from this DP rank's slice of each bucket (ZeRO-1).

One step: copy/unscale gradients -> (fp16) check inf/nan on every rank, update the loss scale,
skip if found -> global grad norm -> skip if not finite -> clip -> AdamW -> copy back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine import parallel_state
from engine.distributed import DataParallelChunk
from engine.optimizer.clip_grads import (
    all_reduce_over,
    clip_grads_by_total_norm,
    counts_in_grad_norm,
    get_grad_norm_fp32,
)
from engine.optimizer.config import OptimizerConfig
from engine.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from engine.wrappers import unwrap

logger = logging.getLogger(__name__)

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class ParamShard:
    """Elements ``[start, end)`` of the flattened ``model_param``, as the optimizer sees them.

    ``model_data``, ``main_grad`` and ``main_param`` are flat ``[end - start]`` tensors: a view
    of the parameter's values (model dtype), a view of the gradient buffer, and the float32
    values AdamW updates (the same storage as ``model_data`` when the model is float32).
    """

    name: str
    model_param: nn.Parameter
    start: int
    end: int
    model_data: torch.Tensor
    main_grad: torch.Tensor
    main_param: torch.Tensor

    @property
    def aliased(self) -> bool:
        """The main parameter is the model's own storage (float32 model): nothing to copy."""
        return self.main_param.data_ptr() == self.model_data.data_ptr()

    @property
    def main_param_grad(self) -> torch.Tensor:
        """The float32 gradient AdamW steps with (set from ``main_grad`` before each step)."""
        grad = self.main_param.grad
        assert grad is not None, f"{self.name}: main gradient read before it was prepared"
        return grad


def make_shard(
    name: str, param: nn.Parameter, start: int, end: int, model_data: torch.Tensor,
    main_grad: torch.Tensor,
) -> ParamShard:  # fmt: skip
    """A shard whose main parameter aliases float32 model data, or copies 16-bit data."""
    main = model_data if model_data.dtype == torch.float32 else model_data.detach().float()
    return ParamShard(name, param, start, end, model_data, main_grad, main)


@dataclass
class StepResult:
    """What one `step` did, for the training log."""

    updated: bool
    grad_norm: float | None
    skip_reason: str | None
    loss_scale: float


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Decoupled weight decay applies to matrices only: not to norms (1-D) nor biases."""
    return param.dim() > 1 and not name.endswith("bias")


def tied_embedding_copies(model_chunks: Sequence[nn.Module]) -> set[nn.Parameter]:
    """The last pipeline stage's copies of a tied embedding (the first stage holds the
    original): excluded from the gradient norm so the embedding counts once."""
    copies = set()
    for chunk in model_chunks:
        module = unwrap(chunk)
        weight_of = getattr(module, "shared_embedding_or_output_weight", None)
        if weight_of is not None and not getattr(module, "pre_process", True):
            weight = weight_of()
            if weight is not None:
                copies.add(weight)
    return copies


def make_adamw(
    param_groups: list[dict[str, Any]], config: OptimizerConfig
) -> torch.optim.Optimizer:
    """AdamW with the fastest implementation available: apex's FusedAdam when apex is
    installed (CUDA only), else PyTorch's fused kernel, else its multi-tensor (foreach) one."""
    lr, betas, eps = config.lr, (config.adam_beta1, config.adam_beta2), config.adam_eps
    weight_decay = config.weight_decay
    devices = {p.device.type for group in param_groups for p in group["params"]}
    if devices == {"cuda"}:
        try:
            from apex.optimizers import FusedAdam  # optional accelerator, never required

            return FusedAdam(
                param_groups, adam_w_mode=True, lr=lr, betas=betas, eps=eps,
                weight_decay=weight_decay,
            )  # fmt: skip
        except ImportError:
            pass
    try:
        return torch.optim.AdamW(
            param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True
        )
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(
            param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True
        )


def make_grad_scaler(config: OptimizerConfig) -> ConstantGradScaler | DynamicGradScaler | None:
    """fp16 gets a loss scaler (constant if ``--loss-scale`` is set); bf16 and fp32 none."""
    if not config.fp16:
        return None
    if config.loss_scale is not None:
        return ConstantGradScaler(config.loss_scale)
    return DynamicGradScaler(
        config.initial_loss_scale, min_scale=config.min_loss_scale,
        growth_interval=config.loss_scale_window, hysteresis=config.hysteresis,
    )  # fmt: skip


class MixedPrecisionOptimizer:
    """AdamW with float32 main parameters, loss scaling, clipping, replicated over DP.

    Args:
        config: hyper-parameters and precision flags.
        model_chunks: the model chunks, each wrapped in
            `engine.distributed.DistributedDataParallel` (which provides ``main_grad``), or in
            `engine.distributed.FullyShardedDataParallel` for `FullyShardedOptimizer`.
    """

    def __init__(self, config: OptimizerConfig, model_chunks: Sequence[DataParallelChunk]):
        if config.bf16 and config.fp16:
            raise ValueError("--bf16 and --fp16 are exclusive: choose one")
        self.config = config
        self.model_chunks = list(model_chunks)
        for chunk in self.model_chunks:
            if not hasattr(chunk, "zero_grad_buffer"):
                raise TypeError(
                    f"{type(chunk).__name__} is not wrapped in "
                    "engine.distributed.DistributedDataParallel, which the optimizer reads "
                    "gradients from (param.main_grad)"
                )
        self.shards = self._build_shards()
        self._tied_copies = tied_embedding_copies(self.model_chunks)
        decay = [s.main_param for s in self.shards if uses_weight_decay(s.name, s.model_param)]
        no_decay = [
            s.main_param for s in self.shards if not uses_weight_decay(s.name, s.model_param)
        ]
        groups = [
            {"params": decay, "wd_mult": 1.0},
            {"params": no_decay, "wd_mult": 0.0, "weight_decay": 0.0},
        ]
        self.optimizer = make_adamw([g for g in groups if g["params"]], config)
        self.grad_scaler = make_grad_scaler(config)
        self.skipped_steps = 0

    # -- what subclasses change ------------------------------------------------------------

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every trainable model parameter, named (``chunk{i}.`` prefixes with several chunks)."""
        named = []
        for i, chunk in enumerate(self.model_chunks):
            prefix = f"chunk{i}." if len(self.model_chunks) > 1 else ""
            module = unwrap(chunk)
            named += [(prefix + n, p) for n, p in module.named_parameters() if p.requires_grad]
        return named

    def _build_shards(self) -> list[ParamShard]:
        """One shard per whole parameter."""
        shards = []
        for name, p in self.named_parameters():
            # The view into its gradient buffer that DistributedDataParallel attaches.
            main_grad: torch.Tensor = p.main_grad  # type: ignore[attr-defined]
            shards.append(make_shard(name, p, 0, p.numel(), p.data.view(-1), main_grad.view(-1)))
        return shards

    shards_over_data_parallel = False
    """Each DP rank steps other elements (ZeRO-1, FSDP2): norms and inf checks sum over DP
    too, and every DP rank saves its own optimizer state."""

    def _reduction_groups(self) -> list[dist.ProcessGroup]:
        """Groups over which the shards' norms and inf checks are summed: TP x PP, and the
        chunks' DP group when the shards are disjoint over it."""
        groups = [parallel_state.get_model_parallel_group()]
        if self.shards_over_data_parallel:
            groups.append(self.model_chunks[0].data_parallel_group)
        return groups

    def _after_step(self) -> None:
        """Hook after the parameters were updated (the distributed optimizer gathers them)."""

    # -- the step ----------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The torch optimizer's groups (the LR scheduler writes ``lr``/``weight_decay``)."""
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else self.grad_scaler.scale

    @property
    def can_rescale(self) -> bool:
        """Whether an fp16 overflow can still be absorbed by backing off the loss scale (a
        dynamic scale above its minimum)."""
        scaler = self.grad_scaler
        return isinstance(scaler, DynamicGradScaler) and scaler.scale > scaler.min_scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: multiplied by the fp16 loss scale."""
        return loss if self.grad_scaler is None else loss * self.grad_scaler.scale

    def zero_grad(self) -> None:
        """Zero the gradient buffers of every chunk (start of an iteration)."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()

    def grads_for_norm(self) -> list[torch.Tensor]:
        """The main gradients this rank counts in the global norm."""
        return [
            s.main_param_grad
            for s in self.shards
            if counts_in_grad_norm(s.model_param) and s.model_param not in self._tied_copies
        ]

    def get_grad_norm(self) -> float:
        """Global L2 norm of the (unscaled) main gradients, across TP, PP and DP."""
        return get_grad_norm_fp32(self.grads_for_norm(), self._reduction_groups())

    def _prepare_grads(self) -> bool:
        """Point main params at float32 grads, unscale; True when some rank found inf/nan."""
        for shard in self.shards:
            grad = shard.main_grad
            shard.main_param.grad = grad if grad.dtype == torch.float32 else grad.float()
        if self.grad_scaler is None:
            return False
        grads = [s.main_param_grad for s in self.shards]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.grad_scaler.scale)
            local = torch.stack(torch._foreach_norm(grads, 2.0)).sum()
            found = (~torch.isfinite(local)).float().reshape(1)
        else:
            found = torch.zeros(1)
        # Every rank must agree to skip, or the model replicas diverge.
        all_reduce_over(found, self._reduction_groups(), op=dist.ReduceOp.MAX)
        return bool(found.item())

    @torch.no_grad()
    def step(self) -> StepResult:
        """Unscale, check, clip, update and copy back; see `StepResult`."""
        found_inf = self._prepare_grads()
        if self.grad_scaler is not None:
            self.grad_scaler.update(found_inf)
            if found_inf:
                return self._skip(
                    None, f"inf/nan in fp16 gradients, loss scale now {self.loss_scale:g}"
                )
        grad_norm = self.get_grad_norm()
        if not torch.isfinite(torch.tensor(grad_norm)):
            return self._skip(grad_norm, f"non-finite gradient norm ({grad_norm})")
        if self.config.clip_grad > 0:
            clip_grads_by_total_norm(
                [s.main_param_grad for s in self.shards], self.config.clip_grad, grad_norm
            )
        self.optimizer.step()
        for shard in self.shards:
            if not shard.aliased:
                shard.model_data.copy_(shard.main_param)
        self._after_step()
        return StepResult(True, grad_norm, None, self.loss_scale)

    def _skip(self, grad_norm: float | None, reason: str) -> StepResult:
        self.skipped_steps += 1
        logger.warning("skipping optimizer step %d: %s", self.skipped_steps, reason)
        return StepResult(False, grad_norm, reason, self.loss_scale)

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the float32 main parameters from the model's (after loading model weights
        into a bf16/fp16 model, e.g. from a checkpoint without optimizer state)."""
        for shard in self.shards:
            if not shard.aliased:
                shard.main_param.copy_(shard.model_data)

    # -- state ------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes held for optimizer state on this rank: Adam moments and float32 main params
        that are copies (a float32 model's main params are the model's own storage)."""
        total = 0
        for shard in self.shards:
            state = self.optimizer.state.get(shard.main_param, {})
            total += sum(
                state[k].numel() * state[k].element_size() for k in ADAM_STATE_KEYS if k in state
            )
            if not shard.aliased:
                total += shard.main_param.numel() * shard.main_param.element_size()
        return total

    def _shard_state(self, shard: ParamShard) -> dict[str, torch.Tensor]:
        """``param``, ``exp_avg``, ``exp_avg_sq`` of one shard (zeros before the first step)."""
        state = self.optimizer.state.get(shard.main_param, {})
        out = {"param": shard.main_param}
        for key in ADAM_STATE_KEYS:
            out[key] = state[key] if key in state else torch.zeros_like(shard.main_param)
        return out

    def _step_count(self) -> int:
        for state in self.optimizer.state.values():
            return int(state["step"])
        return 0

    def _set_shard_state(
        self, shard: ParamShard, values: dict[str, torch.Tensor], step: int
    ) -> None:
        """Load ``values`` (flat float32 ``[end - start]`` each) into one shard."""
        shard.main_param.copy_(values["param"])
        if not shard.aliased:
            shard.model_data.copy_(shard.main_param)
        if step == 0:
            return
        device = shard.main_param.device
        self.optimizer.state[shard.main_param] = {
            "step": torch.tensor(float(step), dtype=torch.float32, device=device),
            **{
                k: values[k].to(device=device, dtype=torch.float32).clone() for k in ADAM_STATE_KEYS
            },
        }

    def full_state_dict(self) -> dict[str, Any]:
        """Optimizer state independent of the DP layout: per model parameter (this rank's TP/PP
        shard, its own shape), float32 ``param``, ``exp_avg``, ``exp_avg_sq``; plus the step
        count and the loss scaler. Collective over the DP group for the distributed optimizer."""
        params = {
            s.name: {
                k: v.detach().view_as(s.model_param).clone()
                for k, v in self._shard_state(s).items()
            }
            for s in self.shards
        }
        return self._wrap_full_state(params)

    def _wrap_full_state(self, params: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        scaler = None if self.grad_scaler is None else self.grad_scaler.state_dict()
        return {
            "params": params, "step": self._step_count(), "grad_scaler": scaler,
            "skipped_steps": self.skipped_steps,
        }  # fmt: skip

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's shards only, without communication (for checkpoints that every rank
        writes): per shard its parameter's name and shape, the range ``[start, end)`` of the
        flattened parameter it covers, and its float32 tensors. `full_state_from_local`
        assembles the DP ranks' dicts into a `full_state_dict`."""
        shards = [
            {
                "name": s.name,
                "shape": tuple(s.model_param.shape),
                "start": s.start,
                "end": s.end,
                **{k: v.detach().clone() for k, v in self._shard_state(s).items()},
            }  # fmt: skip
            for s in self.shards
        ]
        state = self._wrap_full_state({})
        state["step"] = MixedPrecisionOptimizer._step_count(self)  # this rank's, no collective
        del state["params"]
        return {"shards": shards, **state}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `full_state_dict`, at any DP size (each rank takes its shards)."""
        for shard in self.shards:
            if shard.name not in state["params"]:
                raise KeyError(f"optimizer state for parameter {shard.name} is missing")
            values = {
                k: v.reshape(-1)[shard.start : shard.end]
                for k, v in state["params"][shard.name].items()
            }
            self._set_shard_state(shard, values, state["step"])
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.skipped_steps = state.get("skipped_steps", 0)
        self._after_step()


def full_state_from_local(local_states: list[dict[str, Any]]) -> dict[str, Any]:
    """A `MixedPrecisionOptimizer.full_state_dict` from the `local_state_dict` s of every DP
    rank (any order), e.g. read back from per-rank checkpoint files."""
    params: dict[str, dict[str, torch.Tensor]] = {}
    for local in local_states:
        for shard in local["shards"]:
            numel = math.prod(shard["shape"])
            full = params.setdefault(
                shard["name"], {k: torch.zeros(numel) for k in ("param", *ADAM_STATE_KEYS)}
            )
            for key, tensor in full.items():
                tensor[shard["start"] : shard["end"]] = shard[key].reshape(-1).cpu()
    shapes = {s["name"]: s["shape"] for local in local_states for s in local["shards"]}
    first = local_states[0]
    return {
        "params": {
            name: {k: v.view(shapes[name]) for k, v in tensors.items()}
            for name, tensors in params.items()
        },
        "step": max(local["step"] for local in local_states),
        "grad_scaler": first["grad_scaler"],
        "skipped_steps": first["skipped_steps"],
    }
