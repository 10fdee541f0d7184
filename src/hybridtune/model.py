"""HybridModel: a transformers model with hybridtune branches, that still behaves like that model."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attach import DEFAULT_SET, attach_config, branch_key, detach, fingerprint, iter_branches, sync_hook
from .config import HybridConfig
from .errors import MergeError
from .methods import Branch
from .partitioned import full_numel
from .quantization import is_quantized
from .routing import routed
from .targeting import BRANCH_ATTR

_SET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


class HybridModel(nn.Module):
    """Wraps a base model whose chosen modules carry method branches.

    Calls, ``generate`` and every other attribute go straight to the base model, so code written
    for a transformers model keeps working. The base model's parameters are frozen.

    Entries are grouped in named *adapter sets* (``inject`` creates "default"). One set is active
    at a time; switching flips a flag per branch and copies no weights. Entry-level methods
    (``entries``, ``branches``, ``merge``, ``set_trainable``, ``save_adapters``...) act on the
    active set. ``model(..., adapter_sets=[...])`` serves a different set per row in one pass.
    """

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

    # ---- behaving like the base model -------------------------------------------------------
    def _forward(self, *args: Any, adapter_sets: Sequence[str | None] | None = None, task_ids: Any = None,
                 **kwargs: Any) -> Any:  # fmt: skip
        with self._call_context(adapter_sets, task_ids):
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

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options) -> None:
        """Non-reentrant checkpointing by default: it needs no grad-requiring inputs, which a frozen
        embedding layer would not give. Defined here (not left to the base) because transformers'
        Trainer calls it on the model it is given, and the base's own default may be reentrant."""
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

    # ---- adapter sets -----------------------------------------------------------------------
    def add_set(self, name: str, config: HybridConfig | dict, activate: bool = False) -> None:
        """Attach a new, independent set of entries (its own weights) to the same base."""
        self._check_live()
        if not isinstance(config, HybridConfig):
            config = HybridConfig.model_validate(config)
        if not _SET_NAME.fullmatch(name):
            raise ValueError(f"adapter set name {name!r} must be an identifier (letters, digits, _)")
        if name in self.sets:
            raise ValueError(f"adapter set '{name}' already exists; sets: {', '.join(self.sets)}")
        self._set_targets[name] = attach_config(self.base_model, config, set(), set_name=name)
        self.sets[name] = config
        for set_name, _, _, _, branch in self._all_branches():
            if set_name == name:
                branch.active = False
        if activate:
            self.set_active(name)

    def list_sets(self) -> list[str]:
        return list(self.sets)

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the active set (None: the plain base model). Trainability is left alone:
        switching never makes another set's parameters trainable or frozen."""
        if name is not None:
            self._check_set(name)
        merged = [s for s, _, _, _, b in self._all_branches() if b.merged and s != name]
        if merged:
            raise MergeError(f"set '{merged[0]}' has LoRA merged into the base weights; unmerge() it before switching")
        for set_name, _, _, _, branch in self._all_branches():
            branch.active = set_name == name
        self.active_set = name
        if name is not None:
            self._current = name

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Temporarily switch to another set (or None for the base model)."""
        previous, current = self.active_set, self._current
        self.set_active(name)
        try:
            yield
        finally:
            self.set_active(previous)
            self._current = current

    def delete_set(self, name: str) -> None:
        self._check_set(name)
        if len(self.sets) == 1:
            raise ValueError(f"'{name}' is the only adapter set; delete entries or drop the HybridModel instead")
        for set_name, entry, _, module, branch in list(self._all_branches()):
            if set_name == name:
                if branch.merged:
                    branch.unmerge_from(module)
                detach(module, branch_key(set_name, entry))
        del self.sets[name], self._set_targets[name]
        if self._current == name:
            self._current = next(iter(self.sets))
        if self.active_set == name:
            self.set_active(None)

    def save_set(self, name: str, directory: str | Path) -> Path:
        with self._acting_on(name):
            return self.save_adapters(directory)

    def load_set(self, name: str, directory: str | Path, trainable: bool = False) -> None:
        """Load a saved adapter directory as a new set ``name`` (not activated)."""
        from .checkpoint import load

        load(self, directory, trainable=trainable, set_name=name)

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
        for *_, branch in self._all_branches():
            branch.to(dtype)

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
        for set_name, _, _, _, branch in self._all_branches():
            if set_name == current:
                branch.active = self.active_set == current

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
        """Apply growing-rank schedules of the active set's LoRA entries (default: all) at this
        point of training; returns {entry: rank} for the entries whose rank changed."""
        from .methods.lora import LoRAConfig, RankSchedule

        changed = {}
        for entry in self.hybrid_config.methods if entries is None else entries:
            cfg = self.hybrid_config.methods[entry]
            if not (isinstance(cfg, LoRAConfig) and isinstance(cfg.r, RankSchedule)):
                continue
            rank = cfg.r.rank_at(step, epoch)
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
        branch_ids = {id(p) for *_, b in self._all_branches() for p in b.parameters()}
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

    # ---- merging ----------------------------------------------------------------------------
    def merge(self, entries: Iterable[str] | None = None, exact_unmerge: bool = True) -> None:
        """Fold mergeable entries (LoRA) of the active set into the base weights; other entries
        keep running.

        With ``exact_unmerge`` a CPU copy of each merged weight is kept so ``unmerge`` restores
        it bit for bit; without it, unmerge subtracts the delta (equal within float rounding).
        """
        self._check_live()
        if self.active_set != self._current:
            raise MergeError("no adapter set is active; set_active() one before merging")
        wanted = set(self.hybrid_config.methods if entries is None else entries)
        for name in wanted:
            self._check_entry(name)
        chosen = [(e, n, m, b) for e, n, m, b in self.branches() if e in wanted and b.mergeable]
        for entry, name, module, _ in chosen:
            _check_merge_target(entry, name, module)
        for _, _, module, branch in chosen:
            branch.merge_into(module, keep_original=exact_unmerge)
            sync_hook(module)

    def unmerge(self) -> None:
        """Undo merge(), in reverse order so stacked merges on one weight unwind exactly."""
        for *_, module, branch in reversed(list(self._all_branches())):
            if branch.merged:
                branch.unmerge_from(module)
                sync_hook(module)

    def bake(self, entries: Iterable[str] | None = None) -> None:
        """Merge mergeable entries of the active set (default: all of them) into the base weights
        for good and remove them; the other entries stay live. Deploys LoRA at zero cost next to
        adapters."""
        self._check_live()
        configs = self.hybrid_config.methods
        wanted = [e for e in (configs if entries is None else entries) if configs[e].mergeable]
        for entry in wanted:
            for _, name, module, _ in self.branches(entry):
                _check_merge_target(entry, name, module)
        for entry in wanted:
            for _, _, module, branch in list(self.branches(entry)):
                branch.merge_into(module, keep_original=False)
                branch.merged = False  # the delta now lives in the weight, not in the branch
                detach(module, branch_key(self._current, entry))
            self._forget_entry(entry)

    def merge_and_unload(self) -> nn.Module:
        """Merge every entry and return the plain base model, with no hybridtune code left in it.

        Refuses when an entry cannot be merged (an Adapter is extra computation, not a weight
        delta): dropping it silently would change the model's outputs.
        """
        self._check_live()
        if len(self.sets) > 1:
            raise MergeError(f"the model has {len(self.sets)} adapter sets; delete_set() all but one first")
        blocked = [e for e, cfg in self.hybrid_config.methods.items() if not cfg.mergeable]
        if blocked:
            kinds = ", ".join(f"'{e}' ({self.hybrid_config.methods[e].type})" for e in blocked)
            raise MergeError(
                f"cannot merge_and_unload: entries {kinds} are not mergeable into base weights. Use merge() "
                "to fold the LoRA entries and keep these live, or delete_entry() them first."
            )
        self.unmerge()  # start from the original weights, then fold everything once
        self.bake()
        self._unloaded = True
        base = self.base_model
        for p in base.parameters():
            p.requires_grad_(True)
        return base

    def base_state_dict(self) -> dict[str, Any]:
        """The base model's state dict without any branch tensors (for saving a merged base)."""
        return {
            k: v
            for k, v in self.base_model.state_dict().items()
            if f".{BRANCH_ATTR}." not in k and not k.startswith(f"{BRANCH_ATTR}.")
        }

    # ---- checkpoints ------------------------------------------------------------------------
    def save_adapters(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the active set's config JSON + safetensors (atomic). See ``hybridtune.load``."""
        from .checkpoint import save_adapters

        return save_adapters(self, directory, state)

    save_pretrained = save_adapters

    # ---- helpers ----------------------------------------------------------------------------
    def _all_branches(self) -> Iterator[tuple[str, str, str, nn.Module, Branch]]:
        return iter_branches(self.base_model)

    @contextlib.contextmanager
    def _acting_on(self, name: str) -> Iterator[None]:
        self._check_set(name)
        previous = self._current
        self._current = name
        try:
            yield
        finally:
            self._current = previous

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
        if any(b.merged for *_, b in self._all_branches()):
            raise MergeError("adapter_sets routing needs unmerged LoRA: a merged delta would apply to every row")

    def _check_set(self, name: str) -> None:
        if name not in self.sets:
            raise KeyError(f"no adapter set '{name}'; sets: {', '.join(self.sets)}")

    def _check_entry(self, entry: str) -> None:
        if entry not in self.hybrid_config.methods:
            raise KeyError(f"no method entry '{entry}'; entries: {', '.join(self.hybrid_config.methods)}")

    def _check_live(self) -> None:
        if self._unloaded:
            raise MergeError("this HybridModel was merged and unloaded; use the model merge_and_unload() returned")


def _check_merge_target(entry: str, name: str, module: nn.Module) -> None:
    if is_quantized(module):
        raise MergeError(
            f"cannot merge '{entry}' into '{name}': its weight is quantized ({type(module.weight).__name__}), and "
            "folding a delta into it would re-quantize and lose the delta. Load the base unquantized and merge "
            "there (`hybridtune merge` and `hybridtune export` do), or keep the branch unmerged"
        )


def inject(model: nn.Module, config: HybridConfig | dict, set_name: str = DEFAULT_SET) -> HybridModel:
    """Add the config's method entries to ``model`` and freeze everything else.

    Given a HybridModel, the entries are added to its active set. Targets of every entry are
    chosen on the untouched model, so the order of entries never changes what an entry matches.
    """
    if not isinstance(config, HybridConfig):
        config = HybridConfig.model_validate(config)
    if isinstance(model, HybridModel):
        model.add_entries(config)
        return model
    if any(True for _ in iter_branches(model)):
        raise ValueError("this model already carries hybridtune branches; pass its HybridModel instead")
    if not _SET_NAME.fullmatch(set_name):
        raise ValueError(f"adapter set name {set_name!r} must be an identifier (letters, digits, _)")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = attach_config(model, config, set(), set_name=set_name)
    return HybridModel(model, config, targets, set_name=set_name)
