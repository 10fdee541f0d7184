"""Using several adapter sets together: merging LoRA sets into one, and ensembles at inference."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..core.config import HybridConfig
from ..core.kv_cache import cache_keyword, returned_cache
from ..core.model import HybridModel
from ..methods.base import Branch


def merge_sets(
    model: HybridModel,
    weights: dict[str, float],
    into: str,
    method: Literal["concat", "svd"] = "concat",
    rank: int | None = None,
) -> None:
    """Add set ``into`` whose single LoRA entry computes Σ w_set · (that set's LoRA deltas).

    ``concat`` is exact (ranks add up); ``svd`` compresses the weighted sum to ``rank`` per module
    by truncated SVD (the best rank-``rank`` approximation). Sets with non-LoRA entries are refused:
    an adapter is no weight delta and cannot be averaged into one.
    """
    if method == "svd" and not rank:
        raise ValueError("merge_sets(method='svd') needs rank=...")
    parts: dict[str, list[tuple[Branch, float]]] = defaultdict(list)
    low_rank = None  # the config class of the first entry: it builds the merged entry
    for name, weight in weights.items():
        model.check_set(name)
        others = [e for e, c in model.sets[name].methods.items() if not c.linear_low_rank]
        if others:
            raise ValueError(f"set '{name}' has non-LoRA entries ({', '.join(others)}); only LoRA sets can be merged")
        low_rank = low_rank or next((type(c) for c in model.sets[name].methods.values()), None)
        with model.acting_on(name):
            for entry, target, _, branch in model.branches():
                if branch.per_expert:
                    raise ValueError(
                        f"set '{name}': entry '{entry}' adapts the MoE expert tensors of {target}, which merge_sets "
                        "cannot combine; only sets of linear-layer LoRA can be merged"
                    )
                parts[target].append((branch, weight))
    if low_rank is None:
        raise ValueError(f"the sets {', '.join(weights)} have no entries to merge")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target, items in parts.items():
        a, b = low_rank.stack_deltas(items)
        if method == "svd":
            u, s, vh = torch.linalg.svd(b.float() @ a.float(), full_matrices=False)
            k = min(rank, s.shape[0])
            root = s[:k].sqrt()
            a, b = (root[:, None] * vh[:k]).to(a.dtype), (u[:, :k] * root).to(b.dtype)
        factors[target] = (a, b)
    ranks = {t: a.shape[0] for t, (a, _) in factors.items()}
    config = low_rank.exact(ranks, {t: float(r) for t, r in ranks.items()})  # alpha = r: scale 1
    model.add_set(into, HybridConfig(methods={"lora": config}))
    with model.acting_on(into), torch.no_grad():
        for _, target, _, branch in model.branches():
            branch.lora_A.copy_(factors[target][0])
            branch.lora_B.copy_(factors[target][1])


class Ensemble(nn.Module):
    """Several adapter sets (None = the base model) run as one batch; their logits are averaged
    with the given weights. The batch is replicated once per set and routed by ``adapter_sets``,
    so an ensemble of K sets costs one forward pass of K times the batch."""

    def __init__(self, model: HybridModel, weights: dict[str | None, float]) -> None:
        super().__init__()
        if not weights:
            raise ValueError("an ensemble needs at least one set")
        for name in weights:
            if name is not None:
                model.check_set(name)
        total = sum(weights.values())
        self.model = model
        self.names = list(weights)
        self.register_buffer("weights", torch.tensor([w / total for w in weights.values()]), persistent=False)

    def _replicated(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.repeat(len(self.names), *([1] * (tensor.dim() - 1)))

    def _sets_for(self, batch: int) -> list[str | None]:
        return [name for name in self.names for _ in range(batch)]

    def _mix(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        per_set = logits.reshape(len(self.names), batch, *logits.shape[1:])
        weights = self.weights.to(logits.device, logits.dtype).reshape(-1, *([1] * (per_set.dim() - 1)))
        return (per_set * weights).sum(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted average of every set's logits, shape [batch, seq, vocab]."""
        batch = input_ids.shape[0]
        out = self.model(
            input_ids=self._replicated(input_ids),
            attention_mask=self._replicated(attention_mask),
            adapter_sets=self._sets_for(batch),
        )
        return self._mix(out.logits, batch)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding on the averaged logits, with a KV cache shared by the replicated batch."""
        batch = input_ids.shape[0]
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        sets = self._sets_for(batch)
        tokens, past = input_ids, None
        cache_kw = cache_keyword(self.model.base_model)
        step_ids, step_mask = self._replicated(input_ids), self._replicated(mask)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            positions = (step_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            cached = {cache_kw: past} if past is not None else {}
            out = self.model(input_ids=step_ids, attention_mask=step_mask, position_ids=positions,
                             use_cache=True, adapter_sets=sets, **cached)  # fmt: skip
            past = returned_cache(out)
            next_token = self._mix(out.logits[:, -1], batch).argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= torch.isin(next_token, torch.tensor(sorted(eos), device=next_token.device)) if eos else False
            if finished.all():
                break
            step_ids = self._replicated(next_token[:, None])
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
        return tokens


class RuleRouter:
    """Picks a set per request from a metadata field: ``RuleRouter("domain", {"med": "medical"})``."""

    def __init__(self, field: str, mapping: dict[Any, str | None], default: str | None = None) -> None:
        self.field, self.mapping, self.default = field, mapping, default

    def route(self, metadata: Sequence[dict[str, Any]]) -> list[str | None]:
        return [self.mapping.get(m.get(self.field), self.default) for m in metadata]


class ClassifierRouter(nn.Module):
    """A linear classifier on the base model's mean-pooled last hidden state that picks a set
    per input. Trained from (text, set name) examples; the base model stays frozen."""

    def __init__(self, model: HybridModel, tokenizer: Any, sets: Sequence[str | None]) -> None:
        super().__init__()
        self.model, self.tokenizer, self.sets = model, tokenizer, list(sets)
        hidden = model.base_model.config.hidden_size
        self.head = nn.Linear(hidden, len(self.sets))

    @torch.no_grad()
    def features(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        with self.model.using(None):
            out = self.model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
        return (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)

    def fit(self, texts: Sequence[str], labels: Sequence[str | None], steps: int = 200, lr: float = 0.05) -> float:
        """Train the head; returns the training accuracy."""
        y = torch.tensor([self.sets.index(label) for label in labels])
        feats = self.features(texts).float()
        self._stats = (feats.mean(0), feats.std(0) + 1e-6)
        x = (feats - self._stats[0]) / self._stats[1]
        opt = torch.optim.Adam(self.head.parameters(), lr=lr)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(self.head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float((self.head(x).argmax(-1) == y).float().mean())

    @torch.no_grad()
    def route(self, texts: Sequence[str]) -> list[str | None]:
        x = (self.features(texts).float() - self._stats[0]) / self._stats[1]
        return [self.sets[i] for i in self.head(x).argmax(-1).tolist()]
