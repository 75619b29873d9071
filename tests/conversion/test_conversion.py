"""HF <-> engine checkpoint conversion (`engine.conversion.convert`, tools/convert_checkpoint.py).

A random `transformers` LLaMA is saved locally (no download) as safetensors (one file or
sharded with an index) or as ``pytorch_model.bin``, converted to an engine checkpoint at
TP=2 x PP=2 and back: the exported tensors equal the original bit for bit, the engine's
logits at TP=2 x PP=2 equal transformers' within 1e-4 (float32), and the export loads with
``LlamaForCausalLM.from_pretrained`` and gives the same logits. Also: the placements written
equal the live model's, resharding, a 7B-shaped conversion's memory bound, and the errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from engine import parallel_state
from engine.checkpointing import (
    load_checkpoint,
    open_checkpoint,
    read_full_state,
    save_checkpoint,
)
from engine.checkpointing.integrity import checksum_file
from engine.conversion.convert import (
    ConversionError,
    engine_to_hf,
    hf_to_engine,
    reshard,
)
from engine.models import ModelConfig, family_of
from engine.tensor_parallel import gather_from_tensor_model_parallel_region
from tests.paths import REPO
from tests.rank_pool import module_pool
from tools.convert_checkpoint import main as convert_main

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

pool = module_pool(4)


def random_hf_model(kv_heads: int, heads: int, tied: bool) -> transformers.LlamaForCausalLM:
    """A small random float32 LLaMA; the vocabulary (300) is padded by the engine."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, eos_token_id=7,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; random ones test that they are copied
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def save_hf(model: transformers.LlamaForCausalLM, directory: Path, fmt: str) -> None:
    if fmt in ("bin", "legacy-bin"):  # legacy: the pre-zip format, which cannot be mmapped
        model.config.save_pretrained(directory)
        zipped = fmt == "bin"
        path = directory / "pytorch_model.bin"
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zipped)
    elif fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="100KB")
        assert (directory / "model.safetensors.index.json").exists()
    else:
        model.save_pretrained(directory)


def engine_logits_at_tp2_pp2(checkpoint: str, tokens: torch.Tensor, resave: str) -> dict:
    """Load the converted checkpoint at TP=2 x PP=2 and run the two stages; return the full
    logits on the last stage. Save the loaded model again under ``resave`` (as training
    would: `save_checkpoint`)."""
    parallel_state.initialize_model_parallel(2, 2)
    try:
        directory, metadata = open_checkpoint(checkpoint)
        config = ModelConfig.from_dict(metadata["model"])
        model = family_of(config).model(config)
        # Same layout as converted, RNG wanted: a weights-only checkpoint has none to restore.
        load_checkpoint(checkpoint, [model], load_rng=True)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        group = parallel_state.get_pipeline_model_parallel_group()
        ranks = parallel_state.get_pipeline_model_parallel_global_ranks()
        hidden = torch.empty(tokens.size(1), tokens.size(0), config.hidden_size)
        with torch.no_grad():
            if pp_rank == 0:
                hidden = model(tokens)
            dist.broadcast(hidden, src=ranks[0], group=group)  # stage 0 -> stage 1
            logits = None
            if pp_rank == 1:
                local = model(tokens, decoder_input=hidden)
                logits = gather_from_tensor_model_parallel_region(local)[..., : config.vocab_size]
        save_checkpoint(resave, 7, [model], None, None, 0)
        return {"logits": logits}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize(
    "heads, kv_heads, tied, fmt",
    [
        (4, 4, False, "safetensors"),  # MHA, untied
        (8, 2, True, "sharded"),  # GQA with K/V sharded over TP, tied
        (8, 1, False, "bin"),  # one K/V head: replicated at TP=2
        (4, 4, True, "safetensors"),  # MHA, tied
        (4, 2, False, "legacy-bin"),  # GQA, pre-zip pytorch_model.bin
    ],
)
def test_round_trip_and_logits(pool, tmp_path, heads, kv_heads, tied, fmt):
    hf = random_hf_model(kv_heads, heads, tied)
    save_hf(hf, tmp_path / "hf", fmt)
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits

    ckpt = tmp_path / "engine"
    assert convert_main([
        "hf-to-engine", "--load-dir", str(tmp_path / "hf"), "--save-dir", str(ckpt),
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
    ]) == 0  # fmt: skip
    results = pool.run(engine_logits_at_tp2_pp2, str(ckpt), tokens, str(tmp_path / "resaved"))
    for r in results[2:]:  # the last stage's ranks
        error = (r["logits"] - expected).abs().max().item()
        print(f"max |engine logits at TP=2 x PP=2 - HF logits| = {error:.2e}")
        assert error <= 1e-4, f"max |engine logits - HF logits| = {error:.2e}"

    out = tmp_path / "exported"
    assert convert_main([
        "engine-to-hf", "--load-dir", str(ckpt), "--save-dir", str(out),
        "--max-shard-size-gb", str(200e3 / 2**30),
    ]) == 0  # fmt: skip
    files = set(
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    assert len(files) > 1  # sharded by --max-shard-size-gb
    exported = {}
    for file in files:
        with safe_open(str(out / file), framework="pt") as f:
            exported.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    original = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name

    exported_config = json.loads((out / "config.json").read_text())
    assert exported_config["eos_token_id"] == hf.config.eos_token_id == 7  # kept from the source
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)
    # A checkpoint the engine saved itself (RNG files, iteration 7) exports the same.
    engine_to_hf(tmp_path / "resaved", tmp_path / "exported_again")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported_again")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in hf.state_dict().items())


