"""Folding mergeable entries (LoRA, DoRA, IA3) into the base weights, and back out.

A mixin of HybridModel (kept apart to keep each file small).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .attach import branch_key, detach, sync_hook
from .errors import MergeError
from .quantization import is_quantized
from .targeting import BRANCH_ATTR


class Merging:
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
        configs = self.hybrid_config.methods
        chosen = [(e, n, m, b) for e, n, m, b in self.branches() if e in wanted and configs[e].mergeable]
        for entry, name, module, _ in chosen:
            _check_merge_target(entry, name, module)
        for _, _, module, branch in chosen:
            branch.merge_into(module, keep_original=exact_unmerge)
            sync_hook(module)

    def unmerge(self) -> None:
        """Undo merge(), in reverse order so stacked merges on one weight unwind exactly."""
        for a in reversed(list(self._all_branches())):
            if a.branch.merged:
                a.branch.unmerge_from(a.module)
                sync_hook(a.module)

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


def _check_merge_target(entry: str, name: str, module: nn.Module) -> None:
    if is_quantized(module):
        raise MergeError(
            f"cannot merge '{entry}' into '{name}': its weight is quantized ({type(module.weight).__name__}), and "
            "folding a delta into it would re-quantize and lose the delta. Load the base unquantized and merge "
            "there (`hybridtune merge` and `hybridtune export` do), or keep the branch unmerged"
        )
