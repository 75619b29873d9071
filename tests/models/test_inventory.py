"""One parameter inventory per model family: everything that knows a model's weights reads it.

The test adds a parameter to a tiny family through its inventory alone (a bias on the
attention output, registered as a family of its own) and shows that the model builds it, that
checkpoints save it and reshard it (TP=2 x PP=2 -> TP=1 and TP=4), that the cost model counts
it, and that the HF export writes it, with no other edit anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine import parallel_state
from engine.checkpointing import load_checkpoint, read_full_state, save_checkpoint
from engine.conversion import engine_to_hf
from engine.models import LlamaModel, ModelConfig, get_family, register_family
from engine.models.build import build_model_chunks
from engine.models.inventory import CanonicalTensor, Inventory, ParameterSpec
from engine.models.llama.inventory import llama_inventory
from engine.models.weights import gather_full_state, load_full_state
from engine.planning.cost_model import layer_parameters, rank_parameters
from tests.rank_pool import module_pool


def with_out_bias(config: ModelConfig, tp_size: int) -> Inventory:
    """LLaMA's inventory plus a bias on the attention output projection (replicated over TP:
    the row-parallel layer adds it after the reduction)."""
    base = llama_inventory(config, tp_size)
    h = config.hidden_size
    bias = ParameterSpec(
        "layers.{n}.attention.out.bias",
        (
            CanonicalTensor(
                "layers.{n}.attention.out.bias", (h,), "model.layers.{n}.self_attn.o_proj.bias"
            ),
        ),
        (h,),
        None,
        partial_grad_over_tp=config.sequence_parallel,
    )
    specs = list(base.specs)
    at = next(i for i, s in enumerate(specs) if s.name == "layers.{n}.attention.out.weight")
    specs.insert(at + 1, bias)
    return dataclasses.replace(base, specs=tuple(specs))


# Registered before the ranks fork, so every rank knows the family.
register_family(
    dataclasses.replace(get_family("llama"), name="llama-out-bias", inventory=with_out_bias)
)
CONFIG = ModelConfig.from_preset("tiny", num_layers=4, vocab_size=300, family="llama-out-bias")
BASE = dataclasses.replace(CONFIG, family="llama")

pool = module_pool(4)


def full_weights(seed: int) -> dict[str, torch.Tensor]:
    """Random canonical tensors for every tensor the inventory names (biases included)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator)
        for name, shape in CONFIG.inventory().canonical_shapes().items()
    }


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    parallel_state.initialize_model_parallel()
    try:
        return {name: tuple(p.shape) for name, p in LlamaModel(config).named_parameters()}
    finally:
        parallel_state.destroy_model_parallel()


def test_the_model_builds_what_its_inventory_declares(pool):
    names = pool.run(parameter_shapes, CONFIG)[0]
    extra = set(names) - pool.run(parameter_shapes, BASE)[0].keys()
    assert extra == {f"layers.{n}.attention.out.bias" for n in range(4)}
    # The cost model and num_parameters count it, from the same declaration.
    h = CONFIG.hidden_size
    assert CONFIG.num_parameters() == BASE.num_parameters() + 4 * h
    assert layer_parameters(CONFIG, 2) == layer_parameters(BASE, 2) + h
    assert rank_parameters(CONFIG, 1, 1) == [sum(math.prod(s) for s in names.values())]
    assert [c - b for c, b in zip(rank_parameters(CONFIG, 2, 2), rank_parameters(BASE, 2, 2),
                                  strict=True)] == [2 * h, 2 * h]  # fmt: skip


