"""LoRA adapters in and out of HuggingFace PEFT's adapter directory.

A PEFT LoRA adapter is a directory of two files, which ``PeftModel.save_pretrained`` writes
and ``PeftModel.from_pretrained(base, directory)`` reads:

- ``adapter_model.safetensors``: ``{PEFT name: tensor}``, the full A ``[r, in]`` and B
  ``[out, r]`` of every adapted HF module (``base_model.model.model.layers.3.self_attn.q_proj
  .lora_A.weight``), exactly what `engine.peft.lora.lora_state` returns for one chunk; older
  or hand-made adapters are ``adapter_model.bin`` (a pickled dict, read with
  ``weights_only=True``) and may name the adapter (``.lora_A.default.weight``);
- ``adapter_config.json``: PEFT's ``LoraConfig`` (``peft_type: "LORA"``, ``r``,
  ``lora_alpha``, ``lora_dropout``, ``target_modules`` as HF module names, ...).

`save_peft_adapter` writes both from a (TP x PP x DP) engine model; `read_peft_adapter` reads
them back as a `LoraConfig` and the tensors that `apply_lora` + `load_lora_state` take, and
refuses by name whatever of PEFT's config the engine's adapters cannot represent. Neither
imports ``peft``: the file formats are the interface.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from engine import parallel_state
from engine.peft.config import HF_ALIASES, LoraConfig
from engine.peft.lora import PEFT_PREFIX, lora_state

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_PICKLE_FILE = "adapter_model.bin"
"""PEFT's file names (``peft.utils.constants``): the config, and the weights as safetensors
(what ``save_pretrained`` writes by default) or as a pickle (``safe_serialization=False``)."""

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<matrix>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
"""``{module}.lora_A.weight`` as saved, or ``{module}.lora_A.{adapter name}.weight``."""

_REFUSED_WHEN_SET: dict[str, str] = {
    "use_dora": "DoRA's magnitude vectors",
    "use_rslora": "rank-stabilised scaling (alpha / sqrt(r))",
    "use_qalora": "QA-LoRA's pooled inputs",
    "lora_bias": "a bias on lora_B",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "modules_to_save": "fully trained copies of other modules",
    "rank_pattern": "a rank per module",
    "alpha_pattern": "an alpha per module",
    "layers_to_transform": "adapters on some layers only",
    "layer_replication": "replicated layers",
    "exclude_modules": "excluded modules",
    "target_parameters": "adapters on parameters rather than modules",
    "trainable_token_indices": "trainable embedding rows",
}
"""PEFT config fields the engine's adapters cannot represent when true or non-empty (their
defaults are false, null, ``{}`` or ``[]``), and what each would need."""


def save_peft_adapter(
    model_chunks: nn.Module | Sequence[nn.Module],
    directory: str | Path,
    config: LoraConfig,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write the adapters of a whole model as a PEFT adapter directory (``adapter_model
    .safetensors`` and ``adapter_config.json``), loadable by ``PeftModel.from_pretrained(base,
    directory)``.

    Collective over the world: every rank passes its model chunks (``config`` the one they were
    built with by `apply_lora`). Each stage gathers its chunks' full A and B over TP
    (`lora_state`), the stages of global rank 0's pipeline send theirs to it (the other data-
    parallel replicas hold the same adapters), and global rank 0 alone writes; every rank
    returns once the files are written, or raises the writer's error.
    """
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    stage: dict[str, torch.Tensor] = {}
    for chunk in chunks:  # several with virtual pipeline stages
        stage.update(lora_state(chunk))
    tensors = _gather_stages_to_rank0(stage)
    error: str | None = None
    if tensors is not None:
        try:
            _write_adapter(Path(directory), tensors, config, base_model_name_or_path)
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error is not None:
        raise RuntimeError(f"writing the PEFT adapter to {directory} failed on rank 0: {error}")


