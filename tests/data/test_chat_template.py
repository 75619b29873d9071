"""Jinja chat templates (`engine.data.chat_template`) against transformers' own
`apply_chat_template`, on a small local tokenizer (trained here, no download) with a
LLaMA-3-style and a ChatML/Qwen-style template, each with and without `{% generation %}`
blocks: the same text and ids, the assistant mask of `return_assistant_tokens_mask=True`, the
turn-by-turn mask, where `auto` finds the template, and the errors when there is none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import numpy as np
import pytest

from engine.data.chat_template import (
    JinjaChatTemplate,
    encode_chat,
    encode_prompt,
    load_chat_template,
    stop_ids,
    token_mask,
)
from engine.data.config import DataConfig
from engine.data.sft_dataset import chat_template_of
from engine.data.tokenizer import build_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

# LLaMA-3's template (Meta-Llama-3-8B-Instruct), plus the date line of LLaMA-3.2's system
# header so strftime_now is exercised.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_GENERATION = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
# Qwen2.5's shape: a default system message, raise_exception on an unknown role.
CHATML = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if not (message['role'] == 'system' and loop.first) %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
CHATML_GENERATION = CHATML.replace(
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
    "{%- if message['role'] == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}\n"
    "    {%- endif %}",
)
assert CHATML_GENERATION != CHATML

# name: (template, BOS, EOS, end-of-turn token). The EOS tokens are the base models' (not the
# end of turn), so a stop at the end of turn must come from the template.
STYLES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "llama3_generation": (LLAMA3_GENERATION, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "chatml": (CHATML, None, "<|endoftext|>", "<|im_end|>"),
    "chatml_generation": (CHATML_GENERATION, None, "<|endoftext|>", "<|im_end|>"),
}
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
]  # fmt: skip

CONVERSATIONS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, please?"},
        {"role": "assistant", "content": "Crimson, naturally.\n"},
    ],
    "one_turn": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
    ],
}
PROMPTS = {
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ],
    "multi_turn_user": CONVERSATIONS["system_multi_turn"][:4],
}


def build_chat_tokenizer(directory: Path, style: str) -> Path:
    """A byte-level BPE tokenizer trained here on a few sentences, with the chat special
    tokens, saved by transformers' `PreTrainedTokenizerFast.save_pretrained` with the chat
    template of `style` (in chat_template.jinja, transformers' format); returns `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    template, bos, eos, _ = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "You are a helpful assistant. You are terse.",
        "Name a colour. Blue. Another one, please? Crimson, naturally.",
        "What is 2 + 2? It is 4. Hello there, how are you?",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos
    )
    fast.chat_template = template
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {style: build_chat_tokenizer(tmp_path_factory.mktemp(style), style) for style in STYLES}


def ours(directory: Path, messages: list[dict], add_generation_prompt: bool = False):
    """(text, ids, mask) of the engine's `auto` template on the directory's tokenizer."""
    template = load_chat_template("auto", directory)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", directory)
    ids, mask = encode_chat(template, messages, tokenizer, add_generation_prompt)
    return template.render(messages, add_generation_prompt), ids.tolist(), mask.tolist()


