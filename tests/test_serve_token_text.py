"""Token strings in logprobs: each token's exact bytes and its own text (not ``decode([id])``,
which strips SentencePiece's leading space and turns a partial UTF-8 character into U+FFFD), and
``text_offset`` into the decoded text; for a byte-level BPE tokenizer (as SmolLM2's) and a
SentencePiece one with byte fallback (as Llama 2's and Mistral's), both built here."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import make_tokenizer
from hybridtune.serving.token_text import TokenText

TEXT = "the quick brown fox sees héllo — wörld"


def sentencepiece_tokenizer():
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *pieces],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"))  # fmt: skip
    tokenizer.train_from_iterator(["the quick brown fox sees the lazy dog"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("make", [make_tokenizer, sentencepiece_tokenizer], ids=["byte-level", "sentencepiece"])
def test_token_bytes_and_texts_are_exact_and_offsets_point_into_the_text(make):
    tokenizer = make()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    tokens = TokenText(tokenizer)
    joined = b"".join(tokens.bytes_of(i) for i in ids)
    assert joined.decode().strip() == text.strip() == TEXT  # SentencePiece: the text's leading space is stripped
    shown = [tokens.text_of(i) for i in ids]
    partial = [s for s in shown if s.startswith("bytes:")]
    assert partial, "the test text should split a character across tokens"
    assert all("\ufffd" not in s for s in shown)
    assert any(s.startswith(" ") and len(s) > 1 for s in shown)  # a word keeps its leading space
    lead = len(joined.decode()) - len(text)  # the stripped leading space (SentencePiece)
    for start, shown_text in zip(tokens.offsets(ids, -lead), shown, strict=True):
        if not shown_text.startswith("bytes:"):
            assert text[max(start, 0) :].startswith(shown_text.lstrip() if start < 0 else shown_text)
    if tokenizer.backend_tokenizer.decoder.__class__.__name__ != "ByteLevel":
        word = next(i for i in ids if tokens.text_of(i) == " quick")
        assert tokenizer.decode([word]) == "quick"  # what a decode of the token alone would have said
