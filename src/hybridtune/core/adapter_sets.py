"""Adapter sets: several independent groups of entries on one base, one active at a time.

A mixin of HybridModel (kept apart to keep each file small); it relies on the model's
``sets``, ``_set_targets``, ``active_set``, ``_current`` and ``_all_branches``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from .attach import attach_config, branch_key, detach
from .config import HybridConfig
from .errors import MergeError

SET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class AdapterSets:
    def add_set(self, name: str, config: HybridConfig | dict, activate: bool = False) -> None:
        """Attach a new, independent set of entries (its own weights) to the same base."""
        self._check_live()
        if not isinstance(config, HybridConfig):
            config = HybridConfig.model_validate(config)
        if not SET_NAME.fullmatch(name):
            raise ValueError(f"adapter set name {name!r} must be an identifier (letters, digits, _)")
        if name in self.sets:
            raise ValueError(f"adapter set '{name}' already exists; sets: {', '.join(self.sets)}")
        self._set_targets[name] = attach_config(self.base_model, config, set(), set_name=name)
        self.sets[name] = config
        for a in self._all_branches():
            if a.set_name == name:
                a.branch.active = False
        if activate:
            self.set_active(name)

    def list_sets(self) -> list[str]:
        return list(self.sets)

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the active set (None: the plain base model). Trainability is left alone:
        switching never makes another set's parameters trainable or frozen."""
        if name is not None:
            self.check_set(name)
        merged = [a.set_name for a in self._all_branches() if a.branch.merged and a.set_name != name]
        if merged:
            raise MergeError(f"set '{merged[0]}' has LoRA merged into the base weights; unmerge() it before switching")
        for a in self._all_branches():
            a.branch.active = a.set_name == name
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
        self.check_set(name)
        if len(self.sets) == 1:
            raise ValueError(f"'{name}' is the only adapter set; delete entries or drop the HybridModel instead")
        for a in list(self._all_branches()):
            if a.set_name == name:
                if a.branch.merged:
                    a.branch.unmerge_from(a.module)
                detach(a.module, branch_key(a.set_name, a.entry))
        del self.sets[name], self._set_targets[name]
        if self._current == name:
            self._current = next(iter(self.sets))
        if self.active_set == name:
            self.set_active(None)

    def save_set(self, name: str, directory: str | Path) -> Path:
        with self.acting_on(name):
            return self.save_adapters(directory)

    def load_set(self, name: str, directory: str | Path, trainable: bool = False) -> None:
        """Load a saved adapter directory as a new set ``name`` (not activated)."""
        self.from_pretrained(self, directory, trainable=trainable, set_name=name)

    @contextlib.contextmanager
    def acting_on(self, name: str) -> Iterator[None]:
        """Inside the block, entry-level methods (``entries``, ``branches``, ``save_adapters``,
        ``merge``...) act on set ``name`` instead of the active one; nothing is switched."""
        self.check_set(name)
        previous = self._current
        self._current = name
        try:
            yield
        finally:
            self._current = previous

    def check_set(self, name: str) -> None:
        """KeyError naming the sets when there is no set ``name``."""
        if name not in self.sets:
            raise KeyError(f"no adapter set '{name}'; sets: {', '.join(self.sets)}")
