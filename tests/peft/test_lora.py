"""LoRA on the engine's parallel layers against PEFT on `transformers` (random tiny LLaMA and
Qwen2 models from local configs, float32, no download), on real gloo ranks:

- with the same A and B on both sides (PEFT's copied into ours by name), logits equal PEFT's
  within 1e-5 at TP=1, TP=2 and TP=2 with sequence parallelism: every HF module or a few,
  named as HF or as the engine's fused projections, Q/K/V biases (Qwen2), and K/V heads
  replicated over TP (one K/V head at TP=2);
- the adapters' gradients at TP=2 with sequence parallelism (after `finalize_model_grads`)
  equal TP=1's within 1e-5; base parameters are frozen and get no gradient;
- `merge_lora` gives the logits and the weights of PEFT's ``merge_and_unload()``;
- the initialisation gathers to the same A at TP=1 and TP=2 (B zero), and on a pipeline chunk
  of one layer to that layer's; dropout acts in training only; bad flags are named.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import parallel_state
from engine.distributed import finalize_model_grads
from engine.models.families import family_for_hf
from engine.models.llama.hf import canonical_from_hf
from engine.models.weights import gather_full_state, load_full_state
from engine.peft import LoraConfig, apply_lora, load_lora_state, lora_state, merge_lora
from engine.peft.lora import is_lora_parameter
from engine.tensor_parallel import gather_from_tensor_model_parallel_region, model_parallel_seed
from tests.rank_pool import module_pool

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
peft = pytest.importorskip("peft", reason="peft is a test extra")

VOCAB = 128
RANK, ALPHA = 4, 8
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
LABELS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))

pool = module_pool(2)

MODELS = {
    # name: (transformers class, config class, K/V heads)
    "llama": ("LlamaForCausalLM", "LlamaConfig", 2),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", 2),  # Q/K/V biases
    "llama-kv1": ("LlamaForCausalLM", "LlamaConfig", 1),  # K/V replicated at TP=2
}


def random_peft_model(name: str, targets: tuple[str, ...]):
    """(HF config dict, base HF state dict, the PEFT model) with random base weights, norms,
    biases, A and B (PEFT starts B at zero, which would hide a misplaced adapter)."""
    cls, config_cls, kv_heads = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
        use_sliding_window=False,
    )  # fmt: skip
    hf = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 1:
                param.add_(torch.empty_like(param).uniform_(-0.3, 0.3))
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0)
    model = peft.get_peft_model(hf, lora).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.normal_(0.0, 0.2)
    return hf.config.to_dict(), base, model


def peft_adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def engine_run(hf_config, base, adapters, targets, tp, sp=False, grads=False, merge=False):
    """Our model at TP=tp with the HF weights and PEFT's adapters: its logits, and with
    ``grads`` the adapters' gathered gradients and whether the base stayed frozen; with
    ``merge`` the adapters are merged first and the full weights come back."""
    family = family_for_hf(hf_config["model_type"])
    config = dataclasses.replace(family.hf.config_from_hf(hf_config, 1), sequence_parallel=sp)
    parallel_state.initialize_model_parallel(tp)
    try:
        model = family.model(config)
        load_full_state(model, canonical_from_hf(base, config))
        params = apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=targets))
        load_lora_state(model, adapters)
        out: dict = {"num_adapters": len(params)}
        if merge:
            merge_lora(model)
            out["weights"] = gather_full_state(model)
        if grads:
            model(TOKENS, labels=LABELS).mean().backward()
            finalize_model_grads([model])
            out["grads"] = lora_state(model, grads=True)
            base_params = [p for p in model.parameters() if not is_lora_parameter(p)]
            out["frozen"] = all(not p.requires_grad and p.grad is None for p in base_params)
        with torch.no_grad():
            logits = gather_from_tensor_model_parallel_region(model(TOKENS))[..., :VOCAB]
        out["logits"] = logits
        return out
    finally:
        parallel_state.destroy_model_parallel()


LAYOUTS = [(1, False), (2, False), (2, True)]
CASES = [
    ("llama", HF_TARGETS, HF_TARGETS),
    ("llama", ("qkv", "out", "gate_up", "down"), HF_TARGETS),  # the engine's names
    ("llama", ("q_proj", "v_proj", "down_proj"), ("q_proj", "v_proj", "down_proj")),
    ("llama", ("k_proj", "up_proj"), ("k_proj", "up_proj")),
    ("qwen2", HF_TARGETS, HF_TARGETS),
    ("llama-kv1", HF_TARGETS, HF_TARGETS),
    ("llama-kv1", ("q_proj", "v_proj"), ("q_proj", "v_proj")),
]


@pytest.mark.parametrize("name, ours, theirs", CASES)
@pytest.mark.parametrize("tp, sp", LAYOUTS)
def test_logits_equal_peft(pool, name, ours, theirs, tp, sp):
    hf_config, base, model = random_peft_model(name, theirs)
    with torch.no_grad():
        expected = model(TOKENS).logits
        with model.disable_adapter():
            without = model(TOKENS).logits
    assert (expected - without).abs().max() > 0.05  # the adapters matter
    for result in pool.run(engine_run, hf_config, base, peft_adapters(model), ours, tp, sp):
        assert result["num_adapters"] == 2 * 2 * len(theirs)  # A and B, two layers
        worst = (result["logits"] - expected).abs().max().item()
        assert worst <= 1e-5, f"{name} {ours} TP={tp} SP={sp}: max |logits - PEFT's| {worst:.2e}"


@pytest.mark.parametrize("name", ["llama", "llama-kv1"])
def test_gradients_at_tp2_sp_equal_tp1_and_base_is_frozen(pool, name):
    hf_config, base, model = random_peft_model(name, HF_TARGETS)
    adapters = peft_adapters(model)
    reference = pool.run(engine_run, hf_config, base, adapters, HF_TARGETS, 1, grads=True)[0]
    assert reference["frozen"] and sorted(reference["grads"]) == sorted(adapters)
    # PEFT's own gradients, as a check of TP=1 itself.
    model.train()
    loss = torch.nn.functional.cross_entropy(
        model(TOKENS).logits.reshape(-1, VOCAB), LABELS.reshape(-1)
    )
    loss.backward()
    theirs = peft.get_peft_model_state_dict(model, state_dict={
        n: p.grad for n, p in model.named_parameters() if p.grad is not None
    })  # fmt: skip
    for key, grad in reference["grads"].items():
        torch.testing.assert_close(grad, theirs[key], atol=1e-5, rtol=0, msg=key)
    for result in pool.run(engine_run, hf_config, base, adapters, HF_TARGETS, 2, True, True):
        assert result["frozen"]
        for key, grad in reference["grads"].items():
            worst = (result["grads"][key] - grad).abs().max().item()
            assert worst <= 1e-5, f"{name}: {key} gradient at TP=2 + SP differs by {worst:.2e}"


@pytest.mark.parametrize("name, tp", [("llama", 2), ("qwen2", 2), ("llama-kv1", 2)])
def test_merge_equals_peft_merge_and_unload(pool, name, tp):
    hf_config, base, model = random_peft_model(name, HF_TARGETS)
    adapters = peft_adapters(model)
    merged = model.merge_and_unload()
    with torch.no_grad():
        expected = merged(TOKENS).logits
    expected_weights = canonical_from_hf(
        merged.state_dict(),
        family_for_hf(hf_config["model_type"]).hf.config_from_hf(hf_config, 1),
    )
    for result in pool.run(engine_run, hf_config, base, adapters, HF_TARGETS, tp, merge=True):
        worst = (result["logits"] - expected).abs().max().item()
        assert worst <= 1e-5, f"{name}: merged logits differ from PEFT's by {worst:.2e}"
        assert sorted(result["weights"]) == sorted(expected_weights)
        for key, weight in result["weights"].items():
            torch.testing.assert_close(weight, expected_weights[key], atol=1e-6, rtol=0, msg=key)


def initial_adapters(hf_config, tp, sp, layer_numbers=None):
    """The gathered A and B of a fresh `apply_lora` (on a chunk of ``layer_numbers`` only, the
    last pipeline stage's, if given)."""
    family = family_for_hf(hf_config["model_type"])
    config = dataclasses.replace(family.hf.config_from_hf(hf_config, 1), sequence_parallel=sp)
    parallel_state.initialize_model_parallel(tp)
    try:
        chunk = {} if layer_numbers is None else dict(pre_process=False, post_process=True)
        model = family.model(config, layer_numbers=layer_numbers, **chunk)
        apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA))
        return lora_state(model)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("name", ["llama", "llama-kv1"])
