"""The exact bytes and text of single tokens, for logprobs (``tokens``, ``bytes``, ``text_offset``).

``tokenizer.decode([id])`` is not a token's text: a SentencePiece piece ``▁world`` decodes alone
to ``world`` (its leading space is stripped as if it began the text), and a token holding part of a
UTF-8 character (a byte-level BPE byte, a ``<0xE2>`` byte-fallback piece) decodes to U+FFFD, so
different tokens report the same string. Here a token's bytes come from its vocabulary piece: the
byte-level alphabet mapped back to bytes (GPT-2, Llama 3, SmolLM2, Qwen), or SentencePiece's ``▁``
as a space and ``<0xNN>`` as that byte; any other tokenizer falls back to ``decode``. A token whose
bytes are not valid UTF-8 on their own is shown as OpenAI shows it, ``bytes:\\xe2\\x80``.
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from functools import cache
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are shifted
    to code points from 256 on, so every byte has a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The ``type`` of the fast tokenizer's decoder and of every decoder nested in it (the
    decoder's own JSON, not the whole tokenizer's, which holds the vocabulary and merges)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    kinds: set[str] = set()
    stack = [json.loads(decoder.__getstate__())]
    while stack:
        node = stack.pop()
        kinds.add(node.get("type", ""))
        stack += node.get("decoders") or []
    return kinds


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_text(tokenizer: Any) -> TokenText:
    """The TokenText of ``tokenizer``, made once and kept while the tokenizer lives."""
    found = _SHARED.get(tokenizer)
    if found is None:
        found = _SHARED[tokenizer] = TokenText(tokenizer)
    return found


class TokenText:
    """Bytes and display text of single tokens of one tokenizer (cached per token)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        self.byte_level = "ByteLevel" in kinds
        self.sentencepiece = bool(kinds & {"Metaspace", "ByteFallback"})
        self._special = set(tokenizer.all_special_ids)
        self._added = {i: t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
        self._bytes: dict[int, bytes] = {}

    def bytes_of(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = self._read(token)
        return self._bytes[token]

    def _read(self, token: int) -> bytes:
        if token in self._added:  # added tokens are stored as their text, not in the byte alphabet
            return self._added[token].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and token not in self._special:
            alphabet = _byte_level_alphabet()
            if self.byte_level and all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
            if self.sentencepiece:
                byte = _BYTE_PIECE.fullmatch(piece)
                return bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode()
        return self.tokenizer.decode([token]).encode()

    def text_of(self, token: int) -> str:
        """The token's text, or ``bytes:\\x..`` when its bytes are not a whole UTF-8 text."""
        raw = self.bytes_of(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def offsets(self, tokens: list[int], start: int = 0, starts_text: bool = False) -> list[int]:
        """Where each token starts in the text they decode to, counted in characters from ``start``
        (a token that ends inside a character starts where that character does). ``starts_text``:
        the tokens begin the text, whose decode drops the space a SentencePiece first word carries."""
        if starts_text and tokens:
            own = self.text_of(tokens[0])
            start -= max(0, len(own) - len(self.tokenizer.decode(tokens[:1]))) if not own.startswith("bytes:") else 0
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        out = []
        for token in tokens:
            out.append(max(start, 0))
            start += len(decoder.decode(self.bytes_of(token)))
        return out
