"""HybridModel: a transformers model with hybridtune branches, that still behaves like that model."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .config import HybridConfig
from .errors import MergeError
from .inject import attach_config, detach, fingerprint, iter_branches
from .methods import Branch
from .targeting import BRANCH_ATTR


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
    """

    def __init__(self, base_model: nn.Module, config: HybridConfig, targets: dict[str, dict[str, Any]]):
        super().__init__()
        self.base_model = base_model
        self.hybrid_config = config
        self.targets = targets
        self._unloaded = False

    # ---- behaving like the base model -------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_live()
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

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_live()
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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Non-reentrant checkpointing by default: it needs no grad-requiring inputs, which a frozen
        embedding layer would not give."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            self.base_model.enable_input_require_grads()
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ---- entries and parameters -------------------------------------------------------------
    @property
    def entries(self) -> dict[str, Any]:
        return dict(self.hybrid_config.methods)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.targets)

    def branches(self, entry: str | None = None) -> Iterator[tuple[str, str, nn.Module, Branch]]:
        """(entry, target name, target module, branch) for every branch, optionally of one entry."""
        if entry is not None:
            self._check_entry(entry)
        return iter_branches(self.base_model, entry)

    def entry_parameters(self, entry: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of one entry, named ``{target}.{param}``."""
        for _, target, _, branch in self.branches(entry):
            for pname, param in branch.named_parameters():
                yield f"{target}.{pname}", param

    def set_trainable(self, entries: Iterable[str] | None = None) -> None:
        """Train only ``entries`` (all when None); the others stay active but frozen."""
        wanted = set(self.hybrid_config.methods if entries is None else entries)
        for name in wanted:
            self._check_entry(name)
        for entry, _, _, branch in self.branches():
            branch.requires_grad_(entry in wanted)

    def add_entries(self, config: HybridConfig) -> None:
        """Attach more method entries to this model (names must be new)."""
        self._check_live()
        targets = attach_config(self.base_model, config, set(self.hybrid_config.methods))
        self.targets = {**self.targets, **targets}
        self.hybrid_config = HybridConfig(methods={**self.hybrid_config.methods, **config.methods})

    def delete_entry(self, entry: str) -> None:
        """Remove an entry; a merged LoRA is unmerged first so the base weights come back."""
        for _, _, module, branch in list(self.branches(entry)):
            if branch.merged:
                branch.unmerge_from(module)
            detach(module, entry)
        self._forget_entry(entry)

    def _forget_entry(self, entry: str) -> None:
        methods = {k: v for k, v in self.hybrid_config.methods.items() if k != entry}
        self.hybrid_config = HybridConfig.model_construct(methods=methods)
        live = {name for _, name, _, _ in self.branches()}
        self.targets = {k: v for k, v in self.targets.items() if k in live}

    def trainable_parameters(self) -> dict[str, Any]:
        """Counts per entry (trainable and total) and the base size, for reports and tests."""
        per_entry = {e: {"trainable": 0, "total": 0} for e in self.hybrid_config.methods}
        branch_ids = set()
        for entry, _, _, branch in self.branches():
            for p in branch.parameters():
                branch_ids.add(id(p))
                per_entry[entry]["total"] += p.numel()
                per_entry[entry]["trainable"] += p.numel() if p.requires_grad else 0
        base = sum(p.numel() for p in self.base_model.parameters() if id(p) not in branch_ids)
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
        """Fold mergeable entries (LoRA) into the base weights; other entries keep running.

        With ``exact_unmerge`` a CPU copy of each merged weight is kept so ``unmerge`` restores
        it bit for bit; without it, unmerge subtracts the delta (equal within float rounding).
        """
        self._check_live()
        wanted = set(self.hybrid_config.methods if entries is None else entries)
        for name in wanted:
            self._check_entry(name)
        for entry, _, module, branch in self.branches():
            if entry in wanted and branch.mergeable:
                branch.merge_into(module, keep_original=exact_unmerge)

    def unmerge(self) -> None:
        """Undo merge(), in reverse order so stacked merges on one weight unwind exactly."""
        for _, _, module, branch in reversed(list(self.branches())):
            if branch.merged:
                branch.unmerge_from(module)

    def bake(self, entries: Iterable[str] | None = None) -> None:
        """Merge mergeable entries (default: all of them) into the base weights for good and remove
        them; the other entries stay live. Used to deploy LoRA at zero cost next to adapters."""
        self._check_live()
        configs = self.hybrid_config.methods
        wanted = [e for e in (configs if entries is None else entries) if configs[e].mergeable]
        for entry in wanted:
            for _, _, module, branch in list(self.branches(entry)):
                branch.merge_into(module, keep_original=False)
                branch.merged = False  # the delta now lives in the weight, not in the branch
                detach(module, entry)
            self._forget_entry(entry)

    def merge_and_unload(self) -> nn.Module:
        """Merge every entry and return the plain base model, with no hybridtune code left in it.

        Refuses when an entry cannot be merged (an Adapter is extra computation, not a weight
        delta): dropping it silently would change the model's outputs.
        """
        self._check_live()
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
        return {k: v for k, v in self.base_model.state_dict().items() if f".{BRANCH_ATTR}." not in k}

    # ---- checkpoints ------------------------------------------------------------------------
    def save_adapters(self, directory: str | Path) -> Path:
        """Write config JSON + safetensors of every entry's parameters (atomic). See ``hybridtune.load``."""
        from .checkpoint import save_adapters

        return save_adapters(self, directory)

    save_pretrained = save_adapters

    # ---- helpers ----------------------------------------------------------------------------
    def _check_entry(self, entry: str) -> None:
        if entry not in self.hybrid_config.methods:
            raise KeyError(f"no method entry '{entry}'; entries: {', '.join(self.hybrid_config.methods)}")

    def _check_live(self) -> None:
        if self._unloaded:
            raise MergeError("this HybridModel was merged and unloaded; use the model merge_and_unload() returned")


def inject(model: nn.Module, config: HybridConfig | dict) -> HybridModel:
    """Add the config's method entries to ``model`` and freeze everything else.

    Given a HybridModel, the entries are added to it. Targets of every entry are chosen on the
    untouched model, so the order of entries never changes what an entry matches.
    """
    if not isinstance(config, HybridConfig):
        config = HybridConfig.model_validate(config)
    if isinstance(model, HybridModel):
        model.add_entries(config)
        return model
    if any(True for _ in iter_branches(model)):
        raise ValueError("this model already carries hybridtune branches; pass its HybridModel instead")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = attach_config(model, config, set())
    return HybridModel(model, config, targets)
