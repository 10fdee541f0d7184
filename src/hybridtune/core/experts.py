"""Fused mixture-of-experts tensors: adapting a projection *inside* the expert computation.

transformers 5 keeps an MoE block's experts as one module of 3-D tensors (``gate_up_proj``
[experts, 2·inter, hidden] and ``down_proj`` [experts, hidden, inter], or transposed) and computes
it as: sort the (token, expert) pairs by expert, one grouped matmul per projection, the gate, the
routing weights, a sum per token. A per-expert delta on ``gate_up_proj`` has to be added before the
gate's nonlinearity, so it cannot be a hook on the module's output, and materialising W + ΔW for
every expert at every step (peft's ``target_parameters``) costs a full copy of the experts. Here the
experts are computed the same way with each branch's delta added to the projection it adapts, for
the pairs routed to each expert only (and, in a mixed batch, only for the rows of the branch's set).

A branch that works this way sets ``runs_inside = True`` and provides
``expert_delta(projection, x, expert_ids, offsets)``: the [pairs, out] delta of that projection for
the sorted pairs ``x`` (or None when it does not adapt that projection).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TargetError
from .partitioned import full_shape

PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
"""The expert tensors a branch can adapt, in the order the experts apply them."""


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module as transformers 5 builds them: 3-D projection tensors and a num_experts."""
    if not isinstance(getattr(module, "num_experts", None), int):
        return False
    return bool(expert_projections(module))


