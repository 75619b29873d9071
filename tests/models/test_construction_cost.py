"""What building a model costs (`engine.models.build`): nothing is drawn when a checkpoint
fills the weights right after, and a run from scratch initialises every weight as before.

- A 7B-shaped LLaMA (h 4096, 32 heads, FFN 11,008, 32,000 tokens; one layer, bf16) written as
  a HF checkpoint and converted with `hf_to_engine`: the tools' `load_model` and a LoRA
  fine-tuning run's frozen base (``--pretrained-checkpoint``) call no init method (every call
  into `engine.models.init`'s normal inits is counted) and hold the checkpoint's weights
  exactly;
- a small LLaMA through the trainer: ``--load --finetune`` and a resume from ``--load`` call no
  init method and hold the checkpoint's weights; from scratch (no ``--load``, or a ``--load``
  with no checkpoint yet) every weight matrix is initialised once, to the values
  `build_model_chunks` gives;
- `materialise` keeps the parameters' tensor-parallel attributes and their sharing, recomputes
  buffers with ``reset_buffers()`` and refuses, naming it, a module whose buffers nothing
  would fill;
- `normal_init` on the CPU draws what ``torch.Generator()`` draws; on a GPU (skipped without
  one) a layer built there draws its full weight on the device, the same at every TP size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import engine.models.init as model_init
from engine import parallel_state
from engine.models.build import build_model_chunks, build_uninitialised, materialise
from engine.models.chunk import inventory_of
from engine.models.config import ModelConfig
from engine.models.weights import global_name, split_parts
from engine.peft import is_lora_parameter
from engine.tensor_parallel import normal_init
from engine.tensor_parallel.layers import any_device, draws_on_any_device, initialise_shard
from engine.wrappers import unwrap
from tests.rank_pool import module_pool
from tests.training.test_training import make_job

pytest.importorskip("transformers", reason="transformers is a test extra")

solo = module_pool(1)

SEVEN_B = dict(hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000, layers=1)
SMALL = dict(hidden=64, heads=4, kv_heads=2, ffn=176, vocab=512, layers=2)


def write_hf_llama(directory: Path, dtype: torch.dtype, hidden: int, heads: int,
                   kv_heads: int, ffn: int, vocab: int, layers: int) -> Path:  # fmt: skip
    """A HF LLaMA directory (``config.json`` + ``model.safetensors``), written directly:
    `transformers`' own init and ``save_pretrained`` would take longer than what is tested.
    Each weight is the outer sum of a seeded random column and row (every row and column
    distinct, as in a random matrix, at the cost of writing it)."""
    import transformers

    transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        torch_dtype=str(dtype).removeprefix("torch."), architectures=["LlamaForCausalLM"],
    ).save_pretrained(directory)  # fmt: skip
    kv = kv_heads * hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}  # fmt: skip
    for n in range(layers):
        prefix = f"model.layers.{n}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (ffn, hidden),
            prefix + "mlp.up_proj.weight": (ffn, hidden),
            prefix + "mlp.down_proj.weight": (hidden, ffn),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        }
    generator = torch.Generator().manual_seed(0)

    def random(size: int) -> torch.Tensor:
        return torch.empty(size).normal_(0.0, 0.02, generator=generator).to(dtype)

    tensors = {
        name: random(shape[0])[:, None] + random(shape[1])[None, :]
        if len(shape) == 2 else 1.0 + random(shape[0])
        for name, shape in shapes.items()
    }  # fmt: skip
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def converted(directory: Path, dtype: torch.dtype, shape: dict[str, int]) -> str:
    """The HF LLaMA of ``shape`` converted to an engine checkpoint; its iteration directory."""
    from engine.conversion.convert import hf_to_engine

    hf = write_hf_llama(directory / "hf", dtype, **shape)
    return str(hf_to_engine(hf, directory / "engine"))


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory) -> str:
    return converted(tmp_path_factory.mktemp("seven_b"), torch.bfloat16, SEVEN_B)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    return converted(tmp_path_factory.mktemp("small"), torch.float32, SMALL)


@contextlib.contextmanager
def counted_inits() -> Iterator[list[tuple[int, ...]]]:
    """The shape of every tensor a normal init method of `engine.models.init` fills (the
    seeded init of every weight matrix), while the block runs."""
    calls: list[tuple[int, ...]] = []
    original = model_init.normal_init

    def counting(std: float = 0.02, seed: int | None = None):
        init = original(std, seed)

        def counted(weight: torch.Tensor) -> None:
            calls.append(tuple(weight.shape))
            init(weight)

        return any_device(counted) if draws_on_any_device(init) else counted

    model_init.normal_init = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        model_init.normal_init = original


def differing(directory: str, chunks: list[nn.Module]) -> list[str]:
    """The canonical tensors of ``chunks`` (TP=1; LoRA adapters left out) that differ from
    the HF weights the checkpoint in ``directory`` was converted from (read one at a time:
    the 7B-shaped model is held once)."""
    hf = Path(directory).parents[1] / "hf" / "model.safetensors"
    names, compared = [], set()
    with safe_open(str(hf), framework="pt") as source:
        for chunk in chunks:
            module = unwrap(chunk)
            inventory = inventory_of(module)
            to_hf, tensors = inventory.renamer("name", "hf"), inventory.canonical_by_name()
            for name, param in module.named_parameters():
                if is_lora_parameter(param):
                    continue
                spec = inventory.spec(global_name(module, name))
                for part, held in split_parts(param.detach(), spec).items():
                    expected = source.get_tensor(to_hf(part))
                    expected = expected.t() if tensors[part].hf_transposed else expected
                    names += [] if torch.equal(held, expected.to(held.dtype)) else [part]
                    compared.add(part)
    assert compared == set(source_names := list(tensors)), sorted(compared ^ set(source_names))
    return names


def checkpoint_job(directory: str, **checkpoint):
    """A one-rank training job of the checkpoint's architecture (bf16 for a bf16 one)."""
    config = ModelConfig.from_dict(json.loads((Path(directory) / "metadata.json").read_text())
                                   ["model"])  # fmt: skip
    job = make_job("unused", 1, 1, checkpoint=checkpoint)
    optimizer = dataclasses.replace(job.optimizer, bf16=config.params_dtype == torch.bfloat16)
    return dataclasses.replace(job, model=config, optimizer=optimizer)


