"""Today's model families against `transformers` (random weights from local configs with each
family's real options, float32, no download), on real gloo ranks:

- LLaMA-3.1 (rope scaling "llama3", GQA), LLaMA-3.2 (tied embeddings, rope factor 32),
  Qwen2.5 (Q/K/V biases, "yarn" rope scaling), Qwen3 (Q/K RMSNorm, head width != h/heads),
  Mistral v0.3;
- each converts with ``tools/convert_checkpoint.py hf-to-engine`` to TP=2 x PP=2, runs there
  (two stages) and resharded to TP=2 with HF's logits within 1e-4, positions past the original
  context included, exports back to a directory the HF class reads with every tensor
  identical, and decodes greedily as ``generate`` does, token for token;
- options the engine cannot build are refused by name; the Megatron flags set the options;
- each tiny family trains at TP=2 x PP=2 x DP=2 with the losses of one process.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors import safe_open

from engine import parallel_state
from engine.conversion import engine_to_hf
from engine.inference.generation import generate
from engine.inference.loading import load_model
from engine.models.config import ModelConfig
from engine.models.families import family_for_hf
from engine.models.rope import RopeScaling
from engine.tensor_parallel import gather_from_tensor_model_parallel_region
from tests.conversion.test_conversion import engine_logits_at_tp2_pp2
from tests.rank_pool import module_pool
from tests.training.test_training import corpus, make_job  # noqa: F401 (a fixture)
from tools.convert_checkpoint import main as convert_main

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

VOCAB = 256
ORIGINAL_CONTEXT = 16
"""The rope-scaled families' ``original_max_position_embeddings``: the test's 40 tokens reach
past it, where the scaled frequencies differ from plain RoPE."""

pool = module_pool(2)

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    initializer_range=0.2, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL_CONTEXT}  # fmt: skip


FAMILIES: dict[str, tuple[str, str, dict]] = {
    # name: (transformers class, config class, the family's options)
    "llama3.1": ("LlamaForCausalLM", "LlamaConfig", {"rope_parameters": _llama3_rope(8.0)}),
    "llama3.2": ("LlamaForCausalLM", "LlamaConfig",
                 {"rope_parameters": _llama3_rope(32.0), "tie_word_embeddings": True}),
    "qwen2.5": ("Qwen2ForCausalLM", "Qwen2Config", {
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                            "original_max_position_embeddings": ORIGINAL_CONTEXT},
        "rms_norm_eps": 1e-6,
    }),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              {"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "mistral": ("MistralForCausalLM", "MistralConfig",
                {"sliding_window": None, "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 1e6}}),
}  # fmt: skip
ENGINE_FAMILY = {"llama3.1": "llama", "llama3.2": "llama", "qwen2.5": "qwen2", "qwen3": "qwen3",
                 "mistral": "mistral"}  # fmt: skip


def random_hf_model(name: str):
    """A small random model of the family; norms and biases randomised too (HF starts them
    at 1 and 0, which would hide a missing or misplaced one)."""
    cls, config_cls, options = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**_COMMON, **options})
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.empty_like(param).uniform_(-0.3, 0.3))
    return model


TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    """(family name, HF model, its directory, the engine checkpoint at TP=2 x PP=2)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = random_hf_model(name)
    hf.save_pretrained(root / "hf")
    assert convert_main([
        "hf-to-engine", "--load-dir", str(root / "hf"), "--save-dir", str(root / "engine"),
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
    ]) == 0  # fmt: skip
    return name, hf, root


def test_the_family_and_its_options_are_read_from_config_json(converted):
    name, hf, root = converted
    metadata = json.loads((root / "engine" / "iter_0000000" / "metadata.json").read_text())
    config = ModelConfig.from_dict(metadata["model"])
    assert config.family == ENGINE_FAMILY[name]
    assert family_for_hf(hf.config.model_type).name == config.family
    assert config.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert config.qkv_bias == (name == "qwen2.5") and config.qk_layernorm == (name == "qwen3")
    assert config.head_dim == (32 if name == "qwen3" else 16)
    assert config.tie_word_embeddings == (name == "llama3.2")
    scaling = config.rope_scaling
    expected = {"llama3.1": "llama3", "llama3.2": "llama3", "qwen2.5": "yarn"}.get(name)
    assert (scaling.rope_type if scaling else None) == expected


