"""A LoRA run from a HF model to PEFT and back to HF, through the tools as users run them:

random ``transformers`` LLaMA -> ``hf-to-engine`` (the base) -> LoRA training at TP=2 x PP=2 x
DP=2 with ``--pretrained-checkpoint`` (adapters saved) -> ``lora-to-peft``: ``PeftModel
.from_pretrained`` on the HF model gives the logits of ``lora-merge`` -> ``engine-to-hf`` (the
engine's merged model) within 1e-4, and PEFT's ``merge_and_unload()`` gives its weights within
1e-6; ``lora-merge`` onto another base is refused naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.paths import REPO
from tests.peft.test_lora_training import fsdp_lora_job, lora_job, train_job, with_checkpoints
from tests.rank_pool import module_pool
from tests.training.test_training import corpus  # noqa: F401 (a fixture)
from tools.convert_checkpoint import main as convert_main

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
peft = pytest.importorskip("peft", reason="peft is a test extra")

pool8 = module_pool(8)


def hf_base(seed: int):
    """A random LLaMA with the architecture of the engine's ``tiny`` preset (vocab 256, the
    byte corpus' ids)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def convert(*args: str) -> str:
    """The tool as users run it; ``lora-*`` in a process of its own (they start a process
    group of one, which a process that later forks gloo ranks must not have held), returning
    its stderr (the progress)."""
    if not args[0].startswith("lora-"):
        assert convert_main(list(args)) == 0, args
        return ""
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args]
    run = subprocess.run(tool, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stderr


@pytest.fixture(scope="module")
def trained(pool8, corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("lora")
    hf_base(0).save_pretrained(root / "hf")
    convert("hf-to-engine", "--load-dir", str(root / "hf"), "--save-dir", str(root / "base"))
    job = with_checkpoints(lora_job(corpus, 2, 2), pretrained_checkpoint=str(root / "base"),
                           save=str(root / "adapters"))  # fmt: skip
    job = dataclasses.replace(job, optimizer=dataclasses.replace(job.optimizer, lr=3e-2))
    pool8.run(train_job, job)
    return root


TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def test_peft_loads_the_adapters_and_merges_as_the_engine(trained):
    root = trained
    progress = convert(
        "lora-to-peft", "--load-dir", str(root / "adapters"), "--save-dir", str(root / "peft"),
        "--base-model-name-or-path", str(root / "hf"),
    )  # fmt: skip
    assert "lora-to-peft: [" in progress and "100.0% 2/2 steps" in progress, progress
    config = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    progress = convert(
        "lora-merge", "--load-dir", str(root / "adapters"), "--save-dir", str(root / "merged")
    )
    assert "100.0% 4/4 steps" in progress and "step done" in progress, progress
    convert("engine-to-hf", "--load-dir", str(root / "merged"), "--save-dir",
            str(root / "merged_hf"))  # fmt: skip
    merged = transformers.LlamaForCausalLM.from_pretrained(root / "merged_hf").eval()
    base = transformers.LlamaForCausalLM.from_pretrained(root / "hf").eval()
    with_adapters = peft.PeftModel.from_pretrained(base, root / "peft").eval()
    with torch.no_grad():
        theirs, ours = with_adapters(TOKENS).logits, merged(TOKENS).logits
        plain = transformers.LlamaForCausalLM.from_pretrained(root / "hf")(TOKENS).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters trained: they change the logits
    assert (theirs - ours).abs().max() <= 1e-4
    unloaded = with_adapters.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, unloaded[name], rtol=0, atol=1e-6, msg=name)


def test_merging_onto_another_base_is_refused(trained, capsys):
    root = trained
    hf_base(1).save_pretrained(root / "other_hf")
    convert("hf-to-engine", "--load-dir", str(root / "other_hf"), "--save-dir",
            str(root / "other"))  # fmt: skip
    refused = ["lora-merge", "--load-dir", str(root / "adapters"), "--save-dir",
               str(root / "bad"), "--pretrained-checkpoint", str(root / "other")]  # fmt: skip
    assert convert_main(refused) == 1
    assert f"{root / 'other'} is not the base the adapters" in capsys.readouterr().err


def first_loss(job) -> float:
    return train_job(job)[1]


def test_a_peft_adapter_continues_training_at_another_layout(pool8, corpus, trained):  # noqa: F811
    """Started from the PEFT export at TP=2 + SP (DP=4), with DDP or FSDP2, the first
    iteration's loss is the one the engine's own adapters give on the same batch (weights-only
    load of their checkpoint), and not the base's."""
    root = trained
    job = with_checkpoints(lora_job(corpus, 2, 1, sequence_parallel=True),
                           pretrained_checkpoint=str(root / "base"))  # fmt: skip
    if not (root / "peft").exists():
        convert("lora-to-peft", "--load-dir", str(root / "adapters"), "--save-dir",
                str(root / "peft"))  # fmt: skip
    from_peft = pool8.run(first_loss, with_checkpoints(job, load_peft_adapter=str(root / "peft")))
    # Under FSDP2 the adapter's tensors go into this DP rank's rows of each shard.
    fsdp = with_checkpoints(fsdp_lora_job(corpus, 2, 1, sequence_parallel=True),
                            pretrained_checkpoint=str(root / "base"))  # fmt: skip
    fsdp = with_checkpoints(fsdp, load_peft_adapter=str(root / "peft"))
    fsdp_from_peft = pool8.run(first_loss, fsdp)
    assert fsdp_from_peft[0] == pytest.approx(from_peft[0], rel=1e-6)
    from_engine = pool8.run(first_loss, with_checkpoints(job, load=str(root / "adapters"),
                                                         finetune=True))  # fmt: skip
    fresh = pool8.run(first_loss, job)[0]
    assert from_peft[0] == pytest.approx(from_engine[0], rel=1e-6)
    assert abs(from_peft[0] - fresh) > 1e-4  # the adapters were loaded
    other_rank = dataclasses.replace(job, lora=dataclasses.replace(job.lora, rank=8))
    with pytest.raises(Exception, match="has rank 4, alpha 8 on .*this run: --lora-rank 8"):
        pool8.run(first_loss, with_checkpoints(other_rank, load_peft_adapter=str(root / "peft")))