def test_reshard_keeps_every_tensor(tmp_path):
    hf = random_hf_model(kv_heads=2, heads=8, tied=False)
    save_hf(hf, tmp_path / "hf", "safetensors")
    original = hf_to_engine(tmp_path / "hf", tmp_path / "tp2pp2", 2, 2)
    for tp, pp in ((1, 1), (4, 1), (1, 4)):
        out = reshard(tmp_path / "tp2pp2", tmp_path / f"tp{tp}pp{pp}", tp, pp)
        metadata = json.loads((out / "metadata.json").read_text())
        assert metadata["layout"]["tensor_model_parallel_size"] == tp
        assert len(metadata["files"]) == tp * pp
        # Converted checkpoints carry the checksums that loading verifies, as saved ones do.
        recorded = metadata["checksums"]["files"]
        assert sorted(recorded) == sorted(metadata["files"])
        assert all(recorded[name] == checksum_file(out / name) for name in recorded)
        before, after = read_full_state(original)["model"], read_full_state(out)["model"]
        assert sorted(before) == sorted(after)
        assert all(torch.equal(before[name], after[name]) for name in before)
    # bf16 on the way: the dtype is recorded and the tensors are rounded once.
    out = reshard(tmp_path / "tp2pp2", tmp_path / "bf16", 1, 1, dtype=torch.bfloat16)
    assert (
        ModelConfig.from_dict(json.loads((out / "metadata.json").read_text())["model"]).params_dtype
        == torch.bfloat16
    )
    embedding = read_full_state(out)["model"]["embedding.weight"]
    assert torch.equal(embedding, hf.model.embed_tokens.weight.detach().to(torch.bfloat16))


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mixtral"}, "model_type 'mixtral'"),
        ({"attention_bias": True}, "attention_bias true"),
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}},
            "rope_type 'dynamic' is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "low_freq_factor is required for rope_type 'llama3'",
        ),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"intermediate_size": 180}, "model.layers.0.mlp.gate_proj.weight has shape (176, 64)"),
    ],
)
def test_unsupported_or_mismatched_configs_are_named(tmp_path, change, message):
    save_hf(random_hf_model(4, 4, False), tmp_path, "safetensors")
    edit_config(tmp_path, **change)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf_to_engine(tmp_path, tmp_path / "out")


