"""Keys and values of prompt prefixes already computed, per adapter set, so a new prompt that
starts the same way (a chat template's system prompt, a few-shot preamble, a conversation's earlier
turns) prefills only what follows.

A prefix's keys and values depend on its tokens and on the adapter set only (attention is causal
and a row's positions start at 0), so an entry is keyed by (set, tokens). Prefixes are kept in
whole blocks of ``BLOCK`` tokens (as vLLM's automatic prefix caching keeps blocks of 16), never the
prompt's last token (its logits are the reply's first token). The least recently used entries go first when
the cache holds more than its byte budget. The engine uses it for models whose cache rows it can
splice (plain ``DynamicLayer``s); a reused prefix equals a recomputed one to fp32 rounding (the
batch it was computed in differs), as with any change of batch composition.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

BLOCK = 8  # tokens; a chat template's shared system prompt rarely ends on a block boundary


@dataclass
class _Entry:
    key: tuple[str | None, tuple[int, ...]]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [heads, length, dim]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.layers)


def _nbytes(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers)


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], _Entry] = OrderedDict()
        self._blocks: dict[tuple[str | None, int, int], _Entry] = {}  # (set, boundary, chained hash) -> entry
        self.held = 0
        self.stats = {"prefix_tokens_reused": 0}

    @staticmethod
    def reusable(ids: list[int]) -> int:
        """How many of a prompt's tokens a prefix may cover: whole blocks, never the last token."""
        return (len(ids) - 1) // BLOCK * BLOCK

    @staticmethod
    def _block_keys(set_name: str | None, ids: tuple[int, ...] | list[int], length: int) -> list[tuple]:
        """The key of every block boundary up to ``length``: a hash chained over the blocks, so
        all of a prompt's keys cost one pass over it (hits are checked token by token)."""
        keys, chain = [], 0
        for boundary in range(BLOCK, length + 1, BLOCK):
            chain = hash((chain, *ids[boundary - BLOCK : boundary]))
            keys.append((set_name, boundary, chain))
        return keys

    def longest(self, set_name: str | None, ids: list[int], use: bool = True) -> tuple[int, _Entry | None]:
        """The longest held prefix of ``ids`` for ``set_name``: (its length, its entry); ``use``
        makes the entry the most recently used."""
        if not self.budget or not self._entries:
            return 0, None
        for key in reversed(self._block_keys(set_name, ids, self.reusable(ids))):
            entry = self._blocks.get(key)
            length = key[1]
            if entry is not None and entry.key[1][:length] == tuple(ids[:length]):
                if use:
                    self._entries.move_to_end(entry.key)
                return length, entry
        return 0, None

    def use(self, entry: _Entry) -> None:
        """Make ``entry`` the most recently used."""
        self._entries.move_to_end(entry.key)

    def store(self, set_name: str | None, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hold the keys/values ``layers`` ([heads, length, dim] each) of ``ids``'s first
        ``reusable(ids)`` tokens, unless a held entry already covers them."""
        length = self.reusable(ids)
        if not length or self.longest(set_name, ids, use=False)[0] >= length:
            return
        prefix = [(k[:, :length], v[:, :length]) for k, v in layers]
        if _nbytes(prefix) > self.budget:  # before it evicts anything
            return
        key = (set_name, tuple(ids[:length]))
        for shorter in [k for k in self._entries if k[0] == set_name and key[1][: len(k[1])] == k[1]]:
            self._remove(shorter)  # the new entry covers everything it did
        entry = _Entry(key, [(k.clone(), v.clone()) for k, v in prefix])
        self._entries[key] = entry
        self.held += entry.nbytes
        for block in self._block_keys(set_name, key[1], length):
            self._blocks[block] = entry
        while self.held > self.budget:
            self._remove(next(iter(self._entries)))

    def drop_set(self, set_name: str | None) -> None:
        """Forget every prefix of ``set_name`` (it was unloaded)."""
        for key in [k for k in self._entries if k[0] == set_name]:
            self._remove(key)

    def _remove(self, key: tuple[str | None, tuple[int, ...]]) -> None:
        """Forget an entry. A block it shares with another entry stays reachable only if it pointed
        there; otherwise the next prompt that starts that way stores it again."""
        entry = self._entries.pop(key)
        self.held -= entry.nbytes
        for block in self._block_keys(key[0], key[1], len(key[1])):
            if self._blocks.get(block) is entry:
                del self._blocks[block]


def seed_prefill(
    prefixes: PrefixCache, sets: list[str | None], prompts: list[list[int]], width: int
) -> tuple[int, DynamicCache | None]:
    """Where a prefill of ``prompts`` (left-padded to ``width``) can start, and a cache holding
    each row's reused prefix up to that column: (0, None) when no row reuses anything. Rows start
    at one column, so a row reuses at most what the others let it (its prefix may be cut)."""
    starts = [width - len(prompt) for prompt in prompts]
    found = [prefixes.longest(s, prompt, use=False) for s, prompt in zip(sets, prompts, strict=True)]
    column = min(start + length for start, (length, _) in zip(starts, found, strict=True))
    reused = [max(0, column - start) for start in starts]
    if not any(reused):
        return 0, None
    for (_, entry), n in zip(found, reused, strict=True):
        if n:
            prefixes.use(entry)
    template = next(entry for (_, entry), n in zip(found, reused, strict=True) if n).layers
    layers = []
    for layer, (keys_like, values_like) in enumerate(template):
        keys = keys_like.new_zeros(len(prompts), keys_like.shape[0], column, keys_like.shape[2])
        values = values_like.new_zeros(len(prompts), values_like.shape[0], column, values_like.shape[2])
        for row, ((_, entry), n) in enumerate(zip(found, reused, strict=True)):
            if n:
                keys[row, :, column - n :] = entry.layers[layer][0][:, :n]
                values[row, :, column - n :] = entry.layers[layer][1][:, :n]
        layers.append((keys, values))
    prefixes.stats["prefix_tokens_reused"] += sum(reused)
    return column, DynamicCache(layers)


def store_prefixes(
    prefixes: PrefixCache, sets: list[str | None], prompts: list[list[int]], width: int, cache: DynamicCache
) -> None:
    """Hold the reusable prefix of each prompt of a finished prefill (left-padded to ``width``)."""
    for row, (set_name, prompt) in enumerate(zip(sets, prompts, strict=True)):
        start, length = width - len(prompt), prefixes.reusable(prompt)
        if length and prefixes.budget:
            layers = [(layer.keys[row, :, start : start + length], layer.values[row, :, start : start + length])
                      for layer in cache.layers]  # fmt: skip
            prefixes.store(set_name, prompt, layers)