def logits_and_greedy(checkpoint: str, new_tokens: int) -> tuple[torch.Tensor, list]:
    parallel_state.initialize_model_parallel(2)
    try:
        model = load_model(checkpoint)
        with torch.no_grad():
            logits = gather_from_tensor_model_parallel_region(model(TOKENS))[..., :VOCAB]
        return logits, [generate(model, [p], new_tokens)[0] for p in PROMPTS]
    finally:
        parallel_state.destroy_model_parallel()


PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 250, 31]]


def test_logits_and_greedy_decoding_match_transformers_at_tp2(pool, converted):
    name, hf, root = converted
    with torch.no_grad():
        expected = hf(TOKENS).logits
    theirs = [
        hf.generate(
            torch.tensor([p]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
            eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=int),
        )[0, len(p):].tolist()
        for p in PROMPTS
    ]  # fmt: skip
    for logits, ours in pool.run(logits_and_greedy, str(root / "engine"), 8):
        worst = (logits - expected).abs().max().item()
        assert worst <= 1e-4, f"{name}: max |logits - HF logits| = {worst:.2e}"
        late = (logits[:, ORIGINAL_CONTEXT:] - expected[:, ORIGINAL_CONTEXT:]).abs().max()
        assert late <= 1e-4, f"{name}: past the original context {late:.2e}"
        assert ours == theirs, name


pool4 = module_pool(4)


def test_logits_at_tp2_pp2_as_converted_match_transformers(pool4, converted, tmp_path):
    """The checkpoint at the layout it was written in: two stages of two TP ranks each."""
    name, hf, root = converted
    with torch.no_grad():
        expected = hf(TOKENS).logits
    results = pool4.run(engine_logits_at_tp2_pp2, str(root / "engine"), TOKENS, str(tmp_path))
    last_stage = [r["logits"] for r in results if r["logits"] is not None]
    assert len(last_stage) == 2
    for logits in last_stage:
        worst = (logits - expected).abs().max().item()
        assert worst <= 1e-4, f"{name}: max |logits - HF logits| at TP=2 x PP=2 = {worst:.2e}"


def test_export_loads_in_the_hf_class_with_identical_tensors(converted):
    name, hf, root = converted
    out = engine_to_hf(root / "engine", root / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[name][0]]
    assert config["model_type"] == hf.config.model_type
    reloaded = getattr(transformers, FAMILIES[name][0]).from_pretrained(out).eval()
    assert reloaded.config.rope_parameters == hf.config.rope_parameters
    original = hf.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    for tensor_name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[tensor_name]), f"{name}: {tensor_name}"
    if hf.config.tie_word_embeddings:  # a tied model's files hold the embedding once
        files = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert "lm_head.weight" not in files
        for file in set(files.values()):
            with safe_open(str(out / file), framework="pt") as f:
                assert "lm_head.weight" not in f.keys()


@pytest.mark.parametrize(
    "name, change, named",
    [
        ("mistral", {"sliding_window": 4096}, "sliding_window 4096"),
        ("qwen2.5", {"use_sliding_window": True, "sliding_window": 64}, "sliding_window 64"),
        ("llama3.1", {"attention_bias": True}, "attention_bias true"),
        ("llama3.1", {"mlp_bias": True}, "mlp_bias true"),
        ("qwen3", {"architectures": ["Qwen3ForSequenceClassification"]}, "architectures"),
        ("llama3.1", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
         "longrope"),
        ("qwen2.5", {"num_experts": 8}, "num_experts 8"),
    ],
)  # fmt: skip
def test_unsupported_options_are_refused_by_name(tmp_path, capsys, name, change, named):
    random_hf_model(name).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    assert convert_main(["hf-to-engine", "--load-dir", str(tmp_path / "hf"),
                         "--save-dir", str(tmp_path / "engine")]) == 1  # fmt: skip
    assert re.search(named, capsys.readouterr().err)
    assert not (tmp_path / "engine").exists()


