"""The KV cache of the rows being decoded together: one transformers ``DynamicCache`` whose rows
are left-padded to a common length, with a mask of which cached positions are real.

Continuous batching needs rows to join and leave between decoding steps. A row that finished its
prefill joins by left-padding (the shorter side's keys and values, and its mask) and concatenating
along the batch axis; a finished or cancelled row leaves by index selection; columns that no row
uses any more (the padding of rows that left) are trimmed from the left. Positions never move:
rotary embeddings are applied before caching, and every step passes each row's own position ids.

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
    return isinstance(cache, DynamicCache) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class RaggedCache:
    """A batch of cached rows: ``cache`` (keys/values [rows, heads, length, dim] per layer) and
    ``mask`` [rows, length], 1 where a position holds a real token of that row."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask

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
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the columns no kept row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.mask.shape[1]
        if first:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` padded with zeros on the left of its sequence axis (dim 2 of keys/values, dim 1
    of a mask) to ``width``."""
    missing = width - (tensor.shape[2] if tensor.dim() == 4 else tensor.shape[1])
    if missing <= 0:
        return tensor
    if tensor.dim() == 4:
        return F.pad(tensor, (0, 0, missing, 0))
    return F.pad(tensor, (missing, 0))
