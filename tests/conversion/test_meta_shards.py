"""Meta's multi-file checkpoints (``consolidated.00.pth`` .. ``consolidated.0N.pth``), read by
`engine.models.llama.meta.MetaCheckpoint`.

A random small single-file Meta checkpoint is split into 2 and 4 files as Meta's
model-parallel tooling (fairscale's layers) shards it: Q, K, V, w1, w3 and the head along
dim 0, wo and w2 along dim 1, the embedding along dim 1 (LLaMA-2's ``ParallelEmbedding``) or
dim 0 (LLaMA-3's ``VocabParallelEmbedding``), the norms and ``rope.freqs`` copied. Converting
the directory to an engine checkpoint at TP=2 x PP=2 gives exactly the files' tensors the
single-file one gives, bit for bit (through ``tools/convert_checkpoint.py``, in process and as
a script). A missing shard, a replicated tensor that differs, different tensor names and a
split that fits no merge are refused, naming the file and the tensor.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.checkpointing import open_checkpoint
from engine.conversion.convert import ConversionError, hf_to_engine
from engine.models import ModelConfig
from engine.models.llama.meta import MetaCheckpoint, meta_ffn_hidden_size
from engine.models.rope import RopeScaling
from tests.paths import REPO
from tools.convert_checkpoint import main as convert_main

VOCAB = 300  # padded by the engine; 150 or 75 rows per Meta shard

COLUMN_PARALLEL = {"wq", "wk", "wv", "w1", "w3", "output"}  # fairscale splits the rows
ROW_PARALLEL = {"wo", "w2"}  # fairscale splits the columns


def meta_params(kv_heads: int, vocab_in_params: bool) -> dict:
    """A small ``params.json``: 8 heads of 8, FFN 176; LLaMA-2 leaves ``vocab_size`` at -1."""
    return {"dim": 64, "n_layers": 4, "n_heads": 8, "n_kv_heads": kv_heads, "multiple_of": 16,
            "norm_eps": 1e-5, "vocab_size": VOCAB if vocab_in_params else -1}  # fmt: skip


def random_meta_state(params: dict) -> dict[str, torch.Tensor]:
    """A random bfloat16 Meta state dict: every tensor the LLaMA inventory names, under its
    Meta name and full shape, and Meta's ``rope.freqs``."""
    config = ModelConfig(
        num_layers=params["n_layers"], hidden_size=params["dim"],
        num_attention_heads=params["n_heads"], num_query_groups=params["n_kv_heads"],
        ffn_hidden_size=meta_ffn_hidden_size(params), vocab_size=VOCAB,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    state = {}
    for tensor in config.inventory().canonical_tensors():
        values = torch.randn(tensor.shape, generator=generator)
        if len(tensor.shape) == 1:  # norms: around 1, and different in every layer
            values = 1 + values / 4
        state[tensor.meta] = values.to(torch.bfloat16)
    head_dim = params["dim"] // params["n_heads"]
    state["rope.freqs"] = 1e4 ** -(torch.arange(0, head_dim, 2) / head_dim)
    return state


def split_like_meta(
    state: dict[str, torch.Tensor], shards: int, embedding_dim: int
) -> list[dict[str, torch.Tensor]]:
    """The state as ``shards`` model-parallel ranks hold it, each tensor split in rank order
    along its layer's dim (``embedding_dim`` for the embedding) or copied."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, tensor in state.items():
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        dim = {"tok_embeddings": embedding_dim, **dict.fromkeys(COLUMN_PARALLEL, 0),
               **dict.fromkeys(ROW_PARALLEL, 1)}.get(module)  # fmt: skip
        parts = [tensor] * shards if dim is None else list(torch.chunk(tensor, shards, dim))
        for rank, part in enumerate(parts):
            out[rank][name] = part.clone()  # its own storage, as each rank saves only its own
    return out


def write_meta(directory: Path, params: dict, shards: list[dict[str, torch.Tensor]]) -> Path:
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    return directory


def engine_tensors(checkpoint: Path) -> dict[tuple[str, str], torch.Tensor]:
    """Every tensor of a converted checkpoint's model files, by (file, key)."""
    directory, metadata = open_checkpoint(checkpoint)
    out = {}
    for file in (f for f in metadata["files"] if f.startswith("model_")):
        with safe_open(str(directory / file), "pt") as handle:
            out.update({(file, key): handle.get_tensor(key) for key in handle.keys()})
    return out


def assert_same_engine_tensors(ours: Path, reference: Path) -> None:
    ours_tensors, reference_tensors = engine_tensors(ours), engine_tensors(reference)
    assert sorted(ours_tensors) == sorted(reference_tensors)
    assert len({file for file, _ in reference_tensors}) == 4  # TP=2 x PP=2
    for key, tensor in reference_tensors.items():
        assert ours_tensors[key].dtype == tensor.dtype == torch.bfloat16, key
        assert torch.equal(ours_tensors[key], tensor), key


def convert_args(load_dir: Path, save_dir: Path) -> list[str]:
    return ["hf-to-engine", "--checkpoint-type", "meta", "--load-dir", str(load_dir),
            "--save-dir", str(save_dir), "--target-tensor-parallel-size", "2",
            "--target-pipeline-parallel-size", "2"]  # fmt: skip


@pytest.mark.parametrize(
    "shards, kv_heads, embedding_dim, vocab_in_params",
    [
        (2, 8, 1, False),  # LLaMA-2-13B: MHA, ParallelEmbedding, vocab_size -1
        (4, 4, 1, False),  # LLaMA-2-70B: GQA with as many K/V heads as shards
        (2, 8, 0, True),  # LLaMA-3: VocabParallelEmbedding
        (4, 4, 0, True),  # LLaMA-3-70B: GQA with as many K/V heads as shards
    ],
)
def test_sharded_checkpoint_converts_like_the_single_file(
    tmp_path, shards, kv_heads, embedding_dim, vocab_in_params
):
    params = meta_params(kv_heads, vocab_in_params)
    state = random_meta_state(params)
    single = write_meta(tmp_path / "single", params, [state])
    split = split_like_meta(state, shards, embedding_dim)
    assert (
        split[1]["tok_embeddings.weight"].shape[embedding_dim] * shards
        == state["tok_embeddings.weight"].shape[embedding_dim]
    )  # the split under test, not a copy
    sharded = write_meta(tmp_path / "sharded", params, split)

    # The reader: the same names, shapes, dtypes and (merged, then Q/K-permuted) tensors.
    one, many = MetaCheckpoint(single), MetaCheckpoint(sharded)
    assert many.names() == one.names() and many.hf_config == one.hf_config
    for name in one.names():
        assert many.shape(name) == one.shape(name) and many.dtype(name) == one.dtype(name)
        assert torch.equal(many.get(name), one.get(name)), name

    hf_to_engine(single, tmp_path / "from_single", 2, 2, checkpoint_type="meta")
    assert convert_main(convert_args(sharded, tmp_path / "from_sharded")) == 0
    assert_same_engine_tensors(tmp_path / "from_sharded", tmp_path / "from_single")


def test_the_script_converts_a_sharded_directory(tmp_path):
    """``python tools/convert_checkpoint.py`` itself, on LLaMA-3-style shards with GQA."""
    params = meta_params(kv_heads=2, vocab_in_params=True)
    state = random_meta_state(params)
    single = write_meta(tmp_path / "single", params, [state])
    sharded = write_meta(tmp_path / "sharded", params, split_like_meta(state, 2, 0))
    hf_to_engine(single, tmp_path / "from_single", 2, 2, checkpoint_type="meta")
    command = [sys.executable, "tools/convert_checkpoint.py"]
    result = subprocess.run(
        command + convert_args(sharded, tmp_path / "from_sharded"),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "hf-to-engine: wrote" in result.stdout
    assert_same_engine_tensors(tmp_path / "from_sharded", tmp_path / "from_single")


@pytest.fixture
def four_shards() -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """LLaMA-2-style params and its state in four shards, to be spoiled by each test."""
    params = meta_params(kv_heads=4, vocab_in_params=False)
    return params, split_like_meta(random_meta_state(params), 4, 1)


def refusal(directory: Path) -> str:
    """The message converting ``directory`` is refused with."""
    with pytest.raises(ConversionError) as error:
        hf_to_engine(directory, directory.with_name("out"), checkpoint_type="meta")
    return str(error.value)


def test_a_missing_shard_is_named(tmp_path, four_shards, capsys):
    directory = write_meta(tmp_path / "meta", *four_shards)
    (directory / "consolidated.01.pth").unlink()
    assert "consolidated.01.pth is missing" in refusal(directory)
    # The command line prints it and exits with 1.
    assert convert_main(convert_args(directory, tmp_path / "cli")) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_a_replicated_norm_that_differs_is_named(tmp_path, four_shards):
    params, shards = four_shards
    shards[2]["layers.1.ffn_norm.weight"][5] += 1
    message = refusal(write_meta(tmp_path / "meta", params, shards))
    assert re.search(r"consolidated\.02\.pth: tensor layers\.1\.ffn_norm\.weight differs", message)


def test_different_tensor_names_are_named(tmp_path, four_shards):
    params, shards = four_shards
    del shards[3]["layers.2.attention.wk.weight"]
    shards[3]["layers.2.attention.wk.bias"] = torch.zeros(8)
    message = refusal(write_meta(tmp_path / "meta", params, shards))
    assert "consolidated.03.pth lacks layers.2.attention.wk.weight" in message
    assert "consolidated.03.pth has layers.2.attention.wk.bias" in message


def test_a_split_that_fits_no_merge_is_named(tmp_path, four_shards):
    """wo split along its rows (dim 0) instead of its columns: its shards concatenate to
    neither the right shape nor along the right dim."""
    params, shards = four_shards
    full = torch.cat([shard["layers.0.attention.wo.weight"] for shard in shards], 1)
    for shard, part in zip(shards, torch.chunk(full, 4, 0), strict=True):
        shard["layers.0.attention.wo.weight"] = part.clone()
    message = refusal(write_meta(tmp_path / "meta", params, shards))
    assert "tensor layers.0.attention.wo.weight has shards consolidated.00.pth (16, 64)" in message
    assert "(64, 64), the shape params.json implies" in message


@pytest.mark.parametrize("factor", [None, 32.0])
def test_llama3_1_scaled_rope_converts_with_meta_s_fixed_parameters(tmp_path, factor):
    """``use_scaled_rope`` (LLaMA-3.1/3.2): the factors Meta's reference code fixes (factor 8,
    or the ``rope_scaling_factor`` 3.2's small models name), low 1, high 4, context 8192."""
    params = {**meta_params(4, True), "use_scaled_rope": True, "rope_theta": 500000.0}
    if factor is not None:
        params["rope_scaling_factor"] = factor
    shards = split_like_meta(random_meta_state(params), 2, 0)
    assert convert_main(convert_args(write_meta(tmp_path / "meta", params, shards),
                                     tmp_path / "engine")) == 0  # fmt: skip
    _, metadata = open_checkpoint(tmp_path / "engine")
    config = ModelConfig.from_dict(metadata["model"])
    assert config.rope_scaling == RopeScaling(
        "llama3", factor or 8.0, original_max_position_embeddings=8192, low_freq_factor=1.0,
        high_freq_factor=4.0,
    )  # fmt: skip
    assert config.rotary_base == 500000.0
