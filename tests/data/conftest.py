"""Fixtures shared by the data-pipeline tests: the shared test data and a small HF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.paths import SHARED_DATA

SP_MODEL = SHARED_DATA / "llama2-tokenizer.model"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def sp_model() -> Path:
    """The LLaMA-2 SentencePiece model from ../shared/data (skips when it is absent)."""
    if not SP_MODEL.is_file():
        pytest.skip(f"{SP_MODEL} absent: the shared test data is not checked out beside the repo")
    return SP_MODEL


@pytest.fixture(scope="session")
def shakespeare_docs() -> list[str]:
    """tinyshakespeare split into paragraphs, one document each (skips when absent)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(
            f"{SHAKESPEARE} absent: the shared test data is not checked out beside the repo"
        )
    return SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (2,000 entries, BOS added by its post-processor), trained
    here on a few sentences so the test needs no download; saved as tokenizer.json plus a
    tokenizer_config.json naming its special tokens, as a HuggingFace model directory has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "First Citizen: Before we proceed any further, hear me speak.",
        "All: Speak, speak. You are all resolved rather to die than to famish?",
        "We are accounted poor citizens, the patricians good.",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiktoken_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A TikToken vocabulary in Megatron's JSON format: the 256 bytes, then every prefix of
    some common words (with and without a leading space) and whitespace runs, so BPE can reach
    them. Returns the
    path and the `--vocab-size` that uses all of it (entries + 1,000 special ids)."""
    import base64

    words = "the and to of that you my in is not with be your for his this but have he me so"
    words += " what thou will we by all shall her thy our do no lord are him king good now"
    tokens = [bytes([i]) for i in range(256)]
    seen = set(tokens)
    # Runs of whitespace too, so that a cut inside one would change the ids.
    forms = [" " * 4, "\n  ", "\n\n", " \n", "\t "]
    for word in words.split():
        forms += [word, " " + word, word.capitalize(), " " + word.capitalize()]
    for form in forms:
        raw = form.encode()
        for end in range(2, len(raw) + 1):
            if raw[:end] not in seen:
                seen.add(raw[:end])
                tokens.append(raw[:end])
    vocab = [
        {"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
        for i, t in enumerate(tokens)
    ]
    path = tmp_path_factory.mktemp("tiktoken") / "vocab.json"
    path.write_text(json.dumps(vocab))
    return path, len(vocab) + 1000
