"""The engine's LoRA adapters as HuggingFace PEFT adapter directories, both ways, against the
real `peft` on random tiny `transformers` models (float32, no download) and real gloo ranks:

- adapters set at random on the engine model at TP=2 and at PP=2 (LLaMA with every module or
  HF's ``q_proj, v_proj`` only, Qwen2 with Q/K/V biases), saved by `save_peft_adapter`, load
  into ``PeftModel.from_pretrained(hf_base, directory)`` with no missing or unexpected key
  and give the engine's logits within 1e-4; the files are what PEFT itself writes for them
  (the same tensors, every config field one of PEFT's and equal to its value);
- an adapter saved by PEFT (``save_pretrained``), read by `read_peft_adapter` into the engine
  model at TP=2 with `apply_lora` and `load_lora_state`, gives PEFT's logits within 1e-4;
  names with an adapter (``.lora_A.default.weight``) in ``adapter_model.bin`` read the same;
- DoRA, an ``lm_head`` target and a missing file are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import parallel_state
from engine.models.families import family_for_hf
from engine.models.llama.hf import canonical_from_hf
from engine.models.weights import load_full_state
from engine.peft import (
    LoraConfig,
    apply_lora,
    load_lora_state,
    lora_state,
    read_peft_adapter,
    save_peft_adapter,
)
from engine.peft.interop import ADAPTER_CONFIG_FILE, ADAPTER_PICKLE_FILE, ADAPTER_WEIGHTS_FILE
from engine.pipeline_parallel.forward_only import activation_spec, forward_only_pass
from engine.tensor_parallel import gather_from_tensor_model_parallel_region
from tests.peft.test_lora import (
    ALPHA,
    HF_TARGETS,
    MODELS,
    RANK,
    TOKENS,
    VOCAB,
    random_peft_model,
)
from tests.rank_pool import module_pool

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
peft = pytest.importorskip("peft", reason="peft is a test extra")

TOLERANCE = 1e-4
ENGINE_NAMES = ("qkv", "out", "gate_up", "down")

pool = module_pool(2)


def hf_base(name: str, hf_config: dict, base: dict[str, torch.Tensor]):
    """A fresh HF model of ``name``'s class with the base weights ``base`` (no adapters)."""
    cls, config_cls, _ = MODELS[name]
    config = getattr(transformers, config_cls).from_dict(hf_config)
    model = getattr(transformers, cls)(config).eval()
    model.load_state_dict(base)
    return model


def engine_model(hf_config: dict, base: dict[str, torch.Tensor]):
    """This rank's chunk of the engine model (at the current TP x PP) with the HF weights."""
    family = family_for_hf(hf_config["model_type"])
    config = family.hf.config_from_hf(hf_config, 1)
    model = family.model(config)
    load_full_state(model, canonical_from_hf(base, config))
    return model


def engine_logits(model) -> torch.Tensor | None:
    """Full logits ``[b, s, V]`` on the last pipeline stage (None on the others)."""
    spec = activation_spec(model, (TOKENS.size(1), TOKENS.size(0), model.config.hidden_size))
    logits = forward_only_pass(lambda hidden: model(TOKENS, decoder_input=hidden), spec)
    if logits is None:
        return None
    return gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]


def random_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random A and B of the same names and shapes, each from a generator seeded by its name
    (so every layout and pipeline stage draws the same tensor for it)."""
    out = {}
    for name, tensor in state.items():
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        out[name] = torch.randn(tensor.shape, generator=generator) * 0.2
    return out


def engine_save(hf_config, base, targets, tp, pp, directory, base_path):
    """Random adapters on the engine model at TP x PP, saved as a PEFT adapter of the base
    model at ``base_path``: the logits (last stage) and the adapters of this rank's stage."""
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        model = engine_model(hf_config, base)
        apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=targets))
        adapters = random_like(lora_state(model))
        load_lora_state(model, adapters)
        save_peft_adapter([model], directory, LoraConfig(RANK, ALPHA, 0.0, targets), base_path)
        return {"logits": engine_logits(model), "adapters": adapters}
    finally:
        parallel_state.destroy_model_parallel()


