"""Token strings in logprobs: each token's exact bytes and its own text (not ``decode([id])``,
which strips SentencePiece's leading space and turns a partial UTF-8 character into U+FFFD), and
``text_offset`` into the decoded text; for a byte-level BPE tokenizer (as SmolLM2's) and a
SentencePiece one with byte fallback (as Llama 2's and Mistral's), both built here."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import make_tokenizer
from hybridtune.serving.token_text import TokenText

TEXT = "the quick brown fox sees héllo — wörld"


def sentencepiece_tokenizer():
    """Llama 2's layout: ▁-prefixed words, and the 256 byte pieces <0x00>..<0xFF> in the vocabulary
    (ordinary tokens, as in Llama's vocabulary) for characters it does not have."""
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", *letters, *(f"▁{c}" for c in letters)]:
        vocab.setdefault(piece, len(vocab))
    merges = []
    for word in ("▁the", "▁quick", "▁brown"):  # whole words, merged letter by letter
        for end in range(2, len(word) + 1):
            merges.append((word[: end - 1], word[end - 1]))
            vocab.setdefault(word[:end], len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
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
    offsets = tokens.offsets(ids, starts_text=True)  # the text's decode drops SentencePiece's first space
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for start, shown_text in zip(offsets, shown, strict=True):
        if not shown_text.startswith("bytes:"):
            assert text[start:].startswith(shown_text if start or text.startswith(shown_text) else shown_text[1:])
    if tokenizer.backend_tokenizer.decoder.__class__.__name__ != "ByteLevel":
        word = next(i for i in ids if tokens.text_of(i) == " quick")
        assert tokenizer.decode([word]) == "quick"  # what a decode of the token alone would have said


def test_a_character_split_over_byte_pieces_streams_each_token_once():
    """SentencePiece decodes an unfinished character to one U+FFFD per byte, so the text shrinks
    when the character completes: every token's logprob is still sent once, in order."""
    from types import SimpleNamespace

    from hybridtune.serving.engine import Engine, Job
    from hybridtune.serving.sampling import Sampling

    tokenizer = sentencepiece_tokenizer()
    sent = []
    job = Job(None, tokenizer("the", add_special_tokens=False)["input_ids"], 10, Sampling(temperature=0, logprobs=0),
              [], lambda kind, *data: sent.append((kind, *data)))  # fmt: skip
    engine = SimpleNamespace(tokenizer=tokenizer, eos=set(), _close=lambda j, reason: Engine._close(engine, j, reason))
    dash = tokenizer("▁quick —", add_special_tokens=False)["input_ids"]
    assert len([i for i in dash if tokenizer.convert_ids_to_tokens(i).startswith("<0x")]) == 3
    for token in dash:
        logits = torch.full((1, len(tokenizer)), -1e4)
        logits[0, token] = 0
        Engine._advance(engine, [job], logits)
    Engine._close(engine, job, "length")
    streamed = [item.token for kind, *data in sent if kind == "text" for item in data[1]]
    assert streamed == dash
    assert "".join(data[0] for kind, *data in sent if kind == "text") == job.text == " quick —"