def turn_by_turn_reference(hf, messages: list[dict]) -> list[int]:
    """The turn-by-turn rule computed with transformers: the text each assistant message adds
    to the rendering of the messages before it with the generation prompt, trailing
    whitespace dropped; a token is masked when its offsets overlap that text."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix = hf.apply_chat_template(
                messages[:i], add_generation_prompt=True, tokenize=False
            )
            through = hf.apply_chat_template(messages[: i + 1], tokenize=False)
            spans.append((len(prefix), len(prefix) + len(through[len(prefix) :].rstrip())))
    text = hf.apply_chat_template(messages, tokenize=False)
    offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [int(any(s < b and e > a for a, b in spans)) for s, e in offsets]


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_text_ids_and_mask_equal_transformers(chat_dirs, style, conversation):
    messages = CONVERSATIONS[conversation]
    hf = transformers.AutoTokenizer.from_pretrained(chat_dirs[style])
    text, ids, mask = ours(chat_dirs[style], messages)
    assert text == hf.apply_chat_template(messages, tokenize=False)
    reference = hf.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == reference["input_ids"]
    if style.endswith("_generation"):
        assert mask == reference["assistant_masks"]
    else:
        assert mask == turn_by_turn_reference(hf, messages)


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_generation_prompt_equals_transformers(chat_dirs, style, prompt):
    messages = PROMPTS[prompt]
    hf = transformers.AutoTokenizer.from_pretrained(chat_dirs[style])
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    text, ids, _ = ours(chat_dirs[style], messages, add_generation_prompt=True)
    assert ids == expected
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith(("<|start_header_id|>assistant<|end_header_id|>\n\n", "assistant\n"))
    template = load_chat_template("auto", chat_dirs[style])
    tokenizer = build_tokenizer("HuggingFaceTokenizer", chat_dirs[style])
    assert encode_prompt(template, messages, tokenizer) == (expected, text)


@pytest.mark.parametrize("family", ["llama3", "chatml"])
def test_mask_is_each_reply_and_its_end_of_turn(chat_dirs, family):
    """The masked tokens read back as each reply followed by the end-of-turn token, nothing
    else, and turn by turn gives the mask of the generation-block twin of the template."""
    messages = CONVERSATIONS["system_multi_turn"]
    _, ids, mask = ours(chat_dirs[family], messages)
    _, twin_ids, twin_mask = ours(chat_dirs[f"{family}_generation"], messages)
    assert (ids, mask) == (twin_ids, twin_mask)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", chat_dirs[family])
    ids_array, mask_array = np.asarray(ids), np.asarray(mask)
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(mask_array)) + 1)
    learned = [tokenizer.detokenize(ids_array[r]) for r in runs if mask_array[r[0]] == 1]
    end_of_turn = STYLES[family][3]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if family == "llama3":  # its template trims the content; ChatML keeps the "\n"
        replies = [reply.strip() for reply in replies]
    assert learned == [reply + end_of_turn for reply in replies]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_stop_ids_hold_eos_and_the_end_of_turn_token(chat_dirs, style):
    template = load_chat_template("auto", chat_dirs[style])
    tokenizer = build_tokenizer("HuggingFaceTokenizer", chat_dirs[style])
    hf = transformers.AutoTokenizer.from_pretrained(chat_dirs[style])
    _, _, eos, end_of_turn = STYLES[style]
    assert template.end_of_turn_text() == end_of_turn
    expected = sorted({hf.convert_tokens_to_ids(eos), hf.convert_tokens_to_ids(end_of_turn)})
    assert stop_ids(template, tokenizer) == expected
    assert tokenizer.eod == hf.convert_tokens_to_ids(eos)


def test_auto_reads_tokenizer_config_and_jinja_file(chat_dirs, tmp_path):
    """chat_template.jinja first; else tokenizer_config.json's chat_template, a string or a
    list of named templates ("default" used); --tokenizer-model may name a file in the dir."""
    directory = shutil.copytree(chat_dirs["llama3"], tmp_path / "tok")
    jinja_file = directory / "chat_template.jinja"
    config_file = directory / "tokenizer_config.json"
    assert load_chat_template("auto", directory).origin == str(jinja_file)
    assert load_chat_template("auto", directory / "tokenizer.json").source == LLAMA3

    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHATML}))
    assert load_chat_template("auto", directory).source == LLAMA3  # the .jinja file wins
    jinja_file.unlink()
    template = load_chat_template("auto", directory)
    assert template.source == CHATML and "tokenizer_config.json" in template.origin
    assert template.special_tokens["bos_token"] == "<|begin_of_text|>"
    assert "chat_template" not in template.special_tokens
    # transformers reads the same config key: the rendering agrees with it.
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    messages = CONVERSATIONS["one_turn"]
    assert template.render(messages) == hf.apply_chat_template(messages, tokenize=False)

    named = [{"name": "tool_use", "template": CHATML}, {"name": "default", "template": LLAMA3}]
    config_file.write_text(json.dumps({**config, "chat_template": named}))
    assert load_chat_template("auto", directory).source == LLAMA3


def test_a_template_file_path(chat_dirs, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(LLAMA3)
    template = chat_template_of(str(path), chat_dirs["chatml"])
    assert isinstance(template, JinjaChatTemplate) and template.origin == str(path)
    # Its special tokens are those of the tokenizer it is used with.
    assert template.special_tokens["eos_token"] == "<|endoftext|>"
    assert DataConfig(sft=True, chat_template=str(path)).errors() == []


def test_missing_templates_are_errors_naming_the_flag_and_files(chat_dirs, tmp_path):
    directory = shutil.copytree(chat_dirs["chatml"], tmp_path / "bare")
    (directory / "chat_template.jinja").unlink()
    with pytest.raises(ValueError) as error:
        load_chat_template("auto", directory)
    message = str(error.value)
    assert "--chat-template auto" in message
    assert str(directory / "chat_template.jinja") in message
    assert str(directory / "tokenizer_config.json") in message

    missing = tmp_path / "nope.jinja"
    with pytest.raises(ValueError, match=f"--chat-template '{missing}': no such file"):
        chat_template_of(str(missing), directory)
    with pytest.raises(ValueError, match="give --tokenizer-model"):
        chat_template_of("auto", None)
    # The config check reports both before anything is loaded.
    errors = DataConfig(sft=True, chat_template=str(missing)).errors()
    assert len(errors) == 1 and "--chat-template" in errors[0] and str(missing) in errors[0]
    errors = DataConfig(
        sft=True,
        chat_template="auto",
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(directory),
    ).errors()
    assert len(errors) == 1 and str(directory / "chat_template.jinja") in errors[0]
    # Built-in names keep working without a tokenizer; auto is left to the tokenizer's own
    # check where its files are not there (a plan made on another machine).
    assert DataConfig(sft=True, chat_template="plain").errors() == []
    assert DataConfig(sft=True, chat_template="auto").errors() == []
    assert not DataConfig(
        sft=True,
        chat_template="auto",
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tmp_path / "elsewhere"),
    ).errors()

    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ValueError, match=f"chat template {broken}: line 1"):
        chat_template_of(str(broken), directory)


def test_helpers_render_as_in_transformers(chat_dirs, tmp_path):
    """raise_exception, tojson (non-ASCII and <>& kept), strftime_now and loop controls."""
    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson }}|{{ m.content | tojson(indent=2) }}\n{% endfor %}"
        "{{ strftime_now('%Y') }}{{ eos_token }}"
        "{% if messages | length > 3 %}{{ raise_exception('too long: ' ~ messages | length) }}"
        "{% endif %}"
    )
    path = tmp_path / "helpers.jinja"
    path.write_text(source)
    template = chat_template_of(str(path), chat_dirs["chatml"])
    assert isinstance(template, JinjaChatTemplate)
    hf = transformers.AutoTokenizer.from_pretrained(chat_dirs["chatml"])
    messages = [
        {"role": "user", "content": "é <b> & ü"},
        {"role": "assistant", "content": "ok", "name": None},
        {"role": "user", "content": "third"},
    ]
    rendered = template.render(messages)
    assert rendered == hf.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert '"é <b> & ü"' in rendered and '"name"' not in rendered  # None values dropped
    with pytest.raises(jinja2.TemplateError, match="too long: 4"):
        template.render(messages + messages[:1])


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_dirs, tmp_path):
    """Only the last assistant turn keeps its text: turn by turn cannot find the spans."""
    path = tmp_path / "last_only.jinja"
    path.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}...{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = chat_template_of(str(path), chat_dirs["chatml"])
    assert isinstance(template, JinjaChatTemplate)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", chat_dirs["chatml"])
    with pytest.raises(ValueError, match=r"message 2 \(assistant\).*\{% generation %\}"):
        encode_chat(template, CONVERSATIONS["system_multi_turn"], tokenizer)
    # Generation needs no mask, so such a template still renders a prompt.
    assert encode_prompt(template, PROMPTS["multi_turn_user"], tokenizer)[1].endswith(
        "...<|im_end|>\n<|im_start|>user\nAnother one, please?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_token_mask_counts_tokens_that_overlap_a_span():
    offsets = [(0, 3), (3, 5), (5, 9), (9, 10), (10, 14)]
    assert token_mask(offsets, [(4, 9)]) == [0, 1, 1, 0, 0]
    assert token_mask(offsets, [(3, 5), (10, 12)]) == [0, 1, 0, 0, 1]
    assert token_mask(offsets, []) == [0] * 5


def test_sentencepiece_offsets_and_control_tokens(sp_model):
    """SentencePiece makes no <s>/</s> from text: tokenize_with_offsets splits them off."""
    tokenizer = build_tokenizer("Llama2Tokenizer", sp_model)
    text = "<s>[INST] héllo wörld [/INST] ok</s>"
    ids, offsets = tokenizer.tokenize_with_offsets(text)
    assert ids == [
        tokenizer.bos,
        *tokenizer.tokenize("[INST] héllo wörld [/INST] ok"),
        tokenizer.eod,
    ]
    assert [text[a:b] for a, b in offsets][:3] == ["<s>", "[", "INST"]
    assert offsets[-1] == (len(text) - 4, len(text))
    assert all(a <= b == c for (a, b), (c, _) in zip(offsets, offsets[1:], strict=False))


def test_tiktoken_offsets(tiktoken_vocab):
    path, vocab_size = tiktoken_vocab
    tokenizer = build_tokenizer("TikTokenizer", path, vocab_size=vocab_size)
    text = "<s>the king</s>"
    ids, offsets = tokenizer.tokenize_with_offsets(text)
    assert ids == tokenizer.tokenize(text) and ids[0] == tokenizer.bos and ids[-1] == tokenizer.eod
    assert "".join(text[a:b] for a, b in offsets) == text