def test_initialisation_is_the_same_at_any_tp(pool, name):
    hf_config, _, _ = random_peft_model(name, HF_TARGETS)
    reference = pool.run(initial_adapters, hf_config, 1, False)[0]
    assert len(reference) == 2 * 2 * len(HF_TARGETS)
    for key, tensor in reference.items():
        if ".lora_B." in key:
            assert not tensor.any(), key
        else:  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
            bound = tensor.shape[1] ** -0.5
            assert tensor.abs().max() <= bound and tensor.abs().max() > 0.5 * bound, key
    q, k = (f"base_model.model.model.layers.0.self_attn.{m}_proj.lora_A.weight" for m in "qk")
    assert not torch.equal(reference[q], reference[k])  # each adapter has its own seed
    for tp, sp in [(2, False), (2, True)]:
        for result in pool.run(initial_adapters, hf_config, tp, sp):
            assert sorted(result) == sorted(reference)
            for key, tensor in result.items():
                torch.testing.assert_close(tensor, reference[key], atol=0, rtol=0, msg=key)
    # A pipeline chunk holding layer 1 alone: its adapters, seeded by the global layer number.
    for result in pool.run(initial_adapters, hf_config, 2, True, [1]):
        assert sorted(result) == sorted(k for k in reference if ".layers.1." in k)
        for key, tensor in result.items():
            torch.testing.assert_close(tensor, reference[key], atol=0, rtol=0, msg=key)