def train_run(job, finetuning: bool, directory: str) -> dict:
    """Build the run counting init calls, load as the loop does; what it drew, loaded and
    holds, and where that differs from the checkpoint in ``directory``."""
    from engine.device import init_distributed
    from engine.training import checkpoint as ckpt
    from engine.training.state import TrainingRun

    device = init_distributed()
    with counted_inits() as calls:
        run = TrainingRun(job, device)
    try:
        loaded = ckpt.load(run, finetuning)
        held = {n: p.detach().clone() for c in run.chunks for n, p in unwrap(c).named_parameters()}
        return {
            "calls": calls,
            "loaded": loaded,
            "differing": differing(directory, run.chunks) if loaded else None,
            "held": held,
        }
    finally:
        parallel_state.destroy_model_parallel()


def load_seven_b(directory: str) -> dict:
    """`load_model` and a LoRA run's base from the 7B-shaped checkpoint."""
    from engine.inference.loading import load_model
    from engine.peft import LoraConfig

    parallel_state.initialize_model_parallel(1, 1)
    try:
        with counted_inits() as calls:
            model = load_model(Path(directory).parent)
        tools = {"calls": calls, "differing": differing(directory, [model])}
    finally:
        parallel_state.destroy_model_parallel()
    del model
    job = checkpoint_job(directory, pretrained_checkpoint=str(Path(directory).parent))
    job = dataclasses.replace(job, lora=LoraConfig(rank=4, alpha=8.0))
    lora = train_run(job, True, directory)
    del lora["held"]
    return {"tools": tools, "lora": lora}


def test_a_converted_7b_shaped_checkpoint_loads_without_drawing_a_weight(solo, seven_b):
    out = solo.run(load_seven_b, seven_b)[0]
    assert out["tools"]["calls"] == [] and out["tools"]["differing"] == []
    assert out["lora"]["calls"] == [] and out["lora"]["loaded"].startswith("the base")
    assert out["lora"]["differing"] == []


def test_finetuning_and_resuming_draw_no_weight(solo, small):
    root = str(Path(small).parent)
    finetune = solo.run(train_run, checkpoint_job(small, load=root, finetune=True), False, small)
    assert finetune[0]["calls"] == [] and finetune[0]["loaded"] == root
    assert finetune[0]["differing"] == []
    # A resume (the converted checkpoint holds neither optimizer state nor RNG streams).
    job = checkpoint_job(small, load=root, no_load_optim=True, no_load_rng=True)
    resume = solo.run(train_run, job, False, small)[0]
    assert resume["calls"] == [] and resume["loaded"] and resume["differing"] == []


def build_initialised(config: ModelConfig) -> dict[str, torch.Tensor]:
    parallel_state.initialize_model_parallel(1, 1)
    try:
        (chunk,) = build_model_chunks(config)
        return {name: param.detach() for name, param in chunk.named_parameters()}
    finally:
        parallel_state.destroy_model_parallel()


