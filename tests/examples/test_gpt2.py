"""GPT-2 as a model family of its own (`examples.gpt2`), built from the engine's layers outside
`engine/`, against HuggingFace transformers' GPT2LMHeadModel (random weights from a local
config, no download, float32), on real gloo ranks.

- the family registers itself, names every HF tensor, and ``--model-provider
  examples.gpt2:GPT2`` builds it (a LLaMA-only flag is refused);
- logits equal HF's within 1e-4 at TP=1, TP=2 and TP=2 with sequence parallelism; gradients
  at TP=2 with sequence parallelism (and recomputation) equal TP=1's once
  `finalize_model_grads` has summed the partial ones; the seeded initialisation gathers to the
  same weights at any TP;
- a HF directory converts (``tools/convert_checkpoint.py hf-to-engine``) to an engine
  checkpoint at TP=2 x PP=2 (the fused ``c_attn`` split into whole Q, K and V heads per
  rank), loads at TP=1 and TP=2 with HF's logits, and exports back to a directory
  `GPT2LMHeadModel.from_pretrained` reads, every tensor identical;
- training through `engine.training.pretrain` gives the losses of one rank at TP=2 with
  sequence parallelism, PP=2 and TP=2 x PP=2 x DP=2 (distributed optimizer), within 1e-5;
- greedy decoding equals HF's ``generate`` at TP=2; perplexity equals HF's loss-based one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import parallel_state
from engine.checkpointing import read_full_state
from engine.checkpointing.config import CheckpointConfig
from engine.checkpointing.format import local_from_canonical, spec_placement
from engine.conversion import engine_to_hf, hf_to_engine
from engine.conversion.errors import ConversionError
from engine.data.config import DataConfig
from engine.data.indexed_dataset import IndexedDatasetBuilder
from engine.distributed import finalize_model_grads
from engine.distributed.config import DistributedDataParallelConfig
from engine.inference.generation import generate
from engine.inference.loading import load_model
from engine.inference.perplexity import evaluate_perplexity
from engine.models.config import ModelConfig
from engine.models.families import get_family
from engine.models.flops import flops_per_token
from engine.models.weights import gather_full_state, load_full_state
from engine.optimizer.config import OptimizerConfig
from engine.parallel_state import ParallelConfig
from engine.tensor_parallel import gather_from_tensor_model_parallel_region
from engine.training.arguments import parse_args
from engine.training.config import JobConfig, TrainingConfig
from examples.gpt2 import GPT2, GPT2Model
from examples.gpt2.hf import canonical_from_hf, config_from_hf
from tests.paths import REPO
from tests.rank_pool import RankPool, module_pool
from tests.training.test_training import corpus  # noqa: F401 (the same byte corpus fixture)
from tools.convert_checkpoint import main as convert_main

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

VOCAB = 300
pool = module_pool(2)
pool8 = module_pool(8)


def random_hf_model(**overrides) -> transformers.GPT2LMHeadModel:
    """A small random GPT-2 (the same on every rank); biases and LayerNorms are randomised too
    (HF initialises them to 0 and 1). Weights of std 0.2 (``initializer_range``) make the
    logits far from uniform, so that greedy choices are clear-cut (top-2 margins above 0.1)
    and vary from step to step."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{
        "vocab_size": VOCAB, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.2, **overrides,
    })  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 1:
                param.add_(torch.empty_like(param).uniform_(-0.3, 0.3))
    return hf


def our_model(hf, tp: int, pp: int = 1, **overrides) -> GPT2Model:
    """Our GPT-2 at TP x PP with ``hf``'s weights (through the inventory's names); keywords
    override configuration fields (``sequence_parallel``, ``recompute_granularity``)."""
    config = dataclasses.replace(config_from_hf(hf.config.to_dict()), **overrides)
    parallel_state.initialize_model_parallel(tp, pp)
    model = GPT2Model(config)
    load_full_state(model, canonical_from_hf(hf.state_dict(), config))
    return model.eval()


TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


# The family and its inventory ---------------------------------------------------------------


def test_family_is_registered_and_names_every_hf_tensor():
    assert get_family("gpt2") is GPT2 and GPT2.model is GPT2Model
    hf = random_hf_model()
    config = config_from_hf(hf.config.to_dict())
    inventory = config.inventory()
    assert config.family == "gpt2" and config.ffn_hidden_size == 256
    expected = {n: tuple(t.shape) for n, t in hf.state_dict().items() if n != "lm_head.weight"}
    to_hf = inventory.renamer("name", "hf")
    assert {to_hf(t.name): t.hf_shape for t in inventory.canonical_tensors()} == expected
    assert config.num_parameters() == sum(p.numel() for p in hf.parameters())


