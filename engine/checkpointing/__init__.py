"""Sharded, atomic checkpoints that load under any TP / PP / DP layout.

`protocol` decides who writes and reads what, and when; `metadata` is what ``metadata.json``
records and the check that a checkpoint fits the model; `format` is what a shard file holds
and how shards from any layout turn back into full tensors; `storage` the directories and
atomic renames; `rng` the random streams; `safetensors_writer` streams tensors to disk;
`integrity` the files' checksums and the refusal of non-finite state; `snapshot` what one rank
saves at an instant and writing it; `async_save` saving in the background.
"""

from engine.checkpointing.async_save import AsyncSave, save_checkpoint_async
from engine.checkpointing.integrity import NonFiniteStateError
from engine.checkpointing.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    check_architecture,
    checkpoint_digest,
    open_checkpoint,
)
from engine.checkpointing.protocol import load_checkpoint, read_full_state, save_checkpoint
from engine.checkpointing.storage import (
    LATEST_FILE,
    CheckpointError,
    iteration_dir,
    read_latest_iteration,
)

__all__ = [
    "AsyncSave",
    "FORMAT_VERSION",
    "LATEST_FILE",
    "METADATA_FILE",
    "CheckpointError",
    "NonFiniteStateError",
    "check_architecture",
    "checkpoint_digest",
    "iteration_dir",
    "load_checkpoint",
    "open_checkpoint",
    "read_full_state",
    "read_latest_iteration",
    "save_checkpoint",
    "save_checkpoint_async",
]