def build_declaring(extra: str) -> str:
    """The error of building a model whose inventory declares a parameter it cannot build."""
    base = llama_inventory(CONFIG, 1)
    spec = dataclasses.replace(base.specs[1], name=extra)
    register_family(
        dataclasses.replace(
            get_family("llama"),
            name="llama-undeclared",
            inventory=lambda config, tp: dataclasses.replace(base, specs=(*base.specs, spec)),
        )
    )
    parallel_state.initialize_model_parallel()
    try:
        LlamaModel(dataclasses.replace(CONFIG, family="llama-undeclared"))
    except ValueError as error:
        return str(error)
    finally:
        parallel_state.destroy_model_parallel()
    return "built"


def test_a_model_that_does_not_build_its_inventory_is_refused(pool):
    # A bias of a parallel layer: declaring it is enough, the layer builds it.
    assert pool.run(build_declaring, "layers.{n}.mlp.down.bias")[0] == "built"
    # A parameter no module makes: refused when the model is built, naming it.
    message = pool.run(build_declaring, "layers.{n}.attention.extra.weight")[0]
    assert "does not build what its inventory declares" in message
    assert "declared, not built: ['layers.0.attention.extra.weight'" in message


def save_at_tp2_pp2(directory: str) -> dict[str, torch.Tensor]:
    """Build the family at TP=2 x PP=2 with known weights, save, return this stage's view."""
    parallel_state.initialize_model_parallel(2, 2)
    try:
        (chunk,) = build_model_chunks(CONFIG)
        load_full_state(chunk, {k: v for k, v in full_weights(0).items() if _on_stage(chunk, k)})
        save_checkpoint(directory, 5, [chunk], None, None, 0)
        return gather_full_state(chunk)
    finally:
        parallel_state.destroy_model_parallel()


def load_at(directory: str, tp: int) -> dict[str, torch.Tensor]:
    parallel_state.initialize_model_parallel(tp, 1)
    try:
        (chunk,) = build_model_chunks(CONFIG)
        load_checkpoint(directory, [chunk], load_rng=False)
        return gather_full_state(chunk)
    finally:
        parallel_state.destroy_model_parallel()


def _on_stage(chunk: LlamaModel, name: str) -> bool:
    if name.startswith("layers."):
        return int(name.split(".")[1]) in {layer.layer_number for layer in chunk.layers}
    return (name == "embedding.weight" and chunk.pre_process) or (
        name != "embedding.weight" and chunk.post_process
    )


def test_checkpoints_reshard_and_export_the_declared_parameter(pool, tmp_path):
    expected = full_weights(0)
    saved = {}
    for stage in pool.run(save_at_tp2_pp2, str(tmp_path / "ckpt")):
        saved.update(stage)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    on_disk = read_full_state(tmp_path / "ckpt" / "iter_0000005")["model"]
    assert torch.equal(
        on_disk["layers.3.attention.out.bias"], expected["layers.3.attention.out.bias"]
    )
    for tp in (1, 4):  # resharded on load, to fewer and to more TP ranks
        for loaded in pool.run(load_at, str(tmp_path / "ckpt"), tp):
            assert loaded.keys() == expected.keys()
            assert all(torch.equal(loaded[k], expected[k]) for k in expected), f"TP={tp}"

    out = Path(engine_to_hf(tmp_path / "ckpt", tmp_path / "hf"))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for n in range(4):
        name = f"model.layers.{n}.self_attn.o_proj.bias"
        with safe_open(str(out / weight_map[name]), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), expected[f"layers.{n}.attention.out.bias"])


def test_a_checkpoint_without_the_parameter_does_not_fit(pool, tmp_path):
    pool.run(save_at_tp2_pp2, str(tmp_path / "ckpt"))
    metadata = tmp_path / "ckpt" / "iter_0000005" / "metadata.json"
    record = json.loads(metadata.read_text())
    record["model"]["family"] = "llama"  # as if saved by the family without the bias
    metadata.write_text(json.dumps(record))
    with pytest.raises(
        Exception,
        match=r"holds model 'llama' \(4 layers, hidden 64\); this run builds 'llama-out-bias'",
    ):
        pool.run(load_at, str(tmp_path / "ckpt"), 2)