GPT2_FLAGS = ["--model-provider", "examples.gpt2:GPT2", "--num-layers", "2", "--hidden-size",
              "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256", "--vocab-size",
              "256", "--max-position-embeddings", "64", "--train-iters", "1"]  # fmt: skip


def test_the_trainer_builds_it_from_the_model_provider_flag(capsys):
    model = parse_args(GPT2_FLAGS).model
    assert model.family == "gpt2" and model.tie_word_embeddings
    # 6 FLOPs per matmul weight (the position embedding is a lookup) + attention's 12·L·h·s.
    matmul_weights = model.num_parameters() - 64 * 64
    assert flops_per_token(model, 32) == 6 * matmul_weights + 12 * 2 * 64 * 32
    with pytest.raises(SystemExit):
        parse_args([*GPT2_FLAGS, "--num-query-groups", "2"])
    assert "--num-query-groups: not used by model family 'gpt2'" in capsys.readouterr().err


def test_fused_qkv_is_one_canonical_tensor_split_into_whole_heads():
    """``c_attn`` is one canonical tensor ``[3h, h]``; at TP=2 each rank's shard (as a
    checkpoint writes it) holds half of Q's, K's and V's rows, not a half of the fused rows."""
    config = config_from_hf(random_hf_model().config.to_dict())
    spec = config.inventory(2).spec("layers.1.attention.qkv.weight")
    assert [p.name for p in spec.parts] == ["layers.1.attention.qkv.weight"]
    assert spec.partition_sizes == (64, 64, 64) and spec.parts[0].hf_transposed
    full = torch.arange(192.0).unsqueeze(1).expand(192, 64)
    for rank in (0, 1):
        placement = spec_placement(spec, rank, 2)
        local = local_from_canonical(placement, {spec.parts[0].name: full}.__getitem__)
        rows = [
            r for block in (0, 64, 128) for r in range(block + 32 * rank, block + 32 * rank + 32)
        ]
        assert torch.equal(local[:, 0], torch.tensor(rows, dtype=torch.float32))


def test_unsupported_hf_configs_are_named(tmp_path):
    base = random_hf_model().config.to_dict()
    changes = {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True,
               "activation_function": "relu"}  # fmt: skip
    with pytest.raises(ValueError) as error:
        config_from_hf({**base, **changes})
    for field in changes:
        assert field in str(error.value)
    hf = random_hf_model(activation_function="gelu")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="activation_function 'gelu'"):
        hf_to_engine(tmp_path / "hf", tmp_path / "engine")


# Logits ---------------------------------------------------------------------------------------


def logits_vs_hf(tp: int, sequence_parallel: bool) -> float:
    hf = random_hf_model()
    model = our_model(hf, tp, sequence_parallel=sequence_parallel)
    try:
        with torch.no_grad():
            ours = gather_from_tensor_model_parallel_region(model(TOKENS))[..., :VOCAB]
            return (ours - hf(TOKENS).logits).abs().max().item()
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("tp, sequence_parallel", [(1, False), (2, False), (2, True)])
def test_logits_match_transformers(pool, tp, sequence_parallel):
    worst = max(pool.run(logits_vs_hf, tp, sequence_parallel))
    assert worst <= 1e-4, f"max |logits - HF logits| = {worst:.2e}"


def initial_weights(tp: int) -> dict[str, torch.Tensor]:
    parallel_state.initialize_model_parallel(tp)
    try:
        config = config_from_hf(random_hf_model().config.to_dict())
        return gather_full_state(GPT2Model(config))
    finally:
        parallel_state.destroy_model_parallel()


def test_initialisation_does_not_depend_on_tp(pool):
    one, two = pool.run(initial_weights, 1)[0], pool.run(initial_weights, 2)[0]
    assert sorted(one) == sorted(two)
    for name in one:
        assert torch.equal(one[name], two[name]), name


