"""A safetensors file written one tensor at a time, so no more than one tensor is in memory.

`safetensors.torch.save_file` needs every tensor at once; a converter that streams a 7B model
cannot give it that. The format allows streaming when the header is known first: an 8-byte
little-endian header length, a JSON header naming every tensor's dtype, shape and byte range
(and ``__metadata__``), padded with spaces to 8 bytes, then the raw data in that order. The
files this writes are ordinary safetensors files (``safe_open``, ``transformers`` and
`engine.checkpointing.format.read_header` read them). Every byte written is hashed on the way
(`checksum`), for ``metadata.json``'s checksums (`engine.checkpointing.integrity`).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from engine.checkpointing.integrity import HashingFile

SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
}  # fmt: skip


class StreamingSafetensorsWriter:
    """A safetensors file written one tensor at a time, in the order declared up front.

    The header (every name, dtype, shape and byte range) is written first, so no tensor needs
    to be in memory before or after its own ``write``. The result is an ordinary safetensors
    file (``safe_open`` and ``transformers`` read it).
    """

    def __init__(
        self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):  # fmt: skip
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }  # fmt: skip
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors pads
        self.path = path
        self._specs = list(specs)
        self._next = 0
        self._file = HashingFile(path)
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (must be the next declared one, with its dtype and shape)."""
        expected, dtype, shape = self._specs[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path}: expected tensor {expected} {dtype} {tuple(shape)} next, got "
                f"{name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        """Finish the file (fsynced); raises if declared tensors were never written."""
        self._file.close()
        if self._next != len(self._specs):
            raise ValueError(
                f"{self.path}: {len(self._specs) - self._next} declared tensor(s) never "
                f"written, first {self._specs[self._next][0]}"
            )

    def checksum(self) -> dict[str, Any]:
        """The checksum record of everything written (`engine.checkpointing.integrity`)."""
        return self._file.checksum.record()