SAVE_CASES = [
    ("llama", ENGINE_NAMES, 2, 1),
    ("llama", ENGINE_NAMES, 1, 2),
    ("qwen2", ENGINE_NAMES, 2, 1),  # Q/K/V biases
    ("llama", ("q_proj", "v_proj"), 2, 1),
    ("llama", ("q_proj", "v_proj"), 1, 2),
]


@pytest.mark.parametrize("name, targets, tp, pp", SAVE_CASES)
def test_saved_adapter_loads_into_peft_with_the_engines_logits(
    pool, tmp_path, name, targets, tp, pp
):
    hf_config, base, _ = random_peft_model(name, HF_TARGETS)
    directory, base_path = tmp_path / "adapter", str(tmp_path / "base")
    hf = hf_base(name, hf_config, base)
    hf.save_pretrained(base_path)  # a local base: PEFT reads its config.json, no hub lookup
    with torch.no_grad():
        without = hf(TOKENS).logits
    results = pool.run(engine_save, hf_config, base, targets, tp, pp, str(directory), base_path)
    expected = next(r["logits"] for r in results if r["logits"] is not None)
    assert (expected - without).abs().max() > 0.05  # the adapters matter
    adapters = {k: v for r in results for k, v in r["adapters"].items()}
    assert sorted(load_file(directory / ADAPTER_WEIGHTS_FILE)) == sorted(adapters)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf, directory)
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    loaded = peft.get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(adapters)  # no missing and no unexpected key
    for key, tensor in adapters.items():
        torch.testing.assert_close(loaded[key], tensor, atol=0, rtol=0, msg=key)
    with torch.no_grad():
        logits = model.eval()(TOKENS).logits
    worst = (logits - expected).abs().max().item()
    assert worst <= TOLERANCE, f"{name} {targets} TP={tp} PP={pp}: |PEFT - engine| {worst:.2e}"

    # PEFT writing the adapter it loaded gives the same tensors and, field by field, our config.
    model.save_pretrained(tmp_path / "resaved")
    theirs = json.loads((tmp_path / "resaved" / ADAPTER_CONFIG_FILE).read_text())
    ours = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    assert set(ours) <= set(theirs)
    for field, value in ours.items():
        if field == "target_modules":  # a set in PEFT: written in any order
            assert sorted(value) == sorted(theirs[field])
        else:
            assert value == theirs[field], field
    assert ours["task_type"] == "CAUSAL_LM" and ours["base_model_name_or_path"] == base_path
    resaved = load_file(tmp_path / "resaved" / ADAPTER_WEIGHTS_FILE)
    assert sorted(resaved) == sorted(adapters)
    for key, tensor in adapters.items():
        torch.testing.assert_close(resaved[key], tensor, atol=0, rtol=0, msg=key)

    # And back: our own reader gives the config and tensors we saved.
    config, tensors = read_peft_adapter(directory)
    assert (config.rank, config.alpha, config.dropout) == (RANK, ALPHA, 0.0)
    assert set(config.blocks()) == set(LoraConfig(target_modules=targets).blocks())
    for key, tensor in adapters.items():
        torch.testing.assert_close(tensors[key], tensor, atol=0, rtol=0, msg=key)


def engine_load(hf_config, base, directory, tp):
    """The PEFT adapter in ``directory`` read into the engine model at TP=tp: its logits."""
    parallel_state.initialize_model_parallel(tp)
    try:
        model = engine_model(hf_config, base)
        config, tensors = read_peft_adapter(directory)
        apply_lora(model, config)
        load_lora_state(model, tensors)
        return engine_logits(model)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize(
    "name, targets", [("llama", HF_TARGETS), ("qwen2", HF_TARGETS), ("llama", ("k_proj", "o_proj"))]
)
def test_peft_saved_adapter_reads_into_the_engine_at_tp2(pool, tmp_path, name, targets):
    hf_config, base, model = random_peft_model(name, targets)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(TOKENS).logits
    for logits in pool.run(engine_load, hf_config, base, str(tmp_path), 2):
        worst = (logits - expected).abs().max().item()
        assert worst <= TOLERANCE, f"{name} {targets}: |engine - PEFT| {worst:.2e}"