def gradients(
    tp: int, sequence_parallel: bool, recompute: str | None = None
) -> dict[str, torch.Tensor]:
    """Full gradients of the summed token losses, after `finalize_model_grads` (which sums
    the gradients each TP rank holds only part of: LayerNorms, row-parallel biases and the
    position embedding under sequence parallelism)."""
    model = our_model(
        random_hf_model(), tp, sequence_parallel=sequence_parallel, recompute_granularity=recompute
    )
    model.train()
    try:
        model(TOKENS, labels=TOKENS.roll(-1, dims=1)).sum().backward()
        finalize_model_grads([model])
        return gather_full_state(model, grads=True)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("recompute", [None, "full", "selective"])
def test_gradients_at_tp2_with_sequence_parallelism_equal_tp1(pool, recompute):
    reference = pool.run(gradients, 1, False)[0]
    for grads in pool.run(gradients, 2, True, recompute):
        assert sorted(grads) == sorted(reference)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-5, msg=name)


# Conversion -----------------------------------------------------------------------------------


def converted_logits(checkpoint: str, tp: int) -> torch.Tensor:
    """The converted checkpoint loaded at TP=tp (PP=1): full logits of ``TOKENS``."""
    parallel_state.initialize_model_parallel(tp)
    try:
        model = load_model(checkpoint)
        with torch.no_grad():
            return gather_from_tensor_model_parallel_region(model(TOKENS))[..., :VOCAB]
    finally:
        parallel_state.destroy_model_parallel()


def test_hf_to_engine_at_tp2_pp2_and_back(pool, tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected = hf(TOKENS).logits
    assert convert_main([
        "hf-to-engine", "--model-provider", "examples.gpt2:GPT2", "--load-dir",
        str(tmp_path / "hf"), "--save-dir", str(tmp_path / "engine"),
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
    ]) == 0  # fmt: skip
    directory = tmp_path / "engine" / "iter_0000000"
    assert sorted(p.name for p in directory.glob("model_*")) == [
        f"model_tp{t:02d}_pp{p:02d}.safetensors" for t in (0, 1) for p in (0, 1)
    ]
    c_attn = hf.state_dict()["transformer.h.1.attn.c_attn.weight"].t()  # [q|k|v, h]
    with safe_open(str(directory / "model_tp01_pp01.safetensors"), framework="pt") as f:
        shard = f.get_tensor("model/layers.1.attention.qkv.weight/0")
    assert torch.equal(shard, torch.cat([block[32:] for block in c_attn.split(64)]))
    for tp in (1, 2):  # resharded on load: TP=2 x PP=2 -> TP=1 (DP=2) and TP=2 x PP=1
        results = pool.run(converted_logits, str(tmp_path / "engine"), tp)
        worst = max((logits - expected).abs().max().item() for logits in results)
        assert worst <= 1e-4, f"TP={tp}: max |logits - HF logits| = {worst:.2e}"

    out = engine_to_hf(tmp_path / "engine", tmp_path / "exported")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        saved_names = set(f.keys())
    files = set(
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    exported = set()
    for file in files:
        with safe_open(str(out / file), framework="pt") as f:
            exported |= set(f.keys())
    assert exported == saved_names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # the source's, kept
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    original = hf.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_hub_style_files_without_the_prefix_and_with_mask_buffers_convert(tmp_path):
    """The original GPT-2 checkpoints: no ``transformer.`` prefix, ``attn.bias`` buffers."""
    hf = random_hf_model()
    hf.config.save_pretrained(tmp_path / "hub")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()}
    state.pop("lm_head.weight")  # tied: the Hub files hold the embedding only
    n = hf.config.n_positions
    for layer in range(hf.config.n_layer):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    save_file(state, str(tmp_path / "hub" / "model.safetensors"), metadata={"format": "pt"})
    assert convert_main([
        "hf-to-engine", "--model-provider", "examples.gpt2:GPT2", "--load-dir",
        str(tmp_path / "hub"), "--save-dir", str(tmp_path / "engine"),
    ]) == 0  # fmt: skip
    saved = read_full_state(tmp_path / "engine" / "iter_0000000")["model"]
    original = hf.state_dict()
    assert torch.equal(saved["embedding.weight"], original["transformer.wte.weight"])
    assert torch.equal(
        saved["layers.1.attention.qkv.weight"], original["transformer.h.1.attn.c_attn.weight"].t()
    )


# Training -------------------------------------------------------------------------------------

ITERS = 4


@pytest.fixture(scope="module")
def solo():
    ranks = RankPool(1)
    yield ranks
    ranks.close()


def gpt2_job(data_prefix: str, tp: int, pp: int, sequence_parallel: bool = False) -> JobConfig:
    model = ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
        vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True,
        sequence_parallel=sequence_parallel, family="gpt2",
    )  # fmt: skip
    return JobConfig(
        model=model,
        parallel=ParallelConfig(tp, pp),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, lr_decay_style="cosine", lr_warmup_iters=1),
        ddp=DistributedDataParallelConfig(
            overlap_grad_reduce=True, use_distributed_optimizer=True, bucket_size=20_000
        ),
        training=TrainingConfig(
            micro_batch_size=2,
            global_batch_size=16,
            seq_length=32,
            train_iters=ITERS,
            eval_iters=0,
            log_interval=ITERS,
        ),  # fmt: skip
        data=DataConfig(data_path=[data_prefix], split="98,1,1", num_workers=0),
        checkpoint=CheckpointConfig(),
    )