def _gather_stages_to_rank0(stage: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every stage's adapters (CPU tensors), merged, on global rank 0; None elsewhere. Only
    the pipeline holding global rank 0 communicates (its stage 0 is rank 0)."""
    if not dist.is_initialized():
        return stage
    pipeline = parallel_state.get_pipeline_model_parallel_global_ranks()
    if 0 not in pipeline:
        return None
    # Rank 0's pipeline is the stages of TP rank 0 of data-parallel replica 0: one copy of
    # every layer (the other TP ranks gathered the same tensors, the replicas hold the same).
    is_rank0 = dist.get_rank() == 0
    received: list[Any] | None = [None] * len(pipeline) if is_rank0 else None
    group = parallel_state.get_pipeline_model_parallel_group()
    if len(pipeline) == 1:
        received = [stage]
    else:
        dist.gather_object(stage, received, dst=0, group=group)
    if not is_rank0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in received or []:
        merged.update(part)
    return merged


def _write_adapter(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    config: LoraConfig,
    base_model_name_or_path: str | None,
) -> None:
    if not tensors:
        raise ValueError("the model has no LoRA adapters: call apply_lora before saving")
    for name, tensor in tensors.items():
        if ".lora_A." in name and tensor.shape[0] != config.rank:
            raise ValueError(
                f"{name} has rank {tensor.shape[0]}, the LoraConfig passed has rank "
                f"{config.rank}: pass the config the adapters were built with"
            )
    directory.mkdir(parents=True, exist_ok=True)
    adapted, named = _adapted_modules(tensors), hf_target_modules(config)
    if adapted != named:
        raise ValueError(
            f"the adapters are on {', '.join(adapted)} but the LoraConfig passed names "
            f"{', '.join(named)}: pass the config the adapters were built with"
        )
    weights = {name: tensor.contiguous() for name, tensor in sorted(tensors.items())}
    record = peft_config_record(config, base_model_name_or_path)
    # Each file appears whole or not at all: written aside, then renamed.
    tmp_weights = directory / (ADAPTER_WEIGHTS_FILE + ".tmp")
    save_file(weights, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, directory / ADAPTER_WEIGHTS_FILE)
    tmp_config = directory / (ADAPTER_CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_config, directory / ADAPTER_CONFIG_FILE)


def _adapted_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The HF module names (``q_proj``) that have an adapter, from the saved keys: what PEFT's
    ``target_modules`` matches a module name's end against."""
    modules = set()
    for name in tensors:
        match = _PEFT_KEY.match(name)
        if match is None:
            raise ValueError(f"{name} is not a LoRA A or B under PEFT's names")
        modules.add(match["module"].rsplit(".", 1)[-1])
    return sorted(modules)


def hf_target_modules(config: LoraConfig) -> list[str]:
    """``config.target_modules`` as HF module names, the engine's fused projections expanded
    (``qkv`` -> ``q_proj, k_proj, v_proj``; ``gate_up`` -> ``gate_proj, up_proj``; ``out`` ->
    ``o_proj``), sorted."""
    hf_of_block = {block: hf for hf, block in HF_ALIASES.items()}
    return sorted(hf_of_block[block] for block in config.blocks())


def peft_config_record(
    config: LoraConfig, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for these adapters: the fields every PEFT
    version since 0.4 reads, each at PEFT's default where the engine has no counterpart
    (newer fields are left to PEFT's defaults), ``target_modules`` as HF module names."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        # PEFT writes an integer alpha as one (``lora_alpha: 16``).
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": hf_target_modules(config),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }


def read_peft_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter directory as ``(LoraConfig, {PEFT name: full tensor})``, for
    ``apply_lora(model, config)`` then ``load_lora_state(model, tensors)`` on every chunk.

    The config's ``target_modules`` are HF module names (``q_proj``, ...), ``"all-linear"``
    expanded to all seven; names with an adapter (``.lora_A.default.weight``) come back as
    PEFT saves them (``.lora_A.weight``). Raises FileNotFoundError naming a missing file and
    ValueError naming each config field (or tensor) the engine cannot represent.
    """
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a PEFT adapter directory")
    record = json.loads(config_path.read_text())
    config = lora_config_from_peft(record, str(config_path))
    tensors = _peft_tensors(_read_weights(directory), config)
    return config, tensors


def lora_config_from_peft(record: dict[str, Any], source: str = ADAPTER_CONFIG_FILE) -> LoraConfig:
    """PEFT's ``adapter_config.json`` (parsed) as a `LoraConfig`; ValueError naming every
    field of ``source`` the engine cannot represent."""
    problems = []
    peft_type = record.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"peft_type {peft_type!r}: only LORA adapters are supported")
    if record.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type {record['task_type']!r}: only CAUSAL_LM is supported")
    bias = record.get("bias", "none")
    if bias != "none":
        problems.append(f"bias {bias!r}: trained biases are not supported (only 'none')")
    for field, what in _REFUSED_WHEN_SET.items():
        if record.get(field):
            problems.append(f"{field} {record[field]!r}: {what} are not supported")
    targets = record.get("target_modules")
    if targets == "all-linear":
        targets = list(HF_ALIASES)
    if isinstance(targets, str):
        problems.append(
            f"target_modules {targets!r}: a regular expression; name the modules as a list"
        )
        targets = []
    unknown = [name for name in targets or [] if name not in HF_ALIASES]
    if unknown:
        problems.append(
            f"target_modules {', '.join(unknown)}: the engine has no LoRA projection for it "
            f"(one of {', '.join(HF_ALIASES)})"
        )
    if not problems:
        config = LoraConfig(
            rank=int(record.get("r", 8)),
            alpha=float(record.get("lora_alpha", 8)),
            dropout=float(record.get("lora_dropout", 0.0)),
            target_modules=tuple(sorted(targets or [])),
        )
        problems += config.errors()
    if problems:
        raise ValueError(f"{source}: cannot load this adapter: " + "; ".join(problems))
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path = directory / ADAPTER_WEIGHTS_FILE
    if safetensors_path.is_file():
        return load_file(str(safetensors_path))
    pickle_path = directory / ADAPTER_PICKLE_FILE
    if pickle_path.is_file():
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{safetensors_path} is missing (and so is {ADAPTER_PICKLE_FILE}): the adapter has "
        "no weights"
    )


def _peft_tensors(tensors: dict[str, torch.Tensor], config: LoraConfig) -> dict[str, torch.Tensor]:
    """The tensors under PEFT's saved names (the adapter name dropped); ValueError on a key
    that is not a LoRA A or B, on several adapters in one file, or on another rank."""
    out: dict[str, torch.Tensor] = {}
    adapters = set()
    for name, tensor in tensors.items():
        match = _PEFT_KEY.match(name)
        if match is None or not name.startswith(PEFT_PREFIX):
            raise ValueError(f"{name}: not a LoRA A or B weight under PEFT's names")
        adapters.add(match["adapter"])
        rank = tensor.shape[0] if match["matrix"] == "lora_A" else tensor.shape[1]
        if rank != config.rank:
            raise ValueError(f"{name} has rank {rank}, the adapter config says r={config.rank}")
        out[f"{match['module']}.{match['matrix']}.weight"] = tensor
    if len(adapters) > 1:
        names = ", ".join(sorted(str(a) for a in adapters))
        raise ValueError(f"the weights hold several adapters ({names}): save one per directory")
    return out
