"""The KV cache of the rows being decoded together: one transformers ``DynamicCache`` whose rows
are left-padded to a common length, with a mask of which cached positions are real.

Continuous batching needs rows to join and leave between decoding steps. A row that finished its
prefill joins by left-padding (the shorter side's keys and values, and its mask) and stacking
along the batch axis; a finished or cancelled row leaves by index selection; columns that no row
uses any more (the padding of rows that left) are trimmed from the left. Positions never move:
rotary embeddings are applied before caching, and every step passes each row's own position ids.

Each layer's keys and values are views of buffers with spare positions on the right
(``SpareLayer``): a decoding step writes its token in place, where a ``DynamicLayer`` concatenates
(copies) the whole cache at every step of every layer. Buffers are copied only when rows join or
leave, or when the spare positions run out (then the spare grows with the cache).

Only caches made of plain ``DynamicLayer``s can be spliced like this (sliding-window and recurrent
layers keep other state); ``splicable`` says whether a model's cache is one.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def splicable(cache: object) -> bool:
    """Whether rows of ``cache`` can be joined, removed and trimmed here."""
    layers = getattr(cache, "layers", None)
    return (isinstance(cache, DynamicCache) and bool(layers)
            and all(type(layer) in (DynamicLayer, SpareLayer) for layer in layers))  # fmt: skip


SPARE = 64  # positions reserved beyond the longest row, at least (grows with the cache)


class SpareLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` [rows, heads, length, dim] are views of
    buffers with room for more positions; ``update`` writes into the room."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self._keys, self._values = keys, values
        self._show(length)

    @classmethod
    def holding(cls, keys: list[torch.Tensor], values: list[torch.Tensor], width: int, more: int = 0) -> SpareLayer:
        """A layer holding the rows of ``keys``/``values`` (stacked in order) right-aligned in
        ``width`` positions (left-padded with zeros), with room for ``more`` positions after
        them, and spare room beyond."""
        rows = sum(k.shape[0] for k in keys)
        room = width + more + max(SPARE, width // 2)
        buffers = []
        for parts in (keys, values):
            buffer = parts[0].new_zeros(rows, parts[0].shape[1], room, parts[0].shape[3])
            row = 0
            for part in parts:
                buffer[row : row + part.shape[0], :, width - part.shape[2] : width] = part
                row += part.shape[0]
            buffers.append(buffer)
        return cls(*buffers, width)

    def _show(self, length: int) -> None:
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        length, new = self.keys.shape[2], key_states.shape[2]
        if length + new > self._keys.shape[2]:
            grown = SpareLayer.holding([self.keys], [self.values], length, more=new)
            self._keys, self._values = grown._keys, grown._values
        self._keys[:, :, length : length + new] = key_states
        self._values[:, :, length : length + new] = value_states
        self._show(length + new)
        return self.keys, self.values

    def _not_here(self, *args, **kwargs):
        raise NotImplementedError("a serving batch's cache changes through RaggedCache (join/keep) only")

    # transformers' own row and length edits would leave the buffers behind the views
    crop = batch_select_indices = batch_repeat_interleave = reorder_cache = reset = offload = prefetch = _not_here

    def select(self, index: torch.Tensor, first: int) -> None:
        """Keep rows ``index`` and positions from ``first`` on (the room stays)."""
        length = self.keys.shape[2]
        self._keys = self._keys.index_select(0, index)[:, :, first:]
        self._values = self._values.index_select(0, index)[:, :, first:]
        self._show(length - first)


class RaggedCache:
    """A batch of cached rows: ``cache`` (keys/values [rows, heads, length, dim] per layer) and
    ``mask`` [rows, length], 1 where a position holds a real token of that row."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask
        if splicable(cache):  # others are never spliced (the engine runs them as one batch)
            width = mask.shape[1]
            cache.layers = [SpareLayer.holding([layer.keys], [layer.values], width) for layer in cache.layers]

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def positions(self) -> torch.Tensor:
        """The position id of each row's next token: how many real tokens the row holds."""
        return self.mask.sum(dim=1, keepdim=True)

    def grow(self) -> torch.Tensor:
        """The attention mask for a one-token step of every row (and record that token)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        return self.mask

    def join(self, other: RaggedCache) -> None:
        """Append ``other``'s rows after this batch's rows."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.cache.layers = [
            SpareLayer.holding([mine.keys, theirs.keys], [mine.values, theirs.values], width)
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True)
        ]
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the columns no kept row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.mask.shape[1]
        for layer in self.cache.layers:
            layer.select(index, first)
        self.mask = self.mask[:, first:]


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    """``mask`` [rows, length] padded with zeros on the left to ``width`` positions."""
    return F.pad(mask, (width - mask.shape[1], 0)) if mask.shape[1] < width else mask
