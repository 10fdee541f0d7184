"""Adapter sets addressable by name inside one directory, and nothing outside it.

A name is one path component of plain characters; it resolves to ``DIR/name`` only if that
directory, its config and its weights all resolve (symlinks followed) inside ``DIR``. Only the
JSON config and the safetensors weights of a set are ever read (and its chat template, below).

A set that failed to load is remembered as broken, with the reason, until one of its files
changes: it is not listed and not loaded again, and requests for it get the reason at once.
Besides those two files, a set's saved chat template (``chat_template.jinja``) is read, under the
same rule.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from ..training.data import TEMPLATE_FILE

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PATH = re.compile(r"(?<![\w.])/[^\s'\"]+")  # an absolute path in an error message


class UnknownAdapter(LookupError):
    """The name is not an adapter set of the directory (or not an acceptable name at all)."""


class BrokenAdapter(RuntimeError):
    """The set exists but cannot be served (its files are damaged, for another base, ...)."""


class AdaptersDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"--adapters-dir '{root}' is not a directory")
        self._broken: dict[str, tuple[tuple, str]] = {}  # name -> (files' signature, reason)
        self._templates: dict[str, tuple[tuple, str | None]] = {}  # name -> (signature, saved chat template)

    def mark_broken(self, name: str, reason: str) -> str:
        """Remember that set ``name`` failed to load; returns the reason as clients see it (the
        server's paths replaced by the set's name)."""
        directory = self.root / name
        public = reason.replace(str(directory.resolve()), name).replace(str(directory), name)
        public = _PATH.sub(lambda m: Path(m.group(0)).name, public.replace(str(self.root), "."))
        self._broken[name] = (_signature(directory), public)
        return public

    def _check_broken(self, name: str) -> None:
        known = self._broken.get(name)
        if known is None:
            return
        if known[0] == _signature(self.root / name):
            raise BrokenAdapter(f"adapter set '{name}' cannot be served: {known[1]}")
        self._broken.pop(name, None)  # its files changed: try again

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
        self._check_broken(name)
        return directory.resolve()

    def template(self, name: str) -> str | None:
        """The chat template set ``name`` was trained with (its saved data.template; "" for plain
        text), or None: the tokenizer's own. Read once per change of the set's files, and only
        from inside the directory."""
        directory = self.resolve(name)
        signature = _signature(directory)
        known = self._templates.get(name)
        if known is None or known[0] != signature:
            path = directory / TEMPLATE_FILE
            text = path.read_text(encoding="utf-8") if path.is_file() and self._inside(path) else None
            known = self._templates[name] = (signature, text)
        return known[1]

    def names(self) -> list[str]:
        """Every set directly inside the directory, sorted."""
        found = []
        for child in sorted(self.root.iterdir()):
            try:
                self.resolve(child.name)
            except (UnknownAdapter, BrokenAdapter):
                continue
            found.append(child.name)
        return found


def _signature(directory: Path) -> tuple:
    """What changes when a set's files are replaced: each file's size and modification time."""
    out = []
    for path in sorted(directory.glob("*")) if directory.is_dir() else []:
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(out)
