"""Checkpoint conversion: HuggingFace LLaMA <-> engine checkpoints, and resharding.

Everything streams one parameter at a time, so converting a 7B model needs host memory for a
few copies of its largest tensor, never the whole model:

- the HF weights are opened lazily (``safe_open`` memory-maps safetensors; ``.bin`` files are
  loaded with ``mmap=True, weights_only=True``);
- files are written with `StreamingSafetensorsWriter`, whose header (names, shapes, offsets)
  is known before any tensor is read, so each tensor goes to disk as soon as it is built.

The engine side is exactly what `engine.checkpointing.protocol.save_checkpoint` writes at the target
layout (TP x PP, DP=1, no optimizer state, iteration 0): one ``model_tp{t}_pp{p}`` file per
rank whose index holds the same `Placement` records the live model would produce
(`stage_placements` computes them from the `ModelConfig` alone, without building the model),
so `load_checkpoint` reads it at any layout. There are no RNG files (nothing trained yet): load
with ``finetune=True`` (``--finetune``) or ``load_rng=False``, as Megatron's converted
checkpoints require ``--finetune`` or ``--no-load-rng``.

Both sides use the rotate-half rotary convention, so Q/K need no permutation between HF and
the engine; Meta's original ``consolidated.*.pth`` format (interleaved rotary) is not read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open

import engine
from engine.checkpointing.format import MODEL_STATE, Placement, ShardReader, local_from_canonical
from engine.checkpointing.format import read_header as read_shard_header
from engine.checkpointing.protocol import FORMAT_VERSION, METADATA_FILE, open_checkpoint
from engine.checkpointing.safetensors_writer import SAFETENSORS_DTYPES, StreamingSafetensorsWriter
from engine.checkpointing.storage import (
    LATEST_FILE,
    iteration_dir,
    publish,
    write_text_atomic,
)
from engine.models.config import ModelConfig
from engine.models.llama.hf import canonical_to_hf_name, hf_config_kwargs, hf_to_canonical_name
from engine.models.llama.meta import MetaCheckpoint
from engine.parallel_state import ParallelConfig
from engine.tensor_parallel.layers import pad_vocab_size


class ConversionError(ValueError):
    """The source cannot be converted: unsupported architecture, missing or misshapen tensor."""


# HF config fields that belong to the tokenizer, not the architecture: carried through.
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# HF configuration --------------------------------------------------------------------------


def model_config_from_hf(
    hf: dict[str, Any], make_vocab_size_divisible_by: int = 128
) -> ModelConfig:
    """A `ModelConfig` from a HF ``config.json`` dict; `ConversionError` naming every field
    the engine cannot represent (another ``model_type``, biases, rope scaling, ...)."""
    problems = []
    if hf.get("model_type") != "llama":
        problems.append(f"model_type {hf.get('model_type')!r} (only 'llama' is supported)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            problems.append(f"{field} true (the engine's LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU needs 'silu')")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp {hf['pretraining_tp']} (must be 1)")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else rope.get("rope_type")
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling {rope_type!r} (only plain rotary embeddings are supported)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    if problems:
        raise ConversionError("unsupported HF model: " + "; ".join(problems))
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_epsilon=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the HF model with the same architecture (``transformers`` writes it
    when installed, so its defaults and version are those of the reader)."""
    kwargs = hf_config_kwargs(config)
    try:
        import transformers
    except ImportError:
        theta = kwargs.pop("rope_theta")
        kwargs.update(
            rope_parameters={"rope_type": "default", "rope_theta": theta}, hidden_act="silu",
            model_type="llama", head_dim=config.head_dim,
        )  # fmt: skip
        out = kwargs
    else:
        out = transformers.LlamaConfig(**kwargs).to_dict()
    out.update(architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch."))
    return out


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of the model and its full shape, in HF's order."""
    h, d = config.hidden_size, config.head_dim
    q, kv, ffn = config.num_attention_heads * d, config.num_query_groups * d, config.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (config.vocab_size, h)}
    for n in range(config.num_layers):
        shapes.update({
            f"layers.{n}.input_norm.weight": (h,),
            f"layers.{n}.attention.q.weight": (q, h),
            f"layers.{n}.attention.k.weight": (kv, h),
            f"layers.{n}.attention.v.weight": (kv, h),
            f"layers.{n}.attention.out.weight": (h, q),
            f"layers.{n}.post_attention_norm.weight": (h,),
            f"layers.{n}.mlp.gate.weight": (ffn, h),
            f"layers.{n}.mlp.up.weight": (ffn, h),
            f"layers.{n}.mlp.down.weight": (h, ffn),
        })  # fmt: skip
    shapes["final_norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["output_layer.weight"] = (config.vocab_size, h)
    return shapes


def model_config_from_metadata(metadata: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` an engine checkpoint's ``metadata.json`` records."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = {k: v for k, v in metadata["model"].items() if k in fields}
    dtype = saved.pop("params_dtype", "torch.float32")
    return ModelConfig(**saved, params_dtype=getattr(torch, str(dtype).removeprefix("torch.")))


# Placements without a model ----------------------------------------------------------------


def stage_placements(config: ModelConfig, tp_size: int, pp_size: int) -> list[list[Placement]]:
    """For each pipeline stage, the placements (at TP rank 0) of the parameters
    `engine.checkpointing.protocol.save_checkpoint` writes, in the model's parameter order.

    Mirrors `engine.checkpointing.format.placement_of` on a `LlamaModel` built at this layout
    (tests compare the two); ``with_tp_rank`` gives another TP rank's.
    """
    h, d = config.hidden_size, config.head_dim
    q, kv, ffn = config.num_attention_heads * d, config.num_query_groups * d, config.ffn_hidden_size
    padded = pad_vocab_size(config.vocab_size, tp_size, config.make_vocab_size_divisible_by)

    def column(name: str, parts: list[tuple[str, int]], sizes: list[int]) -> Placement:
        if tp_size == 1:
            return Placement(name, parts, None, [], 0, 1, [sum(sizes), h], 0, sum(sizes) * h)
        rows = sum(sizes) // tp_size
        return Placement(name, parts, 0, sizes, 0, tp_size, [rows, h], 0, rows * h)

    def row(name: str, columns: int) -> Placement:
        if tp_size == 1:
            return Placement(name, [(name, h)], None, [], 0, 1, [h, columns], 0, h * columns)
        local = columns // tp_size
        return Placement(name, [(name, h)], 1, [columns], 0, tp_size, [h, local], 0, h * local)

    def replicated(name: str, parts: list[tuple[str, int]], shape: list[int]) -> Placement:
        return Placement(name, parts, None, [], 0, 1, shape, 0, math.prod(shape))

    stages = config.virtual_stage_layers(pp_size)
    out = []
    for stage, layers in enumerate(stages):
        first, last = stage == 0, stage == pp_size - 1
        placements = []
        if first:
            placements.append(
                column("embedding.weight", [("embedding.weight", config.vocab_size)], [padded])
            )  # noqa: E501
        for n in layers:
            p = f"layers.{n}."
            placements.append(
                replicated(p + "input_norm.weight", [(p + "input_norm.weight", h)], [h])
            )  # noqa: E501
            qkv = [(p + "attention.q.weight", q), (p + "attention.k.weight", kv),
                   (p + "attention.v.weight", kv)]  # fmt: skip
            if config.num_query_groups >= tp_size:
                placements.append(column(p + "attention.qkv.weight", qkv, [q, kv, kv]))
            else:  # fewer K/V heads than TP ranks: K|V replicated (ReplicatedKeyValue)
                placements.append(column(p + "attention.q.weight", qkv[:1], [q]))
                placements.append(replicated(p + "attention.kv.weight", qkv[1:], [2 * kv, h]))
            placements.append(row(p + "attention.out.weight", q))
            norm = p + "post_attention_norm.weight"
            placements.append(replicated(norm, [(norm, h)], [h]))
            gate_up = [(p + "mlp.gate.weight", ffn), (p + "mlp.up.weight", ffn)]
            placements.append(column(p + "mlp.gate_up.weight", gate_up, [ffn, ffn]))
            placements.append(row(p + "mlp.down.weight", ffn))
        if last:
            placements.append(replicated("final_norm.weight", [("final_norm.weight", h)], [h]))
            if not config.tie_word_embeddings:  # a tied head is saved as the embedding only
                head = [("output_layer.weight", config.vocab_size)]
                placements.append(column("output_layer.weight", head, [padded]))
        out.append(placements)
    return out


def with_tp_rank(placement: Placement, tp_rank: int) -> Placement:
    """The same placement on another TP rank (replicated ones stay on rank 0)."""
    if placement.partition_dim is None:
        return placement
    return dataclasses.replace(placement, tp_rank=tp_rank)


# HF input ----------------------------------------------------------------------------------


class HFCheckpoint:
    """A HF LLaMA directory read lazily: ``config.json`` plus ``*.safetensors`` (with or
    without ``model.safetensors.index.json``) or ``pytorch_model*.bin``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{config_path} does not exist: --load-dir must be a HF model")
        self.hf_config = json.loads(config_path.read_text())
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        files = sorted(self.directory.glob("*.safetensors"))
        self._binary = not files
        if self._binary:
            files = sorted(self.directory.glob("pytorch_model*.bin"))
        if not files:
            raise ConversionError(f"no *.safetensors or pytorch_model*.bin in {self.directory}")
        index = self.directory / "model.safetensors.index.json"
        if not self._binary and index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: self.directory / f for name, f in weight_map.items()}
        else:
            for path in files:
                self._where.update(dict.fromkeys(self._handle(path).keys(), path))
        self._where = {
            n: p for n, p in self._where.items() if not n.endswith("rotary_emb.inv_freq")
        }

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self._where[name])
        if self._binary:
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, from the header (no tensor is read)."""
        handle = self._handle(self._where[name])
        if self._binary:
            return handle[name].dtype
        code = handle.get_slice(name).get_dtype()
        return next(t for t, c in SAFETENSORS_DTYPES.items() if c == code)

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(self._where[name])
        return handle[name] if self._binary else handle.get_tensor(name)

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            if self._binary:  # mmap: tensors are read from the page cache when touched
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (pre-1.6, non-zip) format cannot be mapped
                    state = torch.load(path, map_location="cpu", weights_only=True)
                self._open[path] = state
            else:
                self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]


def check_hf_tensors(source: HFCheckpoint, config: ModelConfig) -> None:
    """Every tensor present with the shape the config implies, and nothing unknown."""
    expected = canonical_shapes(config)
    problems, seen = [], set()
    for name in source.names():
        try:
            canonical = hf_to_canonical_name(name)
        except KeyError as error:
            raise ConversionError(f"{source.directory}: {error.args[0]}") from None
        if canonical == "output_layer.weight" and config.tie_word_embeddings:
            continue  # a tied head saved anyway: it is the embedding
        if canonical not in expected:
            problems.append(f"unexpected tensor {name}")
            continue
        seen.add(canonical)
        if source.shape(name) != expected[canonical]:
            problems.append(
                f"tensor {name} has shape {source.shape(name)}, config.json implies "
                f"{expected[canonical]}"
            )
    missing = [canonical_to_hf_name(n) for n in expected if n not in seen]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if problems:
        raise ConversionError(f"{source.directory}: " + "; ".join(problems))


# Engine output -----------------------------------------------------------------------------


def write_engine_checkpoint(
    save_dir: str | Path,
    config: ModelConfig,
    canonical: Callable[[str], torch.Tensor],
    tp_size: int,
    pp_size: int,
    dtype: torch.dtype,
    source: dict[str, Any],
    tokenizer: dict[str, str] | None = None,
) -> Path:
    """Write a weights-only engine checkpoint (iteration 0) at TP x PP from canonical tensors
    given by name, one parameter at a time; returns its directory. ``source`` describes the
    input (recorded as ``config.converted_from``), ``tokenizer`` its tokenizer flags."""
    save_dir = Path(save_dir)
    if (save_dir / LATEST_FILE).exists():  # never repoint a training run's `latest` to 0
        raise ConversionError(
            f"--save-dir {save_dir} already holds a checkpoint ({LATEST_FILE}): choose a new "
            "directory"
        )
    final = iteration_dir(save_dir, 0)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = dataclasses.replace(config, params_dtype=dtype)
    files = []
    for pp_rank, placements in enumerate(stage_placements(config, tp_size, pp_size)):
        # One writer per TP rank of the stage: each full parameter is built once and every
        # rank's shard goes to its file straight away.
        writers, index = [], []
        for tp_rank in range(tp_size):
            mine = [with_tp_rank(p, tp_rank) for p in placements]
            mine = [p for p in mine if p.partition_dim is not None or tp_rank == 0]
            entries = {f"{MODEL_STATE}/{p.param}/0": p for p in mine}
            index.append(entries)
            name = f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"
            specs = [(key, dtype, tuple(p.local_shape)) for key, p in entries.items()]
            meta = {"index": json.dumps({k: dataclasses.asdict(p) for k, p in entries.items()})}
            writers.append(StreamingSafetensorsWriter(tmp / name, specs, meta))
            files.append(name)
        for placement in placements:
            parts = {name: canonical(name).to(dtype) for name, _ in placement.parts}
            for tp_rank, writer in enumerate(writers):
                key = f"{MODEL_STATE}/{placement.param}/0"
                if key in index[tp_rank]:
                    local = local_from_canonical(index[tp_rank][key], parts.__getitem__)
                    writer.write(key, local)
            del parts
        for writer in writers:
            writer.close()
    metadata = {
        "format_version": FORMAT_VERSION, "iteration": 0, "consumed_samples": 0,
        "layout": {
            "world_size": tp_size * pp_size, "tensor_model_parallel_size": tp_size,
            "pipeline_model_parallel_size": pp_size,
            "virtual_pipeline_model_parallel_size": None, "data_parallel_size": 1,
        },
        "use_distributed_optimizer": False, "has_optimizer_state": False,
        "model": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "config": {"converted_from": source, "data": tokenizer or {}},
        "lr_scheduler": None, "optimizer_step": 0,
        "grad_scaler": None, "skipped_steps": 0, "files": sorted(files),
        "versions": {
            "engine": engine.__version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version(),
        },
        "saved_at_unix_s": time.time(),
    }  # fmt: skip
    write_text_atomic(tmp / METADATA_FILE, json.dumps(metadata, indent=1))
    publish(tmp, final)
    write_text_atomic(save_dir / LATEST_FILE, "0")
    return final


def _check_layout(config: ModelConfig, tp_size: int, pp_size: int, source: str | Path) -> None:
    """`engine.config.validate` for the target layout, as a `ConversionError`."""
    try:
        config.validate(ParallelConfig(tp_size, pp_size))
    except ValueError as error:
        raise ConversionError(
            f"cannot lay out {source} at --target-tensor-parallel-size {tp_size}, "
            f"--target-pipeline-parallel-size {pp_size}: {error}"
        ) from None


def hf_to_engine(
    load_dir: str | Path,
    save_dir: str | Path,
    tp_size: int = 1,
    pp_size: int = 1,
    dtype: torch.dtype | None = None,
    make_vocab_size_divisible_by: int = 128,
    checkpoint_type: str = "hf",
) -> Path:
    """Convert a HF LLaMA directory (``checkpoint_type="meta"``: Meta's ``params.json`` +
    ``consolidated.00.pth``, Q/K permuted, see `engine.models.llama.meta`) into an engine
    checkpoint at TP x PP (``dtype``: as stored when None); returns its directory."""
    if checkpoint_type == "meta":
        try:
            source = MetaCheckpoint(load_dir)
        except ValueError as error:
            raise ConversionError(str(error)) from None
    else:
        source = HFCheckpoint(load_dir)
    config = model_config_from_hf(source.hf_config, make_vocab_size_divisible_by)
    _check_layout(config, tp_size, pp_size, load_dir)
    check_hf_tensors(source, config)
    dtype = dtype or source.dtype(canonical_to_hf_name("embedding.weight"))

    def canonical(name: str) -> torch.Tensor:
        return source.get(canonical_to_hf_name(name))

    # The special token ids are the tokenizer's, not the architecture's: kept for the export.
    tokens = {k: source.hf_config[k] for k in _TOKEN_IDS if source.hf_config.get(k) is not None}
    info = {"format": checkpoint_type, "path": str(Path(load_dir).resolve()), **tokens}
    return write_engine_checkpoint(
        save_dir, config, canonical, tp_size, pp_size, dtype, info, _hf_tokenizer(load_dir)
    )


def _hf_tokenizer(directory: str | Path) -> dict[str, str]:
    """The tokenizer flags of the HF directory's own tokenizer (recorded in the checkpoint's
    ``config.data``, where tools/evaluate.py finds its default), if it has one."""
    directory = Path(directory).resolve()
    if (directory / "tokenizer.model").is_file():
        return {
            "tokenizer_type": "Llama2Tokenizer",
            "tokenizer_model": str(directory / "tokenizer.model"),
        }
    if (directory / "tokenizer.json").is_file():
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(directory)}
    return {}


def _engine_reader(load_dir: str | Path, iteration: int | None) -> tuple[Path, dict, ShardReader]:
    """The checkpoint's directory, metadata and a reader of its canonical weights."""
    directory, metadata = open_checkpoint(load_dir, iteration)
    headers = {
        directory / f: read_shard_header(directory / f)
        for f in metadata["files"]
        if f.startswith("model_")
    }
    return directory, metadata, ShardReader(headers, MODEL_STATE)


def reshard(
    load_dir: str | Path,
    save_dir: str | Path,
    tp_size: int,
    pp_size: int,
    iteration: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Rewrite an engine checkpoint's weights at another TP x PP (weights only, iteration 0:
    a training run resumes through `load_checkpoint`, which reshards by itself)."""
    directory, metadata, reader = _engine_reader(load_dir, iteration)
    config = model_config_from_metadata(metadata)
    _check_layout(config, tp_size, pp_size, directory)
    dtype = dtype or config.params_dtype
    info = {"format": "engine", "path": str(directory.resolve()), "layout": metadata["layout"]}
    data = metadata.get("config", {}).get("data") or {}
    tokenizer = {k: data[k] for k in ("tokenizer_type", "tokenizer_model") if data.get(k)}
    return write_engine_checkpoint(
        save_dir, config, reader.canonical, tp_size, pp_size, dtype, info, tokenizer
    )


def engine_to_hf(
    load_dir: str | Path,
    save_dir: str | Path,
    iteration: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size_bytes: int = 5 * 2**30,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write an engine checkpoint (any layout) as a HF LLaMA directory: sharded safetensors,
    ``model.safetensors.index.json``, ``config.json`` and, if given, the tokenizer's files."""
    directory, metadata, reader = _engine_reader(load_dir, iteration)
    config = model_config_from_metadata(metadata)
    dtype = dtype or config.params_dtype
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    shapes = canonical_shapes(config)  # vocabulary padding is not in the canonical view
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(canonical_to_hf_name(n), dtype, shapes[n]) for n in names]
        writer = StreamingSafetensorsWriter(save_dir / file, specs, {"format": "pt"})
        for name in names:
            writer.write(canonical_to_hf_name(name), reader.canonical(name).to(dtype))
            weight_map[canonical_to_hf_name(name)] = file
        writer.close()
    total = sum(math.prod(s) * dtype.itemsize for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = hf_config_dict(config, dtype)
    source = metadata.get("config", {}).get("converted_from") or {}
    hf_config.update({k: source[k] for k in _TOKEN_IDS if k in source})
    (save_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), save_dir)
    return save_dir


_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "generation_config.json")


def copy_tokenizer_files(source: Path, save_dir: Path) -> list[str]:
    """Copy a tokenizer (a directory's ``tokenizer*`` files and companions, or one
    SentencePiece ``.model`` file, saved as ``tokenizer.model``); returns the names copied."""
    if source.is_file():
        shutil.copyfile(source, save_dir / "tokenizer.model")
        return ["tokenizer.model"]
    copied = [
        path.name
        for path in sorted(source.iterdir())
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in _TOKENIZER_FILES)
    ]
    if not copied:
        raise ConversionError(f"--tokenizer-dir {source} holds no tokenizer files")
    for name in copied:
        shutil.copyfile(source / name, save_dir / name)
    return copied
