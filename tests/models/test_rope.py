"""Rope scaling (`engine.models.rope`) against `transformers`' own rope functions.

The inverse frequencies and attention scaling equal ``ROPE_INIT_FUNCTIONS`` (called with a real
``LlamaConfig`` / ``Qwen2Config``) for the published LLaMA-3.1 / 3.2 and Qwen2.5 parameters and
the yarn variants (DeepSeek's mscales, gpt-oss's ``truncate``, defaults and fallbacks), within
1e-6 relative; cos and sin past the original context equal ``LlamaRotaryEmbedding``'s; the
``config.json`` entry reads and writes as transformers 5 and 4.x spell it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from engine.models.rope import (
    ROPE_TYPES,
    RopeScaling,
    inverse_frequencies,
    rope_scaling_from_dict,
    rope_scaling_from_hf,
    rope_scaling_to_hf,
)

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
rope_utils = pytest.importorskip("transformers.modeling_rope_utils")

_LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}  # fmt: skip

# name: (config class, config.json fields): each model's shape (head_dim = hidden / heads), its
# context and its rope entry, as published or as the variant spells it.
CASES: dict[str, tuple[str, dict]] = {
    "llama3.1-8b": ("LlamaConfig", {
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 131072,
        "rope_parameters": {**_LLAMA3, "rope_theta": 500000.0, "factor": 8.0},
    }),
    "llama3.2-1b": ("LlamaConfig", {  # head_dim 64
        "hidden_size": 2048, "num_attention_heads": 32, "max_position_embeddings": 131072,
        "rope_parameters": {**_LLAMA3, "rope_theta": 500000.0, "factor": 32.0},
    }),
    "llama3.2-3b": ("LlamaConfig", {
        "hidden_size": 3072, "num_attention_heads": 24, "max_position_embeddings": 131072,
        "rope_parameters": {**_LLAMA3, "rope_theta": 500000.0, "factor": 32.0},
    }),
    "llama3 without original (falls back to the context)": ("LlamaConfig", {
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 16384,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    }),
    # Qwen2.5-7B-Instruct's model card: add this 4.x `rope_scaling` for 128k tokens.
    "qwen2.5-7b yarn": ("Qwen2Config", {
        "hidden_size": 3584, "num_attention_heads": 28, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
    }),
    # vicuna-7b-v1.5-16k: LLaMA-2 with 4.x linear scaling.
    "linear (vicuna 16k)": ("LlamaConfig", {
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 16384,
        "rope_theta": 10000.0, "rope_scaling": {"factor": 4.0, "type": "linear"},
    }),
    "linear, head_dim 80": ("LlamaConfig", {
        "hidden_size": 2560, "num_attention_heads": 32, "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0},
    }),
    # DeepSeek-V3's yarn (rope head_dim 64): both mscales, beta_fast / beta_slow spelled out.
    "yarn deepseek mscales": ("LlamaConfig", {
        "hidden_size": 1024, "num_attention_heads": 16, "max_position_embeddings": 163840,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                            "original_max_position_embeddings": 4096, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    }),
    "yarn mscale ratio != 1": ("LlamaConfig", {
        "hidden_size": 1024, "num_attention_heads": 16, "max_position_embeddings": 163840,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                            "original_max_position_embeddings": 4096, "mscale": 0.707,
                            "mscale_all_dim": 1.0},
    }),
    # gpt-oss: yarn without truncation of the ramp's ends.
    "yarn gpt-oss truncate false": ("LlamaConfig", {
        "hidden_size": 2880, "num_attention_heads": 64, "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                            "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                            "beta_slow": 1.0, "truncate": False},
    }),
    "yarn attention_factor given": ("Qwen2Config", {
        "hidden_size": 1024, "num_attention_heads": 8, "max_position_embeddings": 65536,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                            "original_max_position_embeddings": 16384, "attention_factor": 0.9,
                            "beta_fast": 16.0, "beta_slow": 2.0},
    }),
    "yarn factor null (max / original)": ("Qwen2Config", {
        "hidden_size": 1024, "num_attention_heads": 8, "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": None,
                            "original_max_position_embeddings": 32768},
    }),
    "yarn without original (falls back to the context)": ("Qwen2Config", {
        "hidden_size": 1024, "num_attention_heads": 8, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0},
    }),
    "yarn factor 1 (no stretch)": ("LlamaConfig", {
        "hidden_size": 1024, "num_attention_heads": 8, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                            "original_max_position_embeddings": 4096},
    }),
}  # fmt: skip


def hf_config(name: str):
    """The transformers config of a case (a copy: transformers edits the rope dict it gets)."""
    config_class, fields = CASES[name]
    return getattr(transformers, config_class)(**copy.deepcopy(fields))


def rope_theta(fields: dict) -> float:
    """The base as config.json holds it: in ``rope_parameters`` (5) or at the top (4.x)."""
    return (fields.get("rope_parameters") or {}).get("rope_theta", fields.get("rope_theta"))


def engine_rope(name: str) -> tuple[torch.Tensor, float]:
    _, fields = CASES[name]
    head_dim = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    scaling = rope_scaling_from_hf(fields)
    return inverse_frequencies(
        head_dim, rope_theta(fields), scaling, fields["max_position_embeddings"]
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_frequencies_and_attention_scaling_equal_transformers(name):
    config = hf_config(name)
    rope_type = config.rope_parameters["rope_type"]
    theirs, their_scaling = rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    ours, our_scaling = engine_rope(name)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert our_scaling == pytest.approx(their_scaling, rel=1e-12)


def test_the_published_parameters_read_as_the_engine_spells_them():
    llama31 = RopeScaling("llama3", 8.0, original_max_position_embeddings=8192,
                          low_freq_factor=1.0, high_freq_factor=4.0)  # fmt: skip
    assert rope_scaling_from_hf(CASES["llama3.1-8b"][1]) == llama31
    assert rope_scaling_from_hf(CASES["llama3.2-1b"][1]) == dataclasses.replace(llama31, factor=32)
    qwen = rope_scaling_from_hf(CASES["qwen2.5-7b yarn"][1])
    assert qwen == RopeScaling("yarn", 4.0, original_max_position_embeddings=32768)
    # yarn's defaults: 0.1 ln(4) + 1 on cos and sin.
    assert inverse_frequencies(128, 1e6, qwen, 32768)[1] == pytest.approx(0.1 * math.log(4) + 1)
    derived = rope_scaling_from_hf(CASES["yarn factor null (max / original)"][1])
    assert derived is not None and derived.factor == 4.0


def test_plain_rope_equals_transformers_default():
    config = hf_config("llama3.1-8b")
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    llama = transformers.models.llama.modeling_llama
    theirs, _ = llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    ours, scaling = inverse_frequencies(128, 500000.0, None, 131072)
    assert torch.equal(ours, theirs) and scaling == 1.0


@pytest.mark.parametrize(
    "name, embedding",
    [
        ("llama3.1-8b", "LlamaRotaryEmbedding"),
        ("llama3.2-1b", "LlamaRotaryEmbedding"),
        ("qwen2.5-7b yarn", "Qwen2RotaryEmbedding"),
        ("yarn gpt-oss truncate false", "LlamaRotaryEmbedding"),
    ],
)
def test_cos_sin_past_the_original_context_equal_transformers(name, embedding):
    config = hf_config(name)
    module = getattr(transformers.models, config.model_type)
    rotary = getattr(getattr(module, f"modeling_{config.model_type}"), embedding)(config)
    # Positions on both sides of the original context and up to the stretched one.
    positions = torch.tensor([[0, 1, 4095, 8191, 8192, 8193, 20000, 32767, 32768, 65537, 131071]])
    inv_freq, scaling = engine_rope(name)
    x = torch.zeros(1, positions.shape[1], 2 * inv_freq.numel())  # only its dtype is read
    their_cos, their_sin = rotary(x, positions)
    # As the engine's RotaryEmbedding rotates: angle = position * f for each pair, twice.
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(angles.cos() * scaling, their_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(angles.sin() * scaling, their_sin, rtol=0, atol=1e-6)


# config.json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["llama3.1-8b", "llama3.2-3b", "linear, head_dim 80", "yarn deepseek mscales",
     "yarn gpt-oss truncate false", "yarn attention_factor given"],
)  # fmt: skip
def test_rope_parameters_round_trip_as_transformers_5_writes_them(name, tmp_path):
    _, fields = CASES[name]
    scaling = rope_scaling_from_hf(fields)
    written = rope_scaling_to_hf(scaling, rope_theta(fields))
    assert written == fields["rope_parameters"]
    # What transformers writes for these fields is what we write, and reads back the same.
    config = hf_config(name)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"] == written
    assert rope_scaling_from_hf(saved) == scaling
    reread = transformers.LlamaConfig(rope_parameters=copy.deepcopy(written))
    assert reread.rope_parameters == written


def test_transformers_4_rope_scaling_reads_as_the_rope_parameters_it_becomes():
    for name in ("qwen2.5-7b yarn", "linear (vicuna 16k)"):
        _, fields = CASES[name]
        old = rope_scaling_from_hf(fields)
        assert old is not None and old.rope_type == fields["rope_scaling"]["type"]
        new_style = {**fields, "rope_scaling": None,
                     "rope_parameters": rope_scaling_to_hf(old, fields["rope_theta"])}  # fmt: skip
        assert rope_scaling_from_hf(new_style) == old
        assert rope_scaling_from_hf({"rope_scaling": hf_config(name).rope_parameters}) == old
    # 4.x with `rope_type` (LLaMA-3.1's published config.json), and `rope_type` over `type`.
    llama = {"rope_scaling": {**_LLAMA3, "factor": 8.0}, "rope_theta": 500000.0}
    assert rope_scaling_from_hf(llama) == rope_scaling_from_hf(CASES["llama3.1-8b"][1])
    both = {"rope_scaling": {"type": "dynamic", "rope_type": "linear", "factor": 2.0}}
    assert rope_scaling_from_hf(both) == RopeScaling("linear", 2.0)
    # transformers takes `rope_scaling` over `rope_parameters` when both are there.
    mixed = {"rope_scaling": {"type": "linear", "factor": 2.0},
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    assert rope_scaling_from_hf(mixed) == RopeScaling("linear", 2.0)


@pytest.mark.parametrize(
    "config",
    [{}, {"rope_scaling": None}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     {"rope_scaling": {"type": "default"}}, {"rope_parameters": {"rope_theta": 1e6}}],
)  # fmt: skip
def test_plain_rope_reads_as_none_and_writes_as_default(config):
    assert rope_scaling_from_hf(config) is None
    assert rope_scaling_to_hf(None, 1e4) == {"rope_type": "default", "rope_theta": 1e4}


def test_yarn_truncate_keeps_whether_it_was_written():
    base = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert rope_scaling_from_hf({"rope_parameters": base}).truncate is None
    # transformers reads `"truncate": null` as false (`.get("truncate", True)` is None).
    written_null = rope_scaling_from_hf({"rope_parameters": {**base, "truncate": None}})
    assert written_null.truncate is False
    assert "truncate" not in rope_scaling_to_hf(rope_scaling_from_hf({"rope_parameters": base}), 1)


@pytest.mark.parametrize(
    "params, named",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
        ({"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
         "rope_type 'longrope' is not supported"),
        ({"rope_type": "linear"}, "rope_type 'linear' needs the field 'factor'"),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
         "low_freq_factor is required for rope_type 'llama3'; high_freq_factor is required"),
        ({"rope_type": "linear", "factor": "8"}, "rope parameter factor '8' is not a number"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096.5},
         "original_max_position_embeddings 4096.5 is not an int"),
        ({"rope_type": "linear", "factor": 0.0}, "factor 0.0 must be > 0"),
        ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
         "partial_rotary_factor 0.5 is not supported"),
        ({"full_attention": {"rope_type": "default"}, "sliding_attention": {}},
         r"per-layer rope parameters \(full_attention, sliding_attention\)"),
    ],
)  # fmt: skip
def test_unsupported_or_incomplete_hf_rope_is_refused_by_name(params, named):
    with pytest.raises(ValueError, match=named):
        rope_scaling_from_hf({"rope_parameters": params})


def test_yarn_factor_null_without_the_context_is_refused():
    params = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}
    with pytest.raises(ValueError, match="factor null needs max_position_embeddings"):
        rope_scaling_from_hf({"rope_scaling": params})


# The dataclass ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaling, named",
    [
        (RopeScaling("dynamic", 2.0), "rope_type 'dynamic' is not supported (supported: "
                                      "'linear', 'llama3', 'yarn'"),
        (RopeScaling("linear", 0.0), "factor 0.0 must be > 0"),
        (RopeScaling("yarn", -2.0), "factor -2.0 must be > 0"),
        (RopeScaling("llama3", 8.0, low_freq_factor=1.0), "high_freq_factor is required"),
        (RopeScaling("llama3", 8.0, low_freq_factor=4.0, high_freq_factor=1.0),
         "high_freq_factor 1.0 must be greater than low_freq_factor 4.0"),
        (RopeScaling("llama3", 8.0, low_freq_factor=0.0, high_freq_factor=4.0),
         "low_freq_factor 0.0 must be > 0"),
        (RopeScaling("linear", 2.0, beta_fast=32.0), "beta_fast 32.0 is not a 'linear' "
                                                     "parameter (it belongs to 'yarn')"),
        (RopeScaling("yarn", 4.0, low_freq_factor=1.0), "low_freq_factor 1.0 is not a 'yarn' "
                                                        "parameter (it belongs to 'llama3')"),
        (RopeScaling("yarn", 4.0, original_max_position_embeddings=0),
         "original_max_position_embeddings 0 must be >= 1"),
        (RopeScaling("yarn", 4.0, beta_fast=1.0, beta_slow=2.0),
         "beta_fast 1.0 must not be below beta_slow 2.0"),
        (RopeScaling("yarn", 4.0, attention_factor=-1.0), "attention_factor -1.0 must be >= 0"),
    ],
)  # fmt: skip
def test_errors_name_the_field_and_value(scaling, named):
    assert any(named in error for error in scaling.errors()), scaling.errors()
    with pytest.raises(ValueError, match="rope scaling: "):
        inverse_frequencies(128, 1e4, scaling, 4096)
    with pytest.raises(ValueError, match="rope scaling: "):
        rope_scaling_to_hf(scaling, 1e4)


def test_the_published_parameters_have_no_errors():
    assert ROPE_TYPES == ("linear", "llama3", "yarn")
    for name in CASES:
        scaling = rope_scaling_from_hf(CASES[name][1])
        assert scaling is not None and scaling.errors() == []


def test_an_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head_dim, got 7"):
        inverse_frequencies(7, 1e4, None, 4096)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_metadata_round_trips_through_json(name):
    scaling = rope_scaling_from_hf(CASES[name][1])
    saved = json.loads(json.dumps(dataclasses.asdict(scaling)))
    assert rope_scaling_from_dict(saved) == scaling
    assert rope_scaling_from_dict(None) is None


def test_checkpoint_metadata_with_unknown_or_bad_fields_is_refused():
    saved = dataclasses.asdict(RopeScaling("linear", 2.0))
    with pytest.raises(ValueError, match="unknown rope scaling fields short_factor"):
        rope_scaling_from_dict({**saved, "short_factor": [1.0]})
    with pytest.raises(ValueError, match="factor -1 must be > 0"):
        rope_scaling_from_dict({**saved, "factor": -1})