def test_bad_tensors_and_layouts_are_named(tmp_path, capsys):
    hf = random_hf_model(4, 4, False)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    hf.config.save_pretrained(tmp_path)

    def convert_with(tensors: dict, tp: int = 1) -> str:
        for old in tmp_path.glob("*.safetensors"):
            old.unlink()
        save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ConversionError) as error:
            hf_to_engine(tmp_path, tmp_path / "out", tp_size=tp)
        return str(error.value)

    bad = dict(state, **{"model.layers.2.self_attn.k_proj.weight": torch.zeros(60, 64)})
    assert "model.layers.2.self_attn.k_proj.weight has shape (60, 64)" in convert_with(bad)
    missing = {k: v for k, v in state.items() if k != "model.layers.3.mlp.down_proj.weight"}
    assert "missing, e.g. model.layers.3.mlp.down_proj.weight" in convert_with(missing)
    extra = dict(state, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    assert "model.layers.0.self_attn.q_proj.bias has no counterpart" in convert_with(extra)
    assert "--target-tensor-parallel-size 3" in convert_with(state, tp=3)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf_to_engine(tmp_path, tmp_path / "out")
    with pytest.raises(ConversionError, match="already holds a checkpoint"):
        hf_to_engine(tmp_path, tmp_path / "out")
    # The tool prints the message and exits with 1.
    assert convert_main(["hf-to-engine", "--load-dir", str(tmp_path / "nowhere"),
                         "--save-dir", str(tmp_path / "out2")]) == 1  # fmt: skip
    assert "config.json does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


# LLaMA-2-7B's names and shape ratios at 1/16 of the width: 32 layers, 32 heads, h = 256,
# ffn = 688, vocabulary 2000 (the model: 105 MB in float32; its largest tensor: 2 MB).
SEVEN_B_SHAPED = dict(
    vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
)  # fmt: skip

MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import transformers
    # engine-to-hf writes config.json with transformers, whose first LlamaConfig imports
    # ~90 MB of modules: a constant paid once, not memory that grows with the model.
    transformers.LlamaConfig()
    from engine.conversion.convert import engine_to_hf, hf_to_engine

    def rss_anon():  # resident anonymous memory (file pages of memory-mapped inputs excluded)
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    def peak_growth(fn, *args):
        base, peak, done = rss_anon(), [0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon())
                time.sleep(0.0005)
        thread = threading.Thread(target=sample)
        thread.start()
        fn(*args)
        done.set()
        thread.join()
        return max(peak[0], rss_anon()) - base

    src, work = sys.argv[1], sys.argv[2]
    print(json.dumps({
        "hf_to_engine": peak_growth(hf_to_engine, src, work + "/engine", 2, 2),
        "engine_to_hf": peak_growth(engine_to_hf, work + "/engine", work + "/hf"),
    }))
""")


def test_7b_shaped_conversion_streams(tmp_path):
    """Peak extra memory stays a few times the largest tensor, far below the model."""
    config = transformers.LlamaConfig(**SEVEN_B_SHAPED)
    src = tmp_path / "src"
    src.mkdir()
    config.save_pretrained(src)
    inventory = ModelConfig(
        num_layers=32, hidden_size=256, num_attention_heads=32, ffn_hidden_size=688,
        vocab_size=2000,
    ).inventory()  # fmt: skip
    shapes, canonical_to_hf_name = inventory.canonical_shapes(), inventory.renamer("name", "hf")
    weight_map, shard, generator = {}, {}, torch.Generator().manual_seed(0)
    names = list(shapes)
    for i, name in enumerate(names):  # written in shards of ~8 MB, as HF shards (smaller)
        shard[canonical_to_hf_name(name)] = torch.randn(shapes[name], generator=generator)
        if sum(t.numel() for t in shard.values()) * 4 > 8e6 or i == len(names) - 1:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(src / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard = {}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model_bytes = sum(4 * torch.Size(s).numel() for s in shapes.values())
    largest_bytes = max(4 * torch.Size(s).numel() for s in shapes.values())

    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), str(tmp_path)], cwd=REPO,
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"model {model_bytes / 2**20:.0f} MiB, largest tensor {largest_bytes / 2**20:.1f} MiB, "
          f"peak growth {({k: f'{v / 2**20:.1f} MiB' for k, v in growth.items()})}")  # fmt: skip
    for step, grown in growth.items():
        assert grown < 8 * largest_bytes, f"{step}: {grown / 2**20:.1f} MiB"
        assert grown < model_bytes / 5, f"{step}: {grown / 2**20:.1f} MiB"
    # And the conversion is right: the exported tensors are the source's.
    with safe_open(str(src / weight_map["model.layers.31.mlp.up_proj.weight"]), "pt") as f:
        source = f.get_tensor("model.layers.31.mlp.up_proj.weight")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    with safe_open(
        str(tmp_path / "hf" / index["weight_map"]["model.layers.31.mlp.up_proj.weight"]), "pt"
    ) as f:
        assert torch.equal(f.get_tensor("model.layers.31.mlp.up_proj.weight"), source)


def meta_rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's reference rotary embedding: x ``[s, heads, d]`` rotated as complex numbers made
    of interleaved pairs (``apply_rotary_emb`` of Meta's llama/model.py)."""
    s, _, d = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    freqs_cis = torch.polar(torch.ones(s, d // 2), torch.outer(torch.arange(s).float(), freqs))
    pairs = torch.view_as_complex(x.float().reshape(s, x.size(1), d // 2, 2))
    return torch.view_as_real(pairs * freqs_cis[:, None, :]).flatten(2)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_meta_qk_permutation_gives_the_same_attention_scores(heads, kv_heads):
    """Meta's weights with interleaved rotary == permuted weights with the engine's
    rotate-half rotary: the same q.k for every head and position pair."""
    from engine.models.llama.meta import permute_meta_qk
    from engine.models.llama.model import RotaryEmbedding, apply_rotary

    generator = torch.Generator().manual_seed(0)
    h, d, s, theta = 64, 64 // heads, 12, 10000.0
    wq = torch.randn(heads * d, h, generator=generator)
    wk = torch.randn(kv_heads * d, h, generator=generator)
    x = torch.randn(s, h, generator=generator)
    q_meta = meta_rotary((x @ wq.T).view(s, heads, d), theta)
    k_meta = meta_rotary((x @ wk.T).view(s, kv_heads, d), theta)
    cos, sin = RotaryEmbedding(d, theta)(torch.arange(s).unsqueeze(0), torch.float32)
    q = apply_rotary((x @ permute_meta_qk(wq, heads).T).view(s, 1, heads, d), cos, sin)[:, 0]
    k = apply_rotary((x @ permute_meta_qk(wk, kv_heads).T).view(s, 1, kv_heads, d), cos, sin)[:, 0]
    group = heads // kv_heads
    for head in range(heads):
        meta = q_meta[:, head] @ k_meta[:, head // group].T
        ours = q[:, head] @ k[:, head // group].T
        torch.testing.assert_close(ours, meta, rtol=1e-5, atol=1e-4)
    # Without the permutation the scores differ: the test can fail.
    q_unpermuted = apply_rotary((x @ wq.T).view(s, 1, heads, d), cos, sin)[:, 0]
    assert not torch.allclose(q_unpermuted[:, 0] @ k[:, 0].T, q_meta[:, 0] @ k_meta[:, 0].T)


def test_meta_checkpoint_converts_like_its_hf_twin(tmp_path):
    """A Meta-format copy of a HF model (Q/K un-permuted, Meta names, params.json) converts
    to an engine checkpoint whose HF export equals the HF model."""
    hf = random_hf_model(kv_heads=2, heads=8, tied=False)
    names = {
        "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }  # fmt: skip
    layer_names = {
        "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
    }  # fmt: skip
    meta = {}
    for name, tensor in hf.state_dict().items():
        if name in names:
            meta[names[name]] = tensor
            continue
        _, _, n, rest = name.split(".", 3)
        module = rest.removesuffix(".weight")
        heads = {"self_attn.q_proj": 8, "self_attn.k_proj": 2}.get(module)
        if heads:  # the inverse of permute_meta_qk: rotate-half -> interleaved
            rows = tensor.size(0)
            tensor = tensor.view(heads, 2, rows // heads // 2, 64).transpose(1, 2).reshape(rows, 64)
        meta[f"layers.{n}.{layer_names[module]}.weight"] = tensor.contiguous()
    meta["rope.freqs"] = torch.ones(4)
    (tmp_path / "meta").mkdir()
    torch.save(meta, tmp_path / "meta" / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 16,
              "norm_eps": 1e-5, "vocab_size": -1}  # fmt: skip
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    assert convert_main([
        "hf-to-engine", "--checkpoint-type", "meta", "--load-dir", str(tmp_path / "meta"),
        "--save-dir", str(tmp_path / "engine"), "--target-tensor-parallel-size", "2",
    ]) == 0  # fmt: skip
    engine_to_hf(tmp_path / "engine", tmp_path / "hf")
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in hf.state_dict().items())
    torch.save(
        {"layers.0.attention.wq.bias": torch.zeros(2)}, tmp_path / "meta" / "consolidated.01.pth"
    )
    with pytest.raises(ConversionError, match="2 model-parallel shards"):
        hf_to_engine(tmp_path / "meta", tmp_path / "engine2", checkpoint_type="meta")


def test_streaming_writer_makes_ordinary_safetensors(tmp_path):
    from engine.checkpointing.safetensors_writer import StreamingSafetensorsWriter

    tensors = {
        "a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3), "d": torch.randn(1, 2, 3).half(),
    }  # fmt: skip
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs, {"format": "pt"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(name), t) for name, t in tensors.items())
    writer = StreamingSafetensorsWriter(tmp_path / "y.safetensors", specs)
    with pytest.raises(ValueError, match="expected tensor a"):
        writer.write("b", tensors["b"])
    writer.write("a", tensors["a"])
    with pytest.raises(ValueError, match="3 declared tensor"):
        writer.close()