def train(job: JobConfig) -> list[float]:
    from engine.training import pretrain

    result = pretrain(job, model_provider=GPT2)  # what --model-provider examples.gpt2:GPT2 does
    return [result.losses[i] for i in range(1, ITERS + 1)]


@pytest.fixture(scope="module")
def reference_losses(solo, corpus) -> list[float]:  # noqa: F811
    losses = solo.run(train, gpt2_job(corpus, 1, 1))[0]
    assert losses[-1] < losses[0] - 0.5, f"the loss did not fall: {losses}"
    return losses


@pytest.mark.parametrize(
    "tp, pp, sequence_parallel", [(2, 1, True), (1, 2, False), (2, 2, False)],
    ids=["tp2-sp-dp4", "pp2-dp4", "tp2-pp2-dp2"],
)  # fmt: skip
def test_training_matches_one_rank(pool8, corpus, reference_losses, tp, pp, sequence_parallel):  # noqa: E501, F811
    results = pool8.run(train, gpt2_job(corpus, tp, pp, sequence_parallel))
    assert all(losses == results[0] for losses in results)  # every rank knows the global loss
    torch.testing.assert_close(
        torch.tensor(results[0], dtype=torch.float64),
        torch.tensor(reference_losses, dtype=torch.float64), rtol=1e-5, atol=0,
    )  # fmt: skip


def train_from(job: JobConfig) -> dict[int, float]:
    """The losses of every iteration this run executes (a resumed run starts after its load)."""
    from engine.training import pretrain

    return pretrain(job, model_provider=GPT2).losses


def test_resume_and_reshard_as_for_llama(pool8, solo, corpus, reference_losses, tmp_path):  # noqa: E501, F811
    """Stopped at 2 at TP=2 x PP=2 x DP=2 (distributed optimizer): resumed at the same layout
    iterations 3-4 repeat the uninterrupted run bit for bit; resharded to one rank they match
    the single-process run within float32 tolerance."""
    job = gpt2_job(corpus, 2, 2)
    stop = dataclasses.replace(job, training=dataclasses.replace(job.training, exit_interval=2),
                               checkpoint=CheckpointConfig(save=str(tmp_path)))  # fmt: skip
    uninterrupted = pool8.run(train_from, job)[0]
    pool8.run(train_from, stop)
    load = CheckpointConfig(load=str(tmp_path))
    resumed = pool8.run(train_from, dataclasses.replace(job, checkpoint=load))[0]
    assert resumed == {i: uninterrupted[i] for i in (3, 4)}
    one_rank = solo.run(train_from, dataclasses.replace(gpt2_job(corpus, 1, 1), checkpoint=load))
    for i in (3, 4):
        assert one_rank[0][i] == pytest.approx(reference_losses[i - 1], rel=1e-5), i


# Inference ------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 250, 31], [12, 12, 40, 200, 9]]


def greedy_vs_hf(new_tokens: int) -> dict[str, list]:
    hf = random_hf_model()
    model = our_model(hf, 2)
    try:
        ours = [generate(model, [prompt], new_tokens)[0] for prompt in PROMPTS]
        theirs = [
            hf.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )[0, len(prompt) :].tolist()
            for prompt in PROMPTS
        ]  # fmt: skip
        return {"ours": ours, "theirs": theirs, "batch": generate(model, PROMPTS, new_tokens)}
    finally:
        parallel_state.destroy_model_parallel()


def test_greedy_decoding_matches_transformers_at_tp2(pool):
    for result in pool.run(greedy_vs_hf, 10):
        assert result["ours"] == result["theirs"]
        assert result["batch"] == result["ours"]  # left-padded prompts decode as alone


