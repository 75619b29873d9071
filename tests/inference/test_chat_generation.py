"""`tools/generate.py --chat` end to end: a tiny LLaMA converted from HF with the LLaMA-3-style
tokenizer of tests/data/test_chat_template.py beside it (`--chat-template auto`).

The model's weights are random except that they make every greedy step emit `<|eot_id|>`
(the layers add nothing to the residual stream, one embedding dimension is constant and
positive, and only `<|eot_id|>`'s output row reads it), so the run shows both the rendering
of the prompt and where decoding stops: at the template's end of turn, which is not the
tokenizer's EOS (`<|end_of_text|>`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.paths import REPO

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

from tests.data.test_chat_template import build_chat_tokenizer  # noqa: E402

END_OF_TURN = "<|eot_id|>"


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(engine checkpoint, HF directory with the tokenizer and its template)."""
    from engine.conversion.convert import hf_to_engine

    root = tmp_path_factory.mktemp("chat_model")
    hf_dir = build_chat_tokenizer(root / "hf", "llama3")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )).eval()  # fmt: skip
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[end_of_turn, 0] = 1.0
    model.save_pretrained(hf_dir)
    hf_to_engine(hf_dir, root / "engine")
    return root / "engine", hf_dir


def generate_tool(checkpoint: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/generate.py", "--load", str(checkpoint), "--chat", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_chat_prompts_render_with_the_template_and_stop_at_end_of_turn(chat_checkpoint, tmp_path):
    checkpoint, hf_dir = chat_checkpoint
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    conversations = [
        [{"role": "user", "content": "Name a colour."}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one, please?"},
        ],
    ]
    prompts_file = tmp_path / "chats.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"messages": c}) for c in conversations))
    result = generate_tool(checkpoint, "--prompts-file", str(prompts_file), "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    stops = sorted(hf.convert_tokens_to_ids([END_OF_TURN, "<|end_of_text|>"]))
    assert f"chat template {hf_dir / 'chat_template.jinja'}; stop ids {stops}" in result.stderr
    for row, messages in enumerate(conversations):
        rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The rendered prompt, then one end-of-turn token: decoding stopped there.
        assert f"--- prompt {row} ---\n{rendered}{END_OF_TURN}\n" in result.stdout, result.stdout


def test_without_a_stop_the_model_keeps_emitting_end_of_turn(chat_checkpoint):
    """The same model and prompt with --ignore-eos: the stop above was the stop set's doing."""
    checkpoint, hf_dir = chat_checkpoint
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = "Name a colour."
    result = generate_tool(checkpoint, "--prompt", prompt, "--max-new-tokens", "3", "--ignore-eos")
    assert result.returncode == 0, result.stderr[-3000:]
    rendered = hf.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert result.stdout == rendered + END_OF_TURN * 3 + "\n"


def test_a_checkpoint_tokenizer_without_a_template_is_refused(chat_checkpoint, tmp_path):
    checkpoint, hf_dir = chat_checkpoint
    bare = tmp_path / "tokenizer"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((hf_dir / name).read_bytes())
    result = generate_tool(
        checkpoint, "--prompt", "Hi", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(bare),
    )  # fmt: skip
    assert result.returncode != 0
    assert f"looked for {bare / 'chat_template.jinja'}" in result.stderr
