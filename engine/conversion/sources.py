"""Checkpoints of other formats, read lazily under HuggingFace names: a HF directory
(`HFCheckpoint`), or what a family's Meta reader opens; and the check that a source holds
exactly the tensors its model's inventory names."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from engine.checkpointing.safetensors_writer import SAFETENSORS_DTYPES
from engine.conversion.errors import ConversionError
from engine.models.inventory import Inventory


class HFSource(Protocol):
    """Tensors under HF names, with the HF ``config.json`` they come with."""

    directory: Path
    hf_config: dict[str, Any]

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...


class HFCheckpoint:
    """A HF model directory read lazily: ``config.json`` plus ``*.safetensors`` (with or
    without ``model.safetensors.index.json``) or ``pytorch_model*.bin``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{config_path} does not exist: --load-dir must be a HF model")
        self.hf_config = json.loads(config_path.read_text())
        self._where: dict[str, Path] = {}
        self._stored: dict[str, str] = {}  # HF name -> the name in the file (see `rename`)
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
        self._stored = {name: name for name in self._where}

    def rename(self, source_name: Callable[[str], str | None]) -> None:
        """Present the file's tensors under ``source_name(name)`` (the family's HF adapter:
        e.g. a missing ``transformer.`` prefix added), dropping those it maps to None
        (buffers that are not weights)."""
        where, stored = {}, {}
        for name, path in self._where.items():
            new = source_name(name)
            if new is not None:
                where[new], stored[new] = path, self._stored[name]
        self._where, self._stored = where, stored

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle, key = self._handle(self._where[name]), self._stored[name]
        if self._binary:
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, from the header (no tensor is read)."""
        handle, key = self._handle(self._where[name]), self._stored[name]
        if self._binary:
            return handle[key].dtype
        code = handle.get_slice(key).get_dtype()
        return next(t for t, c in SAFETENSORS_DTYPES.items() if c == code)

    def get(self, name: str) -> torch.Tensor:
        handle, key = self._handle(self._where[name]), self._stored[name]
        return handle[key] if self._binary else handle.get_tensor(key)

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


def check_hf_tensors(source: HFSource, inventory: Inventory) -> None:
    """Every tensor the inventory names present with its shape, and nothing unknown."""
    expected = {t.name: t.hf_shape for t in inventory.canonical_tensors()}
    tied = {part.name for spec in inventory.specs if spec.tied_to for part in spec.parts}
    to_canonical, to_hf = inventory.renamer("hf", "name"), inventory.renamer("name", "hf")
    problems, seen = [], set()
    for name in source.names():
        try:
            canonical = to_canonical(name)
        except KeyError as error:
            raise ConversionError(f"{source.directory}: {error.args[0]}") from None
        if canonical in tied:
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
    missing = [to_hf(n) for n in expected if n not in seen]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if problems:
        raise ConversionError(f"{source.directory}: " + "; ".join(problems))