def hf_perplexity(hf, documents: list[list[int]], seq_length: int, stride: int) -> float:
    """HuggingFace's recipe: windows of ``seq_length`` every ``stride`` tokens, labels before
    the previous window's end masked (-100), the loss from HF's own ``labels`` path."""
    nll, count = 0.0, 0
    for document in documents:
        ids, previous_end = torch.tensor(document), 0
        for begin in range(0, len(ids), stride):
            end = min(begin + seq_length, len(ids))
            input_ids = ids[begin:end].unsqueeze(0)
            labels = input_ids.clone()
            labels[:, : -(end - previous_end)] = -100
            scored = int((labels[0, 1:] != -100).sum())
            with torch.no_grad():
                nll += hf(input_ids, labels=labels).loss.item() * scored
            count += scored
            previous_end = end
            if end == len(ids):
                break
    return math.exp(nll / count)


def perplexity_vs_hf(documents: list[list[int]]) -> tuple[float, float]:
    hf = random_hf_model()
    model = our_model(hf, 2)
    try:
        ours = evaluate_perplexity(model, documents, seq_length=32, stride=20).perplexity
        return ours, hf_perplexity(hf, documents, 32, 20)
    finally:
        parallel_state.destroy_model_parallel()


def test_perplexity_matches_transformers_at_tp2(pool):
    generator = torch.Generator().manual_seed(3)
    documents = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (70, 33, 9)]
    for ours, theirs in pool.run(perplexity_vs_hf, documents):
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_tools_evaluate_a_converted_gpt2_checkpoint(tmp_path):
    """What a user types: convert, then tools/evaluate.py --model-provider on the result."""
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main([
        "hf-to-engine", "--model-provider", "examples.gpt2:GPT2", "--load-dir",
        str(tmp_path / "hf"), "--save-dir", str(tmp_path / "engine"),
    ]) == 0  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    documents = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (70, 33)]
    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), np.uint16)
    for document in documents:
        builder.add_document(np.array(document, dtype=np.int64))
    builder.finalize(str(tmp_path / "docs.idx"))
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "evaluate.py"), "--model-provider",
         "examples.gpt2:GPT2", "--load", str(tmp_path / "engine"), "--data-path",
         str(tmp_path / "docs"), "--seq-length", "32", "--stride", "20"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ours = float(run.stdout.split("perplexity ")[1].split()[0])
    assert ours == pytest.approx(hf_perplexity(hf, documents, 32, 20), rel=1e-5)


def load_as(checkpoint: str, family: str) -> str:
    """The error of loading ``checkpoint`` into a one-rank model of ``family``."""
    from engine.checkpointing import CheckpointError, load_checkpoint
    from engine.models.build import build_model_chunks

    config = ModelConfig.from_preset("tiny", family=family, tie_word_embeddings=True)
    parallel_state.initialize_model_parallel()
    try:
        load_checkpoint(checkpoint, build_model_chunks(config), load_rng=False)
    except CheckpointError as error:
        return str(error)
    finally:
        parallel_state.destroy_model_parallel()
    return "loaded"


def test_a_checkpoint_of_the_other_family_says_what_it_holds(pool, tmp_path):
    random_hf_model().save_pretrained(tmp_path / "hf")
    assert convert_main([
        "hf-to-engine", "--model-provider", "examples.gpt2:GPT2", "--load-dir",
        str(tmp_path / "hf"), "--save-dir", str(tmp_path / "gpt2"),
    ]) == 0  # fmt: skip
    message = pool.run(load_as, str(tmp_path / "gpt2"), "llama")[0]
    assert "holds model 'gpt2' (2 layers, hidden 64); this run builds 'llama'" in message
    llama = pool.run(_save_tiny_llama, str(tmp_path / "llama"))[0]
    message = pool.run(load_as, llama, "gpt2")[0]
    assert "holds model 'llama' (2 layers, hidden 64); this run builds 'gpt2'" in message


def _save_tiny_llama(directory: str) -> str:
    from engine.checkpointing import save_checkpoint
    from engine.models.build import build_model_chunks

    parallel_state.initialize_model_parallel()
    try:
        chunks = build_model_chunks(ModelConfig.from_preset("tiny"))
        save_checkpoint(directory, 1, chunks, None, None, 0)
    finally:
        parallel_state.destroy_model_parallel()
    return directory
