"""Input dropout of the low-rank methods (LoRA, DoRA, the LoRA mixture): one implementation.

Each element is kept with probability 1 - p and scaled by 1/(1 - p), like nn.Dropout, with three
departures for speed:

- the branches of one entry that read the same input tensor share one mask (q, k and v read the
  same normalised hidden states; gate and up too), so it is drawn and applied once, not per
  layer. Each entry (and each adapter set's copy of it) has its own ``SharedDropout``, so two
  entries never share a mask; it remembers only the last input it masked, weakly;
- the mask comes from 16-bit lanes of 64-bit random words (one word per four elements), so p is
  rounded to a multiple of 1/65536; on the CPU the words are SplitMix64 of a counter from a seed
  drawn from torch's generator (parallel, ~2x cheaper than ``random_``, which is serial there;
  ``torch.manual_seed`` still makes runs repeatable), elsewhere ``random_``;
- it is applied as a multiply by a {0, 1/(1-p)} tensor, whose backward is one more multiply
  (cheaper than ``where``), for 4 bytes per element kept until the backward instead of 1.

On CUDA with Triton, one kernel draws, applies and (in the backward) draws again the mask from a
seed, and no mask is kept (kernels/seeded_dropout.py); p is then exact.
"""

from __future__ import annotations

import weakref

import torch
from pydantic import AliasChoices, Field, PrivateAttr

from ..core.validation import StrictModel
from ..kernels.seeded_dropout import kernel_runs_on, seeded_dropout


class SharedDropout:
    """The dropout of one entry's branches (see the module docstring). Not an nn.Module: it has
    no state to save, only the last (input, masked input) pair, so siblings reuse the mask."""

    def __init__(self, p: float) -> None:
        self.p = p
        # the input weakly, its masked copy strongly: under activation checkpointing autograd keeps
        # no copy, and siblings of the same call (and the recompute) must still find this mask
        self._last: tuple[weakref.ref, int, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if not training or self.p == 0:
            return x
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        dropped = seeded_dropout(x, self.p) if kernel_runs_on(x) else None
        if dropped is None:
            dropped = x * keep_mask(x, self.p)
        self._last = (weakref.ref(x), x._version, dropped)
        return dropped

    def last_mask(self) -> torch.Tensor | None:
        """The mask (0 or 1/(1-p) per element) of the input masked last, for tests."""
        if self._last is None or self._last[0]() is None:
            return None
        return self._last[2].detach() / self._last[0]().detach()

    def __deepcopy__(self, memo: dict) -> SharedDropout:
        return SharedDropout(self.p)  # a copied model draws its own masks

    def __getstate__(self) -> dict:
        return {"p": self.p}

    def __setstate__(self, state: dict) -> None:
        self.p, self._last = state["p"], None


class InputDropout(StrictModel):
    """The ``dropout`` field of a method config whose branches mask their input, and the entry's
    one ``SharedDropout``, made fresh each time the entry is attached (``begin_attach``)."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0, validation_alias=AliasChoices("dropout", "lora_dropout"))
    _dropout: SharedDropout | None = PrivateAttr(None)

    def begin_attach(self) -> None:
        self._dropout = SharedDropout(self.dropout)

    def entry_dropout(self) -> SharedDropout:
        """The entry's dropout for the branches being built now."""
        if self._dropout is None:
            self.begin_attach()
        return self._dropout

    def __eq__(self, other: object) -> bool:
        """Configs are equal when their fields are (not the entry's dropout state)."""
        if not isinstance(other, StrictModel):
            return NotImplemented
        return type(self) is type(other) and self.model_dump() == other.model_dump()

    __hash__ = None  # like every pydantic model that is not frozen


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A {0, 1/(1-p)} tensor shaped like ``x``, each element 0 with probability p."""
    with torch.no_grad():
        lanes = random_words((x.numel() + 3) // 4, x.device).view(torch.int16)[: x.numel()].view(x.shape)
        return torch.where(lanes >= round(p * 65536) - 32768, 1.0 / (1.0 - p), 0.0).to(x.dtype)


# SplitMix64 (Steele, Lea & Flood 2014) as signed int64 constants: a counter times the golden
# gamma plus a seed, then three xor-shift/multiply rounds.
_GAMMA, _MIX1, _MIX2 = (c - 2**64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def random_words(count: int, device: torch.device) -> torch.Tensor:
    """``count`` uniformly random int64 words drawn from torch's generator for ``device``."""
    if device.type != "cpu":
        return torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    seed = int(torch.empty((), dtype=torch.int64).random_(-(2**63), 2**63 - 1))
    words = torch.arange(1, count + 1, dtype=torch.int64).mul_(_GAMMA).add_(seed)
    shifted = torch.empty_like(words)
    for shift, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(words, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)  # logical shift
        words.bitwise_xor_(shifted)
        if multiplier is not None:
            words.mul_(multiplier)
    return words