def dropout_changes_training_only(hf_config, tp, sp):
    """With --lora-dropout 0.5, two training forwards differ from each other and from eval's
    (the dropout of sharded inputs draws from the per-TP-rank stream, seeded here)."""
    family = family_for_hf(hf_config["model_type"])
    config = dataclasses.replace(family.hf.config_from_hf(hf_config, 1), sequence_parallel=sp)
    parallel_state.initialize_model_parallel(tp)
    try:
        model_parallel_seed(1234)
        model = family.model(config)
        for param in apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.5)):
            with torch.no_grad():
                param.fill_(0.1)
        with torch.no_grad():
            first, second = model.train()(TOKENS), model(TOKENS)
            evaluated = model.eval()(TOKENS)
        return not torch.equal(first, second) and not torch.equal(first, evaluated)
    finally:
        parallel_state.destroy_model_parallel()


def test_dropout_applies_in_training_at_tp2_with_sequence_parallelism(pool):
    hf_config, _, _ = random_peft_model("llama", HF_TARGETS)
    assert all(pool.run(dropout_changes_training_only, hf_config, 2, True))


def test_config_errors_name_each_flag():
    bad = LoraConfig(rank=0, alpha=-1.0, dropout=1.0, target_modules=("qkv", "wq", "c_attn"))
    errors = "; ".join(bad.errors())
    for named in ("--lora-rank 0", "--lora-alpha -1.0", "--lora-dropout 1.0",
                  "--lora-target-modules wq, c_attn"):  # fmt: skip
        assert named in errors
    assert "--lora-target-modules is empty" in "; ".join(LoraConfig(target_modules=()).errors())
    with pytest.raises(ValueError, match="--lora-rank 0"):
        bad.blocks()
    assert LoraConfig().errors() == []
    assert LoraConfig(target_modules=("q_proj",)).blocks() == {"q"}
    assert LoraConfig(target_modules=("gate_up", "o_proj")).blocks() == {"gate", "up", "out"}
    assert LoraConfig(rank=4, alpha=8).scaling == 2.0
