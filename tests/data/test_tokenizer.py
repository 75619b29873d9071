"""Tokenizers against their libraries' own encoders and decoders."""

from __future__ import annotations

import pickle

import pytest

from engine.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, build_tokenizer

TEXTS = ["First Citizen:\nBefore we proceed", "  two  spaces ", "", "naïve café — ok?"]


def test_sentencepiece_llama2(sp_model):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    tok = build_tokenizer("Llama2Tokenizer", sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (32000, 1, 2, None)
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids == reference.encode(text)  # no BOS: Megatron's default for documents
        assert tok.detokenize(ids) == reference.decode(ids)
    assert tok.tokenize_batch(TEXTS, num_threads=2) == [tok.tokenize(t) for t in TEXTS]
    assert tok.detokenize(tok.tokenize(TEXTS[0])) == TEXTS[0]
    assert pickle.loads(pickle.dumps(tok)).tokenize(TEXTS[0]) == tok.tokenize(TEXTS[0])


def test_huggingface_matches_transformers(hf_tokenizer_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    assert isinstance(tok, HuggingFaceTokenizer)
    assert tok.vocab_size == len(reference)
    assert (tok.eod, tok.bos, tok.pad) == (
        reference.eos_token_id,
        reference.bos_token_id,
        reference.pad_token_id,
    )
    for text in TEXTS:
        assert tok.tokenize(text) == reference(text).input_ids  # Megatron's HF call
    assert tok.tokenize_batch(TEXTS) == [tok.tokenize(t) for t in TEXTS]
    ids = tok.tokenize(TEXTS[0])
    assert ids[0] == tok.bos and tok.detokenize(ids[1:]) == TEXTS[0]
    # A tokenizer.json path works as well as its directory.
    assert (
        build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir / "tokenizer.json").tokenize(
            TEXTS[0]
        )
        == ids
    )


def test_tiktoken_matches_megatron_core(tiktoken_vocab):
    from megatron.core.tokenizers import MegatronTokenizer

    vocab, vocab_size = tiktoken_vocab
    reference = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(vocab), metadata_path={"library": "tiktoken"}, vocab_size=vocab_size
    )
    tok = build_tokenizer("TikTokenizer", vocab, vocab_size=vocab_size)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (vocab_size, reference.eod, 1, 4)
    texts = [*TEXTS, "the king and the lord</s>"]
    for text in texts:
        assert tok.tokenize(text) == reference.tokenize(text)
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize_batch(texts, num_threads=2) == [tok.tokenize(t) for t in texts]
    assert (
        len(tok.tokenize(" the")) == 1 and tok.tokenize(" the")[0] >= 1000
    )  # merged, above the specials
    assert pickle.loads(pickle.dumps(tok)).tokenize(texts[-1]) == tok.tokenize(texts[-1])
    with pytest.raises(ValueError, match="need a list of at least"):
        build_tokenizer("TikTokenizer", vocab, vocab_size=vocab_size + 1)


def test_bad_arguments_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPE' is not supported"):
        build_tokenizer("GPT2BPE", tmp_path)
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("Llama2Tokenizer", None)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*no such SentencePiece"):
        build_tokenizer("Llama2Tokenizer", tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path)
