"""Checkpoint conversion: HuggingFace (or Meta) <-> engine checkpoints, and resharding.

Everything streams one parameter at a time, so converting a 7B model needs host memory for a
few copies of its largest tensor, never the whole model:

- the HF weights are opened lazily (``safe_open`` memory-maps safetensors; ``.bin`` files are
  loaded with ``mmap=True, weights_only=True``);
- files are written with `StreamingSafetensorsWriter`, whose header (names, shapes, offsets)
  is known before any tensor is read, so each tensor goes to disk as soon as it is built.

Which tensors a model has, their shapes and their HF names all come from its family's
parameter inventory (`engine.models.inventory`); the family's HF adapter turns ``config.json``
into a `ModelConfig` and back. The engine side (`engine.conversion.writer`) is what
`engine.checkpointing.save_checkpoint` writes. There are no RNG files (nothing trained yet):
load with ``finetune=True`` (``--finetune``) or ``load_rng=False``, as Megatron's converted
checkpoints require ``--finetune`` or ``--no-load-rng``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from engine.checkpointing.format import MODEL_STATE, ShardReader
from engine.checkpointing.format import read_header as read_shard_header
from engine.checkpointing.metadata import open_checkpoint
from engine.checkpointing.safetensors_writer import StreamingSafetensorsWriter
from engine.conversion.errors import ConversionError
from engine.conversion.sources import HFCheckpoint, HFSource, check_hf_tensors
from engine.conversion.writer import write_engine_checkpoint
from engine.data.tokenizer import tokenizer_flags_of_directory
from engine.models.config import ModelConfig
from engine.models.families import FAMILIES, ModelFamily, family_for_hf, family_of
from engine.parallel_state import ParallelConfig
from engine.progress import Progress

# HF config fields that belong to the tokenizer, not the architecture: carried through.
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _check_layout(config: ModelConfig, tp_size: int, pp_size: int, source: str | Path) -> None:
    """`ModelConfig.validate` for the target layout, as a `ConversionError`."""
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
    progress: Progress | None = None,
) -> Path:
    """Convert a HF model directory (``checkpoint_type="meta"``: Meta's ``params.json`` +
    ``consolidated.*.pth``, read by the family that knows the format) into an engine
    checkpoint at TP x PP (``dtype``: as stored when None); returns its directory.
    ``progress`` counts the tensors converted."""
    source, family = _open_source(load_dir, checkpoint_type)
    assert family.hf is not None  # _open_source only picks families with an HF adapter
    try:
        config = family.hf.config_from_hf(source.hf_config, make_vocab_size_divisible_by)
    except ValueError as error:
        raise ConversionError(f"unsupported HF model: {error}") from None
    _check_layout(config, tp_size, pp_size, load_dir)
    inventory = config.inventory()
    check_hf_tensors(source, inventory)
    to_hf, tensors = inventory.renamer("name", "hf"), inventory.canonical_by_name()
    dtype = dtype or source.dtype(to_hf(inventory.canonical_tensors()[0].name))

    def canonical(name: str) -> torch.Tensor:
        tensor = source.get(to_hf(name))
        return tensor.t().contiguous() if tensors[name].hf_transposed else tensor

    # The special token ids are the tokenizer's, not the architecture's: kept for the export.
    tokens = {k: source.hf_config[k] for k in _TOKEN_IDS if source.hf_config.get(k) is not None}
    info = {"format": checkpoint_type, "path": str(Path(load_dir).resolve()), **tokens}
    return write_engine_checkpoint(
        save_dir,
        config,
        _counted(canonical, len(tensors), progress),
        tp_size,
        pp_size,
        dtype,
        info,
        tokenizer_flags_of_directory(load_dir),
    )


def _counted(
    canonical: Callable[[str], torch.Tensor], total: int, progress: Progress | None
) -> Callable[[str], torch.Tensor]:
    """``canonical`` advancing ``progress`` (of ``total`` tensors, and their MB) per tensor
    read: every canonical tensor is read once."""
    if progress is None:
        return canonical
    progress.set_total(total)
    read_bytes = 0

    def read(name: str) -> torch.Tensor:
        nonlocal read_bytes
        tensor = canonical(name)
        read_bytes += tensor.nbytes
        progress.update(advance=1, counters={"MB": read_bytes / 2**20})
        return tensor

    return read


def _open_source(load_dir: str | Path, checkpoint_type: str) -> tuple[HFSource, ModelFamily]:
    """The source's tensors under HF names, and the family whose model they are."""
    if checkpoint_type == "meta":
        readers = [f for f in FAMILIES.values() if f.meta_reader is not None and f.hf]
        if not readers:
            raise ConversionError("no model family reads Meta's original checkpoints")
        try:
            return readers[0].meta_reader(Path(load_dir)), readers[0]  # type: ignore[misc]
        except ValueError as error:
            raise ConversionError(str(error)) from None
    source = HFCheckpoint(load_dir)
    try:
        family = family_for_hf(source.hf_config.get("model_type"))
    except ValueError as error:
        raise ConversionError(f"unsupported HF model: {error}") from None
    assert family.hf is not None  # family_for_hf only finds families with an HF adapter
    source.rename(family.hf.source_name)
    return source, family


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
    progress: Progress | None = None,
) -> Path:
    """Rewrite an engine checkpoint's weights at another TP x PP (weights only, iteration 0:
    a training run resumes through `load_checkpoint`, which reshards by itself); ``progress``
    counts the tensors."""
    directory, metadata, reader = _engine_reader(load_dir, iteration)
    config = ModelConfig.from_dict(metadata["model"])
    _check_layout(config, tp_size, pp_size, directory)
    dtype = dtype or config.params_dtype
    info = {"format": "engine", "path": str(directory.resolve()), "layout": metadata["layout"]}
    data = metadata.get("config", {}).get("data") or {}
    tokenizer = {k: data[k] for k in ("tokenizer_type", "tokenizer_model") if data.get(k)}
    canonical = _counted(reader.canonical, len(config.inventory().canonical_tensors()), progress)
    return write_engine_checkpoint(
        save_dir, config, canonical, tp_size, pp_size, dtype, info, tokenizer
    )


def engine_to_hf(
    load_dir: str | Path,
    save_dir: str | Path,
    iteration: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size_bytes: int = 5 * 2**30,
    tokenizer_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write an engine checkpoint (any layout) as a HF model directory: sharded safetensors,
    ``model.safetensors.index.json``, ``config.json`` and, if given, the tokenizer's files;
    ``progress`` counts the tensors."""
    directory, metadata, reader = _engine_reader(load_dir, iteration)
    config = ModelConfig.from_dict(metadata["model"])
    dtype = dtype or config.params_dtype
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    family = family_of(config)
    if family.hf is None:
        raise ConversionError(f"model family {family.name!r} has no HuggingFace adapter")
    inventory = config.inventory()
    shapes = inventory.canonical_shapes()  # vocabulary padding is not in the canonical view
    to_hf, tensors = inventory.renamer("name", "hf"), inventory.canonical_by_name()
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
    canonical = _counted(reader.canonical, len(shapes), progress)
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(to_hf(n), dtype, tensors[n].hf_shape) for n in names]
        writer = StreamingSafetensorsWriter(save_dir / file, specs, {"format": "pt"})
        for name in names:
            tensor = canonical(name).to(dtype)
            writer.write(to_hf(name), tensor.t() if tensors[name].hf_transposed else tensor)
            weight_map[to_hf(name)] = file
        writer.close()
    total = sum(math.prod(s) * dtype.itemsize for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = family.hf.config_to_hf(config, dtype)
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
