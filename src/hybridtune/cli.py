"""The `hybridtune` command line (the training verbs arrive with the training pipeline)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from . import METHODS, __version__

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in {"--version", "version"}:
        print(__version__)
        return 0
    print(f"hybridtune {__version__}; methods: {', '.join(METHODS)}")
    return 0