def test_adapter_names_and_pickled_weights_read_as_saved(tmp_path):
    _, _, model = random_peft_model("llama", ("q_proj", "v_proj"))
    model.save_pretrained(tmp_path / "saved")
    config, tensors = read_peft_adapter(tmp_path / "saved")
    assert config.target_modules == ("q_proj", "v_proj")
    # The keys as they are in the live model: with the adapter's name, in a pickle.
    named = tmp_path / "named"
    named.mkdir()
    (named / ADAPTER_CONFIG_FILE).write_text((tmp_path / "saved" / ADAPTER_CONFIG_FILE).read_text())
    live = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert all(".default.weight" in k for k in live)
    torch.save(live, named / ADAPTER_PICKLE_FILE)
    again, from_named = read_peft_adapter(named)
    assert again == config and sorted(from_named) == sorted(tensors)
    for key, tensor in tensors.items():
        torch.testing.assert_close(from_named[key], tensor, atol=0, rtol=0, msg=key)


def peft_saved(tmp_path: Path, name: str, **lora) -> Path:
    """A real PEFT adapter directory for the tiny LLaMA with ``peft.LoraConfig(**lora)``."""
    hf_config, base, _ = random_peft_model(name, HF_TARGETS)
    model = peft.get_peft_model(hf_base(name, hf_config, base), peft.LoraConfig(**lora))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_refusals_name_the_field_or_file(tmp_path):
    dora = peft_saved(tmp_path / "dora", "llama", r=RANK, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora True: DoRA"):
        read_peft_adapter(dora)
    head = peft_saved(tmp_path / "head", "llama", r=RANK, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="target_modules lm_head: the engine has no LoRA"):
        read_peft_adapter(head)
    with pytest.raises(FileNotFoundError, match=f"empty/{ADAPTER_CONFIG_FILE} is missing"):
        read_peft_adapter(tmp_path / "empty")
    plain = peft_saved(tmp_path / "plain", "llama", r=RANK, target_modules=["q_proj"])
    (plain / ADAPTER_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"plain/{ADAPTER_WEIGHTS_FILE} is missing"):
        read_peft_adapter(plain)
    # Several refusals at once are all named, with the file.
    record = json.loads((head / ADAPTER_CONFIG_FILE).read_text())
    record.update(bias="all", use_rslora=True, peft_type="IA3", rank_pattern={"q_proj": 2})
    (head / ADAPTER_CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError) as refused:
        read_peft_adapter(head)
    for named in ("head/adapter_config.json", "peft_type 'IA3'", "bias 'all'", "use_rslora",
                  "rank_pattern", "lm_head"):  # fmt: skip
        assert named in str(refused.value)


def save_with(hf_config, base, config, directory):
    """`save_peft_adapter` with ``config`` on a one-process model with the default adapters."""
    parallel_state.initialize_model_parallel()
    try:
        model = engine_model(hf_config, base)
        apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=ENGINE_NAMES))
        save_peft_adapter(model, directory, config)
    finally:
        parallel_state.destroy_model_parallel()


def test_saving_with_another_config_is_refused_on_every_rank(pool, tmp_path):
    hf_config, base, _ = random_peft_model("llama", HF_TARGETS)
    wrong = dataclasses.replace(LoraConfig(rank=RANK, alpha=ALPHA), target_modules=("qkv",))
    with pytest.raises(Exception, match="the LoraConfig passed names k_proj, q_proj, v_proj"):
        pool.run(save_with, hf_config, base, wrong, str(tmp_path))
    assert not (tmp_path / ADAPTER_CONFIG_FILE).exists()
