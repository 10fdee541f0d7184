"""HybridModel: a transformers model with hybridtune branches, that still behaves like that model."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..methods import Branch, MethodConfig
from . import adapter_io
from .activation_offload import checkpointing_is_on, offloaded_activations
from .adapter_sets import SET_NAME, AdapterSets
from .attach import DEFAULT_SET, Attached, attach_config, branch_key, detach, fingerprint, iter_branches
from .chunked_loss import LossKernel, chunked_causal_lm_forward, supports_chunked_loss
from .config import HybridConfig
from .errors import MergeError
from .merging import Merging
from .partitioned import full_numel
from .routing import routed


class _ForwardWithBaseSignature:
    """``HybridModel.forward`` that reports the base model's signature to ``inspect``.

    transformers.Trainer keeps only the batch columns named in ``inspect.signature(model.forward)``;
    a bare ``*args, **kwargs`` would make it drop input_ids and labels.
    """

    def __get__(self, obj: HybridModel | None, objtype: type | None = None) -> Any:
        if obj is None:  # class-level: what transformers.utils.find_labels inspects
            return HybridModel._forward
        bound = functools.partial(HybridModel._forward, obj)
        signature = obj.__dict__.get("_base_signature")
        if signature is None:
            signature = obj.__dict__["_base_signature"] = inspect.signature(obj.base_model.forward)
        bound.__signature__ = signature
        return bound


class HybridModel(AdapterSets, Merging, nn.Module):
    """Wraps a base model whose chosen modules carry method branches.

    Calls, ``generate`` and every other attribute go straight to the base model, so code written
    for a transformers model keeps working. The base model's parameters are frozen.

    Entries are grouped in named *adapter sets* (``inject`` creates "default"). One set is active
    at a time; switching flips a flag per branch and copies no weights. Entry-level methods
    (``entries``, ``branches``, ``merge``, ``set_trainable``, ``save_adapters``...) act on the
    active set. ``model(..., adapter_sets=[...])`` serves a different set per row in one pass.
    """

    # transformers' Trainer refuses to train a quantized model that carries no adapters, and reads
    # this flag on the model it is given (not on the base) to know that this one does
    _hf_peft_config_loaded = True

    def __init__(
        self,
        base_model: nn.Module,
        config: HybridConfig,
        targets: dict[str, dict[str, Any]],
        set_name: str = DEFAULT_SET,
    ):
        super().__init__()
        self.training = base_model.training  # the wrapper reports the mode its base is in
        self.base_model = base_model
        self.sets: dict[str, HybridConfig] = {set_name: config}
        self._set_targets: dict[str, dict[str, dict[str, Any]]] = {set_name: targets}
        self.active_set: str | None = set_name
        self._current = set_name  # the set entry-level methods act on (the active one, or the last)
        self._unloaded = False
        self.offload_activations = False  # see activation_checkpointing_enable

    # ---- behaving like the base model -------------------------------------------------------
    def _forward(self, *args: Any, adapter_sets: Sequence[str | None] | None = None, task_ids: Any = None,
                 chunked_loss: bool | LossKernel = False, **kwargs: Any) -> Any:  # fmt: skip
        """``chunked_loss=True`` (or a kernel's name) with ``labels``: the loss without logits,
        where the model allows (core/chunked_loss.py); the output then has no logits."""
        offload = self.offload_activations and checkpointing_is_on(self.base_model)
        with self._call_context(adapter_sets, task_ids), offloaded_activations(offload and self.training):
            if chunked_loss and kwargs.get("labels") is not None and supports_chunked_loss(self.base_model):
                return chunked_causal_lm_forward(self.base_model, args, kwargs,
                                                 "auto" if chunked_loss is True else chunked_loss)  # fmt: skip
            return self.base_model(*args, **kwargs)

    _forward.__signature__ = inspect.Signature(
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )
    forward = _ForwardWithBaseSignature()

    def generate(
        self, *args: Any, adapter_sets: Sequence[str | None] | None = None, task_ids: Any = None, **kwargs: Any
    ) -> Any:
        """``generate`` of the base model; ``adapter_sets`` picks a set (or None = base) per row."""
        with self._call_context(adapter_sets, task_ids):
            return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "_modules"}:
                raise
            return getattr(self._modules["base_model"], name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        offload_to_cpu: bool = False, **options) -> None:  # fmt: skip
        """Non-reentrant checkpointing by default: it needs no grad-requiring inputs, which a frozen
        embedding layer would not give. Defined here (not left to the base) because transformers'
        Trainer calls it on the model it is given, and the base's own default may be reentrant.
        ``offload_to_cpu``: the layer inputs it keeps wait in host memory (core/activation_offload.py)."""
        self.offload_activations = offload_to_cpu
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            self.base_model.enable_input_require_grads()
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        """The name transformers used before ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    # ---- entries of the active set ----------------------------------------------------------
    @property
    def hybrid_config(self) -> HybridConfig:
        return self.sets[self._current]

    @property
    def entries(self) -> dict[str, Any]:
        return dict(self.hybrid_config.methods)

    @property
    def targets(self) -> dict[str, dict[str, Any]]:
        return self._set_targets[self._current]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.targets)

    def branches(self, entry: str | None = None) -> Iterator[tuple[str, str, nn.Module, Branch]]:
        """(entry, target name, target module, branch) of the active set, optionally of one entry."""
        if entry is not None:
            self._check_entry(entry)
        current = self._current
        return (
            (e, target, module, branch)
            for set_name, e, target, module, branch in self._all_branches()
            if set_name == current and (entry is None or e == entry)
        )

    def entry_parameters(self, entry: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of one entry, named ``{target}.{param}``."""
        for _, target, _, branch in self.branches(entry):
            for pname, param in branch.named_parameters():
                yield f"{target}.{pname}", param

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The active set's trainable parameters: what an optimizer should get."""
        return [p for _, _, _, b in self.branches() for p in b.parameters() if p.requires_grad]

    def cast_branches(self, dtype: torch.dtype) -> None:
        """Keep every branch's floating-point weights in ``dtype`` whatever the base's dtype (fp32
        branches on a bf16 or quantized base: the branches cast inputs and outputs themselves)."""
        for a in self._all_branches():
            a.branch.to(dtype)

    def set_trainable(self, entries: Iterable[str] | None = None) -> None:
        """Train only ``entries`` of the active set (all when None); the others stay active but
        frozen. Other sets are not touched."""
        wanted = set(self.hybrid_config.methods if entries is None else entries)
        for name in wanted:
            self._check_entry(name)
        for entry, _, _, branch in self.branches():
            branch.requires_grad_(entry in wanted)

    def add_entries(self, config: HybridConfig) -> None:
        """Attach more method entries to the active set (names must be new)."""
        self._check_live()
        current = self._current
        targets = attach_config(self.base_model, config, set(self.hybrid_config.methods), set_name=current)
        self._set_targets[current] = {**self.targets, **targets}
        self.sets[current] = HybridConfig(methods={**self.hybrid_config.methods, **config.methods})
        for a in self._all_branches():
            if a.set_name == current:
                a.branch.active = self.active_set == current

    def delete_entry(self, entry: str) -> None:
        """Remove an entry; a merged LoRA is unmerged first so the base weights come back."""
        for _, _, module, branch in list(self.branches(entry)):
            if branch.merged:
                branch.unmerge_from(module)
            detach(module, branch_key(self._current, entry))
        self._forget_entry(entry)

    def _forget_entry(self, entry: str) -> None:
        methods = {k: v for k, v in self.hybrid_config.methods.items() if k != entry}
        self.sets[self._current] = HybridConfig.model_construct(methods=methods)
        live = {name for _, name, _, _ in self.branches()}
        self._set_targets[self._current] = {k: v for k, v in self.targets.items() if k in live}

    def update_rank_schedules(self, step: int, epoch: float, entries: Iterable[str] | None = None) -> dict[str, int]:
        """Apply the growing-rank schedules (``rank_at``) of the active set's entries (default:
        all) at this point of training; returns {entry: rank} for the entries whose rank changed."""
        changed = {}
        for entry in self.hybrid_config.methods if entries is None else entries:
            rank = self.hybrid_config.methods[entry].rank_at(step, epoch)
            if rank is None:
                continue
            for _, _, _, branch in self.branches(entry):
                if branch.rank != rank:
                    branch.set_rank(rank)
                    changed[entry] = rank
        return changed

    def trainable_parameters(self) -> dict[str, Any]:
        """Counts per entry of the active set (trainable and total) and the base size."""
        per_entry = {e: {"trainable": 0, "total": 0} for e in self.hybrid_config.methods}
        for entry, _, _, branch in self.branches():
            for p in branch.parameters():
                per_entry[entry]["total"] += full_numel(p)
                per_entry[entry]["trainable"] += full_numel(p) if p.requires_grad else 0
        branch_ids = {id(p) for a in self._all_branches() for p in a.branch.parameters()}
        base = sum(full_numel(p) for p in self.base_model.parameters() if id(p) not in branch_ids)
        trainable = sum(v["trainable"] for v in per_entry.values())
        return {"entries": per_entry, "base": base, "trainable": trainable}

    def print_trainable_parameters(self) -> None:
        info = self.trainable_parameters()
        base = info["base"]
        for entry, counts in info["entries"].items():
            kind = self.hybrid_config.methods[entry].type
            print(
                f"{entry} ({kind}): {counts['trainable']:,} trainable of {counts['total']:,} "
                f"({100 * counts['total'] / base:.4f}% of base)"
            )
        print(f"trainable: {info['trainable']:,} || base: {base:,} || trainable%: {100 * info['trainable'] / base:.4f}")

    @contextlib.contextmanager
    def disabled(self, entries: Iterable[str] | None = None) -> Iterator[None]:
        """Temporarily run without some (default: all) entries; merged LoRA must be unmerged first."""
        wanted = set(self.hybrid_config.methods if entries is None else entries)
        chosen = [b for e, _, _, b in self.branches() if e in wanted]
        if any(b.merged for b in chosen):
            raise MergeError("cannot disable an entry whose LoRA is merged into the base weights; unmerge() first")
        before = [b.active for b in chosen]
        for b in chosen:
            b.active = False
        try:
            yield
        finally:
            for b, was in zip(chosen, before, strict=True):
                b.active = was

    # ---- checkpoints ------------------------------------------------------------------------
    def save_adapters(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the active set's config JSON + safetensors (atomic). See ``from_pretrained``."""
        return adapter_io.save_adapters(self, directory, state)

    save_pretrained = save_adapters

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, **options: Any) -> HybridModel:
        """Saved adapters on ``model`` (a base, or a HybridModel): ``hybridtune.load``, by the
        name transformers and peft users reach for. ``options``: trainable, allow_base_mismatch,
        set_name."""
        return load(model, directory, **options)

    # ---- helpers ----------------------------------------------------------------------------
    def _all_branches(self) -> Iterator[Attached]:
        return iter_branches(self.base_model)

    def _call_context(
        self, adapter_sets: Sequence[str | None] | None, task_ids: Any
    ) -> contextlib.AbstractContextManager:
        """Checks shared by forward and generate, and the per-row routing (none in the plain case,
        which therefore costs nothing on the hot path)."""
        self._check_live()
        if adapter_sets is None and task_ids is None:
            return contextlib.nullcontext()
        if adapter_sets is not None:
            self._check_routable()
        return routed(adapter_sets, list(self.sets), task_ids, self._device())

    def _device(self) -> torch.device | None:
        for p in self.base_model.parameters():
            return p.device
        return None

    def _check_routable(self) -> None:
        for set_name, config in self.sets.items():
            for entry, cfg in config.methods.items():
                if not cfg.supports_routing:
                    raise ValueError(
                        f"adapter_sets routing is not possible with entry '{entry}' ({cfg.type}) in set '{set_name}'"
                    )
        if any(a.branch.merged for a in self._all_branches()):
            raise MergeError("adapter_sets routing needs unmerged LoRA: a merged delta would apply to every row")

    def _check_entry(self, entry: str) -> None:
        if entry not in self.hybrid_config.methods:
            raise KeyError(f"no method entry '{entry}'; entries: {', '.join(self.hybrid_config.methods)}")

    def _check_live(self) -> None:
        if self._unloaded:
            raise MergeError("this HybridModel was merged and unloaded; use the model merge_and_unload() returned")


def inject(model: nn.Module, config: HybridConfig | MethodConfig | dict, set_name: str = DEFAULT_SET) -> HybridModel:
    """Add the config's method entries to ``model`` and freeze everything else.

    ``config`` is a HybridConfig (named entries), its dict, or one bare method config (a LoRA
    config, say), which becomes an entry named after its type (as peft's get_peft_model takes one
    LoRA config). Given a HybridModel, the entries are added to its active set. Targets
    of every entry are chosen on the untouched model, so the order of entries never changes what
    an entry matches.
    """
    if isinstance(config, MethodConfig):
        config = HybridConfig(methods={config.type: config})
    if not isinstance(config, HybridConfig):
        config = HybridConfig.model_validate(config)
    if isinstance(model, HybridModel):
        model.add_entries(config)
        return model
    if any(True for _ in iter_branches(model)):
        raise ValueError("this model already carries hybridtune branches; pass its HybridModel instead")
    if not SET_NAME.fullmatch(set_name):
        raise ValueError(f"adapter set name {set_name!r} must be an identifier (letters, digits, _)")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = attach_config(model, config, set(), set_name=set_name)
    return HybridModel(model, config, targets, set_name=set_name)


def load(
    model: nn.Module,
    directory: str | Path,
    *,
    trainable: bool = False,
    allow_base_mismatch: bool = False,
    set_name: str | None = None,
) -> HybridModel:
    """Rebuild the saved entries on ``model`` and load their weights.

    ``model`` is a fresh base model, or a HybridModel: then the entries join its active set, or
    become the new adapter set ``set_name``. Every mismatch is an error naming what differs;
    ``trainable=False`` freezes the loaded entries for inference.
    """
    meta = adapter_io.read_meta(directory)
    config = adapter_io.saved_config(directory, meta)
    base = model.base_model if isinstance(model, HybridModel) else model
    adapter_io.check_base(base, meta, allow_base_mismatch, config)
    state = adapter_io.read_weights(directory, meta)
    if isinstance(model, HybridModel) and set_name is not None:
        model.add_set(set_name, config)
        hybrid, rollback = model, lambda: model.delete_set(set_name)
    else:
        hybrid = inject(model, config, **({"set_name": set_name} if set_name else {}))

        def rollback() -> None:
            for entry in config.methods:  # leave the model as it was given
                hybrid.delete_entry(entry)

    with hybrid.acting_on(set_name or hybrid._current):
        try:
            adapter_io.load_state(hybrid, state, entries=list(config.methods), source=str(directory))
        except BaseException:
            rollback()
            raise
        for entry in config.methods:
            for _, _, _, branch in hybrid.branches(entry):
                branch.requires_grad_(trainable)
    return hybrid


def add_saved_set(model: nn.Module, name: str, directory: str | Path) -> HybridModel:
    """Load the saved adapters in ``directory`` as the inactive set ``name`` of ``model`` (a plain
    base, which becomes a HybridModel, or a HybridModel); returns the HybridModel. For servers
    that route sets per row and keep the plain base active for rows without one."""
    if isinstance(model, HybridModel):
        model.load_set(name, directory)
        return model
    hybrid = load(model, directory, set_name=name)
    hybrid.set_active(None)
    return hybrid
