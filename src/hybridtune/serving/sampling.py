"""Choosing each row's next token with that row's own settings, in one batched decoding step.

Rows of one batch may differ in everything OpenAI lets a request set: temperature and top_p,
presence/frequency penalties (over the tokens the row generated so far), logit_bias, a seed
(each row samples from its own ``torch.Generator``, so a seeded request draws the same tokens
whatever it is batched with), and how many log-probabilities to report.

Reported log-probabilities are the model's own (log-softmax of the raw logits), before bias,
penalties and temperature — what vLLM reports by default, and what log-likelihood evaluation needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: report none; k: the chosen token's and the k most likely

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so small that sampling would overflow: the most likely token (vLLM's rule)."""
        return self.temperature < 1e-5

    @property
    def adjusts(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The row's random source (None for greedy rows): seeded when the request gave a seed."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int64 seed (torch takes uint64)
        return generator


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None: the first prompt token (nothing predicts it)
    top: tuple[tuple[int, float], ...] = ()


def next_tokens(
    logits: torch.Tensor,
    samplings: list[Sampling],
    generated: list[list[int]],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Each row's next token (``logits`` [rows, vocab], the last position of each row) and, for
    rows that asked, its log-probability with the most likely alternatives."""
    logits = logits.float()
    adjusted = logits
    if any(s.adjusts for s in samplings):
        adjusted = logits.clone()
        for row, (sampling, history) in enumerate(zip(samplings, generated, strict=True)):
            if sampling.adjusts:
                _adjust(adjusted[row], sampling, history)
    tokens = adjusted.argmax(dim=-1).tolist()
    for row, sampling in enumerate(samplings):
        if not sampling.greedy:
            tokens[row] = _sample(adjusted[row], sampling, generators[row])
    reports: list[TokenLogprob | None] = [None] * len(samplings)
    asked = [row for row, s in enumerate(samplings) if s.logprobs is not None]
    if asked:
        logprobs = torch.log_softmax(logits[asked], dim=-1)
        for i, row in enumerate(asked):
            reports[row] = _report(logprobs[i], tokens[row], samplings[row].logprobs or 0)
    return tokens, reports


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int, first: bool) -> list[TokenLogprob]:
    """Log-probabilities of prompt tokens: ``logits`` [n, vocab] at the positions before ``ids``'s
    tokens 1..n (position i predicts ``ids[i + 1]``); ``first`` adds ``ids[0]``, which nothing predicts."""
    out = [TokenLogprob(ids[0], None)] if first else []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for position in range(logprobs.shape[0]):
        out.append(_report(logprobs[position], ids[position + 1], top))
    return out


def _adjust(row: torch.Tensor, sampling: Sampling, history: list[int]) -> None:
    """OpenAI's penalties (frequency: per occurrence, presence: once) and logit_bias, in place."""
    if history and (sampling.presence_penalty or sampling.frequency_penalty):
        tokens, counts = torch.tensor(history, device=row.device).unique(return_counts=True)
        row[tokens] -= sampling.frequency_penalty * counts.to(row.dtype) + sampling.presence_penalty
    for token, bias in sampling.logit_bias.items():
        row[token] += bias


def _sample(row: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    probs = torch.softmax(row / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p
        outside[0] = False  # the most likely token always stays (top_p 0: greedy)
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _report(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    best = ()
    if top:
        values, indices = logprobs.topk(top)
        best = tuple(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), best)