def test_from_scratch_every_weight_is_initialised_as_before(solo, small, tmp_path):
    # Embedding, output head, and per layer q, k, v, out, gate, up, down.
    expected_calls = 2 + 7 * SMALL["layers"]
    for checkpoint in ({}, {"load": str(tmp_path / "none-yet")}):
        job = checkpoint_job(small, **checkpoint)
        out = solo.run(train_run, job, False, small)[0]
        assert out["loaded"] is None and len(out["calls"]) == expected_calls, checkpoint
        (reference,) = solo.run(build_initialised, job.model)
        assert reference.keys() == out["held"].keys()
        for name, tensor in reference.items():
            assert torch.equal(out["held"][name], tensor), name


def seeded_draws(dtype: torch.dtype) -> dict[str, bool]:
    """Whether the initialised tiny model's weights are the seeded draws that define them
    (normal(0, std) from ``torch.Generator().manual_seed(crc32(f"{init_seed}:{name}"))``,
    full float32 weights cast to ``dtype``)."""
    config = ModelConfig.from_preset("tiny", params_dtype=dtype)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        (chunk,) = build_model_chunks(config)
    finally:
        parallel_state.destroy_model_parallel()

    def draw(name: str, rows: int, columns: int, std: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{config.init_seed}:{name}".encode()))
        return torch.empty(rows, columns).normal_(0.0, std, generator=generator).to(dtype)

    h, q, std = config.hidden_size, config.hidden_size, config.init_method_std
    kv = config.kv_heads * config.head_dim
    qkv = chunk.layers[1].attention.qkv.weight
    down, embedding = chunk.layers[1].mlp.down.weight, chunk.embedding.weight
    return {
        "embedding": torch.equal(
            embedding[: config.vocab_size], draw("embedding", config.vocab_size, h, std)
        )
        and not embedding[config.vocab_size :].any(),  # vocabulary padding: zero
        "q": torch.equal(qkv[:q], draw("layers.1.attention.q", q, h, std)),
        "v": torch.equal(qkv[q + kv :], draw("layers.1.attention.v", kv, h, std)),
        "down": torch.equal(
            down,
            draw("layers.1.mlp.down", h, config.ffn_hidden_size, model_init.output_std(config)),
        ),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_initialised_weights_are_their_seeded_draws(solo, dtype):
    # Drawn in place (float32, TP=1) or into the shared buffer and cast (bf16): the same values.
    assert solo.run(seeded_draws, dtype)[0] == dict.fromkeys(["embedding", "q", "v", "down"], True)


class Tied(nn.Module):
    """Two linears sharing a weight, and a buffer recomputed by ``reset_buffers``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.a.weight.partition_dim = 0  # type: ignore[attr-defined]
        self.register_buffer("steps", torch.arange(3.0), persistent=False)

    def reset_buffers(self) -> None:
        self.steps.copy_(torch.arange(3.0))


def test_materialise_keeps_attributes_and_sharing_and_recomputes_buffers():
    module = build_uninitialised(Tied)
    assert module.a.weight.device.type == "cpu" and module.a.weight is module.b.weight
    assert module.a.weight.partition_dim == 0 and module.a.weight.requires_grad
    assert len(list(module.parameters())) == 2  # still shared: weight, bias
    assert torch.equal(module.steps, torch.arange(3.0))


def test_a_buffer_nothing_fills_is_refused_by_name():
    with torch.device("meta"):
        module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(
        ValueError,
        match=r"module '1' \(BatchNorm1d\) holds the buffers "
        r"running_mean, running_var, num_batches_tracked",
    ):
        materialise(module)  # fmt: skip
    assert module[0].weight.device.type == "meta"  # refused before allocating anything


def test_normal_init_on_the_cpu_draws_what_torch_generator_draws():
    weight = torch.empty(64, 48)
    normal_init(0.02, 1234)(weight)
    expected = torch.empty(64, 48).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(weight, expected)
    blocks = model_init.blocks_init((32, normal_init(0.02, 1)), (32, normal_init(0.02, 2)))
    assert draws_on_any_device(blocks)
    assert not draws_on_any_device(model_init.blocks_init((64, lambda full: None)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_full_weight_is_drawn_there_layout_free():
    full_shape, init = (64, 48), normal_init(0.02, 99)
    full = torch.empty(full_shape, device="cuda")
    init(full)
    for world in (1, 2, 4):
        for rank in range(world):
            shard = torch.empty(64 // world, 48, device="cuda")
            initialise_shard(shard, full_shape, init, 0, [64], rank, world)
            assert torch.equal(shard, full[rank * 64 // world : (rank + 1) * 64 // world])
    # An init method that draws on the CPU only (its own CPU generator) still gets a CPU weight.
    cpu_only = torch.empty(8, 4, device="cuda")
    initialise_shard(cpu_only, (8, 4), lambda w: w.normal_(generator=torch.Generator()),
                     0, [8], 0, 1)  # fmt: skip
    assert cpu_only.is_cuda
