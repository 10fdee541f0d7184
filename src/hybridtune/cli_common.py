"""What the command-line modules share: option types and the one-line error exit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

AdaptersOpt = Annotated[Path, typer.Option("--adapters", help="A saved adapter directory (e.g. RUN/adapters).")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Base model; default: the one recorded with the adapters.")
]


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def run_config(config: Path, overrides: list[str] | None):
    from .training.run_config import ConfigError, load_run_config

    try:
        return load_run_config(config, overrides or [])
    except ConfigError as exc:
        fail(str(exc))


def weighted(spec: str) -> list[tuple[Path, float]]:
    """``DIR:0.5,DIR:0.5`` (a bare DIR weighs 1) -> [(path, weight), ...]."""
    items = []
    for part in spec.split(","):
        path, sep, weight = part.rpartition(":")
        if not sep:
            path, weight = part, "1"
        try:
            items.append((Path(path), float(weight)))
        except ValueError:
            fail(f"'{part}': expected DIR:WEIGHT with a number as weight")
    return items