def test_an_unknown_model_type_names_the_supported_ones(tmp_path, capsys):
    random_hf_model("qwen2.5").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_moe"}))
    assert convert_main(["hf-to-engine", "--load-dir", str(tmp_path / "hf"),
                         "--save-dir", str(tmp_path / "engine")]) == 1  # fmt: skip
    assert re.search(r"qwen2_moe.*'mistral'.*'qwen2'.*'qwen3'", capsys.readouterr().err)


# Training -------------------------------------------------------------------------------------

pool8 = module_pool(8)
solo = module_pool(1)

TINY_OPTIONS = {
    # The options each family adds to the LLaMA decoder, on the byte-token tiny model.
    "llama3.1": dict(num_query_groups=2, rope_scaling=RopeScaling(
        "llama3", 8.0, original_max_position_embeddings=ORIGINAL_CONTEXT, low_freq_factor=1.0,
        high_freq_factor=4.0)),
    "mistral": dict(num_query_groups=2, rotary_base=1e6, family="mistral"),
    "llama3.2": dict(tie_word_embeddings=True, rope_scaling=RopeScaling(
        "llama3", 32.0, original_max_position_embeddings=ORIGINAL_CONTEXT, low_freq_factor=1.0,
        high_freq_factor=4.0)),
    # One K/V head: at TP=2 the K|V weight and its bias are replicated, gradients partial.
    "qwen2.5": dict(qkv_bias=True, num_query_groups=1, family="qwen2", rope_scaling=RopeScaling(
        "yarn", 4.0, original_max_position_embeddings=ORIGINAL_CONTEXT)),
    "qwen3": dict(qk_layernorm=True, kv_channels=32, num_query_groups=2, family="qwen3"),
}  # fmt: skip


def train_losses(corpus: str, name: str, tp: int, pp: int) -> list[float]:  # noqa: F811
    from engine.training.loop import pretrain

    model = dataclasses.replace(make_job(corpus, tp, pp).model, **TINY_OPTIONS[name])
    job = dataclasses.replace(make_job(corpus, tp, pp, train_iters=3), model=model)
    job = dataclasses.replace(job, training=dataclasses.replace(job.training, eval_iters=0))
    result = pretrain(job)
    return [result.losses[i] for i in (1, 2, 3)]


@pytest.mark.parametrize("name", sorted(TINY_OPTIONS))
def test_training_at_tp2_pp2_dp2_equals_one_process(pool8, solo, corpus, name):  # noqa: F811
    one = solo.run(train_losses, corpus, name, 1, 1)[0]
    results = pool8.run(train_losses, corpus, name, 2, 2)
    assert all(losses == results[0] for losses in results)
    torch.testing.assert_close(
        torch.tensor(results[0], dtype=torch.float64), torch.tensor(one, dtype=torch.float64),
        rtol=1e-5, atol=0,
    )  # fmt: skip


# Flags ----------------------------------------------------------------------------------------

ARCHITECTURE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                "--vocab-size", "256", "--seq-length", "32", "--train-iters", "1"]  # fmt: skip


def test_megatron_flags_set_the_options_and_presets_carry_their_family(capsys):
    from engine.training.arguments import parse_args

    model = parse_args([*ARCHITECTURE, "--add-qkv-bias", "--qk-layernorm", "--kv-channels", "32",
                        "--use-rope-scaling", "--rope-scaling-factor", "32"]).model  # fmt: skip
    assert (model.qkv_bias, model.qk_layernorm, model.head_dim) == (True, True, 32)
    assert model.rope_scaling == RopeScaling(
        "llama3", 32.0, original_max_position_embeddings=8192, low_freq_factor=1.0,
        high_freq_factor=4.0,
    )  # fmt: skip
    assert parse_args([*ARCHITECTURE, "--use-rope-scaling"]).model.rope_scaling.factor == 8.0
    for preset, family in [("qwen2.5-7b", "qwen2"), ("qwen3-8b", "qwen3"),
                           ("mistral-7b-v0.3", "mistral"), ("llama3.1-8b", "llama")]:  # fmt: skip
        assert parse_args(["--model-preset", preset, "--seq-length", "64"]).model.family == family
    with pytest.raises(SystemExit):
        parse_args([*ARCHITECTURE, "--rope-scaling-factor", "4"])
    assert "--rope-scaling-factor needs --use-rope-scaling" in capsys.readouterr().err