def expert_projections(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's 3-D projection tensors by name (``gate_up_proj``/``up_proj``, ``down_proj``), in
    the order the module defines them (peft nests its wrappers of one module in that order)."""
    own = module.named_parameters(recurse=False)
    return {n: p for n, p in own if n in PROJECTIONS and len(full_shape(p)) == 3}  # ZeRO-3: the full shape


def projection_features(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of one projection; transposed experts (GPT-OSS) store
    [experts, in, out], the others [experts, out, in]."""
    experts, first, second = full_shape(getattr(module, name))
    return (experts, first, second) if getattr(module, "is_transposed", False) else (experts, second, first)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows of ``x`` sorted by expert times their expert's matrix: ``weight`` is [experts, out, in]
    (or [experts, in, out] when ``transposed``); ``offsets`` are the cumulative rows per expert.

    torch's grouped matmul where its kernel takes the shapes (both matrix sides a multiple of 16
    bytes, which a LoRA factor of rank 2 is not), otherwise one matmul per expert."""
    weight_in_out = weight if transposed else weight.transpose(-2, -1)
    x = x.to(weight.dtype)  # as transformers' grouped experts do, under autocast too
    if _grouped_kernel_takes(x, weight_in_out):
        return _GROUPED_MM(x, weight_in_out, offs=offsets)
    out, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ weight_in_out[expert].to(x.dtype))
        start = end
    return torch.cat(out)


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if _GROUPED_MM is None or x.dtype != weight.dtype or x.device.type not in ("cpu", "cuda"):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.bfloat16):
        return False
    size = x.element_size()
    aligned = x.device.type != "cpu" or (x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)
    return aligned and all((dim * size) % 16 == 0 for dim in weight.shape[1:])


def _bias(module: nn.Module, name: str, expert_ids: torch.Tensor) -> torch.Tensor | None:
    if not getattr(module, "has_bias", False):
        return None
    return getattr(module, f"{name}_bias")[expert_ids]


def experts_forward(
    module: nn.Module,
    branches: Sequence[tuple[nn.Module, torch.Tensor | None]],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts module's output with every branch's deltas; ``branches`` are (branch, token
    indices it serves, or None for every token). Without branches: the module's own forward."""
    if not branches:
        return type(module).forward(module, hidden_states, top_k_index, top_k_weights)
    if getattr(module, "_is_expert_parallel", False):
        raise NotImplementedError("branches on expert-parallel (sharded) experts are not supported")
    tokens, top_k = top_k_index.shape
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    token_of_pair = order // top_k
    x = hidden_states[token_of_pair]
    offsets = _offsets(expert_ids, module.num_experts)
    pair_rows = [(b, None if rows is None else _pairs_of(rows, token_of_pair, tokens)) for b, rows in branches]

    def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
        out = grouped_linear(inputs, getattr(module, name), offsets, module.is_transposed)
        bias = _bias(module, name, expert_ids)
        if bias is not None:
            out = out + bias
        for branch, pairs in pair_rows:
            if pairs is None:
                delta = branch.expert_delta(name, inputs, expert_ids, offsets)
                if delta is not None:
                    out = out + delta.to(out.dtype)
            elif pairs.numel():
                sub_ids = expert_ids[pairs]
                delta = branch.expert_delta(name, inputs[pairs], sub_ids, _offsets(sub_ids, module.num_experts))
                if delta is not None:
                    out = out.index_add(0, pairs, delta.to(out.dtype))
        return out

    if getattr(module, "has_gate", hasattr(module, "gate_up_proj")):
        inner = module._apply_gate(project("gate_up_proj", x))
    else:
        inner = module.act_fn(project("up_proj", x))
    out = project("down_proj", inner)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    # the routing weights and the sum over each token's experts exactly as transformers' grouped
    # experts apply them (same dtypes, same order), so a zero delta gives its output bit for bit
    weighted = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return weighted[back].view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _offsets(sorted_ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Cumulative rows per expert of rows sorted by expert (grouped matmul's ``offs``)."""
    return torch.cumsum(torch.bincount(sorted_ids, minlength=experts), 0).to(torch.int32)


def _pairs_of(token_rows: torch.Tensor, token_of_pair: torch.Tensor, tokens: int) -> torch.Tensor:
    """Indices of the sorted pairs whose token is one of ``token_rows``."""
    chosen = torch.zeros(tokens, dtype=torch.bool, device=token_of_pair.device)
    chosen[token_rows] = True
    return chosen[token_of_pair].nonzero().squeeze(-1)


def tokens_of_rows(rows: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """The flattened token indices of batch ``rows`` when ``tokens`` = ``batch`` x sequence (an MoE
    block flattens [batch, seq, hidden] to [tokens, hidden] before its experts)."""
    per_row, rest = divmod(tokens, batch)
    if rest:
        raise ValueError(f"adapter_sets routes {batch} rows, but a module of an MoE block saw {tokens} tokens")
    return (rows[:, None] * per_row + torch.arange(per_row, device=rows.device)).reshape(-1)


def check_supported(module: nn.Module, name: str) -> None:
    """Refuse, by name, an experts module whose computation this file does not reproduce: only
    those of transformers' experts interface (``use_experts_implementation``), whose layout flags
    (has_gate, is_transposed, has_bias) say how to compute them."""
    described = all(hasattr(module, a) for a in ("has_gate", "is_transposed", "has_bias", "_apply_gate"))
    if not described:
        raise TargetError(
            f"{name} ({type(module).__name__}) is not an experts module of transformers' experts interface, whose "
            "computation hybridtune reproduces with per-expert deltas; adapt its block with an Adapter (after: mlp)"
        )


def is_router(module: nn.Module) -> bool:
    """An MoE router as transformers 5 builds them: not a linear layer, but a [num_experts, hidden]
    ``weight`` it applies as one (``F.linear(hidden, weight)``), then its softmax and top-k."""
    weight = module._parameters.get("weight")
    return (
        not isinstance(module, nn.Linear)
        and isinstance(weight, torch.Tensor)
        and len(full_shape(weight)) == 2
        and getattr(module, "num_experts", None) == full_shape(weight)[0]
    )


def reweighted_forward(
    module: nn.Module, branches: Sequence[tuple[nn.Module, torch.Tensor | None]], *args: Any, **kwargs: Any
) -> Any:
    """A router computed with ``weight`` + each branch's ``delta_weight()`` (a router's weight is
    small: [experts, hidden]), by the router's own forward, so its softmax, top-k, grouping and
    bias corrections stay the model's. In a mixed batch, the tokens of each set's rows are
    computed with that set's weight and put back in place of the base routing."""
    weight = module.weight
    per_set: dict[str, tuple[torch.Tensor | None, list[nn.Module]]] = {}
    for branch, rows in branches:  # the entries of one set act together on its rows
        per_set.setdefault(branch.set_name, (rows, []))[1].append(branch)
    (first_rows, first_members), *_ = per_set.values()
    if len(per_set) == 1 and first_rows is None:  # no routing: the active set on every token
        changed = weight + sum(b.delta_weight().to(weight.dtype) for b in first_members)
        return _forward_with_weight(module, changed, args, kwargs)
    out = type(module).forward(module, *args, **kwargs)
    hidden = args[0]
    tokens = hidden.reshape(-1, hidden.shape[-1])
    for rows, members in per_set.values():
        changed = weight + sum(b.delta_weight().to(weight.dtype) for b in members)
        part = _forward_with_weight(module, changed, (tokens[rows], *args[1:]), kwargs)
        out = _put_rows(out, part, rows, tokens.shape[0])
    return out


def _forward_with_weight(module: nn.Module, weight: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    """The module's own forward with ``weight`` (a tensor that carries the branch's gradient) in
    place of its parameter, run on a shallow copy of the module, so the module itself never
    changes (a concurrent call, or a state_dict() taken meanwhile, sees its own weight)."""
    view = copy.copy(module)
    view._parameters = {**module._parameters, "weight": weight}
    return type(module).forward(view, *args, **kwargs)


def _put_rows(out: Any, part: Any, rows: torch.Tensor, tokens: int) -> Any:
    """``out`` (a tensor or tuple of per-token tensors) with ``part``'s values at ``rows``."""
    if isinstance(out, torch.Tensor):
        if out.shape[0] != tokens:
            raise NotImplementedError(f"a router output of shape {list(out.shape)} is not one row per token")
        return out.index_copy(0, rows, part.to(out.dtype))
    return type(out)(_put_rows(o, p, rows, tokens) for o, p in zip(out, part, strict=True))


def describe(module: nn.Module) -> dict[str, Any]:
    """The shapes of an experts module's projections (for a saved set's target fingerprint)."""
    return {name: list(full_shape(p)) for name, p in expert_projections(module).items()}
