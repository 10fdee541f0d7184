"""Adapter sets addressable by name inside one directory, and nothing outside it.

A name is one path component of plain characters; it resolves to ``DIR/name`` only if that
directory, its config and its weights all resolve (symlinks followed) inside ``DIR``. Only the
JSON config and the safetensors weights of a set are ever read.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.adapter_io import CONFIG_NAME, WEIGHTS_NAME

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UnknownAdapter(LookupError):
    """The name is not an adapter set of the directory (or not an acceptable name at all)."""


class AdaptersDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"--adapters-dir '{root}' is not a directory")

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve(strict=True).relative_to(self.root)
        except (OSError, ValueError):
            return False
        return True

    def resolve(self, name: str) -> Path:
        """The directory of set ``name``; UnknownAdapter for anything else (the message never
        echoes file-system details beyond the name asked for)."""
        if not NAME.fullmatch(name) or name in {".", ".."}:
            raise UnknownAdapter(f"'{name}' is not a valid adapter set name (letters, digits, '.', '_', '-')")
        directory = self.root / name
        files = (directory, directory / CONFIG_NAME, directory / WEIGHTS_NAME)
        if not all(self._inside(p) for p in files) or not directory.resolve().is_dir():
            raise UnknownAdapter(f"no adapter set '{name}' in the adapters directory")
        return directory.resolve()

    def names(self) -> list[str]:
        """Every set directly inside the directory, sorted."""
        found = []
        for child in sorted(self.root.iterdir()):
            try:
                self.resolve(child.name)
            except UnknownAdapter:
                continue
            found.append(child.name)
        return found
