"""The commands that take trained adapters elsewhere: merge, merge-sets, export, serve, ui.
Registered on the app in cli.py (``COMMANDS``); each imports its machinery when it runs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import AdaptersOpt, ModelOpt, fail, weighted


def merge_sets_command(
    adapters: Annotated[list[str], typer.Argument(help="DIR:WEIGHT for each LoRA adapter dir to merge.")],
    out: Annotated[Path, typer.Option("--out", help="Output adapter directory.")],
    method: Annotated[str, typer.Option(help="concat (exact, ranks add up) or svd (compress to --rank).")] = "concat",
    rank: Annotated[int | None, typer.Option(help="Rank per module for --method svd.")] = None,
    model: ModelOpt = None,
) -> None:
    """Merge several LoRA adapter sets into one (linear weighted), for deployment."""
    from .interop.set_merging import merge_sets
    from .training.trained_sets import load_sets

    if method not in {"concat", "svd"}:
        fail(f"--method must be concat or svd, not '{method}'")
    hybrid, _, weights = load_sets([spec for arg in adapters for spec in weighted(arg)], model)
    try:
        merge_sets(hybrid, weights, into="merged", method=method, rank=rank)
    except ValueError as exc:
        fail(str(exc))
    hybrid.save_set("merged", out)
    typer.echo(f"merged adapters: {out}")


def merge(
    adapters: AdaptersOpt,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    model: ModelOpt = None,
    keep_adapters: Annotated[
        bool, typer.Option(help="Merge LoRA into the base and save the other entries as a hybrid checkpoint.")
    ] = False,
) -> None:
    """Fold LoRA into the base weights and save a plain transformers model (or base + remaining adapters)."""
    from .core.errors import MergeError
    from .training.trained_sets import load_trained

    hybrid, tokenizer = load_trained(adapters, model)
    if keep_adapters:
        hybrid.bake()
        base = hybrid.base_model
        base.save_pretrained(out / "base", state_dict=hybrid.base_state_dict())
        tokenizer.save_pretrained(out / "base")
        base.config._name_or_path = str(out / "base")  # the remaining adapters belong to the merged base
        hybrid.save_adapters(out / "adapters")
        typer.echo(f"merged base: {out / 'base'}\nremaining adapters: {out / 'adapters'}")
        return
    try:
        plain = hybrid.merge_and_unload()
    except MergeError as exc:
        fail(f"{exc} (or use --keep-adapters)")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    typer.echo(f"merged model: {out}")


class ExportFormat(str, Enum):
    peft = "peft"
    merged = "merged"
    onnx = "onnx"


def export(
    adapters: AdaptersOpt,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="peft: LoRA as a peft adapter; merged: plain model; onnx: merged model (adapters in the graph) "
            "as ONNX, checked with onnxruntime.",
        ),
    ],
    model: ModelOpt = None,
    only: Annotated[
        str | None,
        typer.Option(help="peft: export only these entries (comma-separated), leaving the others out on purpose."),
    ] = None,
) -> None:
    """Export saved adapters for other tools."""
    if format is ExportFormat.merged:
        merge(adapters=adapters, out=out, model=model, keep_adapters=False)
        return
    from .training.trained_sets import load_trained

    hybrid, tokenizer = load_trained(adapters, model)
    if format is ExportFormat.onnx:
        from .interop.onnx_export import export_onnx

        try:
            check = export_onnx(hybrid, out, tokenizer)
        except (ImportError, RuntimeError) as exc:
            fail(
                f"ONNX export failed: {exc}"
                + (" (pip install onnx onnxscript onnxruntime)" if isinstance(exc, ImportError) else "")
            )
        typer.echo(
            f"onnx model: {out / 'model.onnx'}; onnxruntime vs PyTorch logits: max |diff| "
            f"{check['max_abs_logit_difference']:.2e} (tolerance {check['tolerance']:.0e}); "
            f"entries in the graph: {', '.join(check['entries_in_graph']) or 'none (all merged)'}"
        )
        return
    from .interop.peft_format import export_peft

    chosen = None if only is None else [e.strip() for e in only.split(",") if e.strip()]
    try:
        export_peft(hybrid, out, entries=chosen)
    except ValueError as exc:
        fail(str(exc))
    left_out = [e for e in hybrid.entries if chosen is not None and e not in chosen]
    note = f" (left out as asked, so it computes less than the hybrid: {', '.join(left_out)})" if left_out else ""
    typer.echo(f"peft adapter: {out}{note}")


def serve(
    adapters_dir: Annotated[Path, typer.Option(help="Directory whose sub-directories are saved adapter sets.")],
    base: Annotated[
        str | None, typer.Option(help="Base model: a directory or a cached hub name (default: the embedded model).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="HYBRIDTUNE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    max_loaded: Annotated[int, typer.Option(help="Adapter sets kept in memory (least recently used unloads).")] = 4,
    max_batch: Annotated[int, typer.Option(help="Rows decoded together; more requests wait for a free row.")] = 8,
    prefill_chunk: Annotated[
        int, typer.Option(help="Prompt tokens prefilled per step, so long prompts don't stall the others.")
    ] = 512,
    prefix_cache_mb: Annotated[
        float, typer.Option(help="Memory for reused prompt prefixes (keys/values per adapter set); 0 turns it off.")
    ] = 256,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 512,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens.")] = 4096,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 1_000_000,
) -> None:
    """Serve the base model and every adapter set in a directory over an OpenAI-compatible API."""
    uvicorn = _server_extra("serve")
    from .core.base_models import EMBEDDED_NAME
    from .serving import Limits, build_app

    base = base or EMBEDDED_NAME
    if not adapters_dir.is_dir():
        fail(f"--adapters-dir '{adapters_dir}' is not a directory")
    if prefix_cache_mb < 0:
        fail(f"--prefix-cache-mb must be >= 0 (0 turns it off), got {prefix_cache_mb:g}")
    limits = Limits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_request_bytes=max_request_bytes)
    api = build_app(base, adapters_dir, api_key=api_key, max_loaded=max_loaded, max_batch=max_batch, limits=limits,
                    prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb)  # fmt: skip
    typer.echo(f"serving {base} and the adapter sets in {adapters_dir} on http://{host}:{port}/v1")
    uvicorn.run(api, host=host, port=port, log_level="warning")


def ui(
    workdir: Annotated[
        Path, typer.Option(help="Folder the page works in: data files, configs/, runs/, exports/, models/.")
    ] = Path("."),
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the page to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option()] = 7860,
) -> None:
    """A web page to configure, train, watch, compare, chat with and export runs."""
    uvicorn = _server_extra("ui")
    from .ui import create_app

    typer.echo(f"hybridtune ui on http://{host}:{port} (work directory: {workdir.resolve()})")
    uvicorn.run(create_app(workdir), host=host, port=port, log_level="warning")


def _server_extra(command: str):
    """uvicorn, or one line saying how to install the [serve] extra the command needs."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        fail(f"hybridtune {command} needs the [serve] extra ({exc.name} is not installed): "
             "pip install 'hybridtune[serve]'")  # fmt: skip
    return uvicorn


COMMANDS = {"merge-sets": merge_sets_command, "merge": merge, "export": export, "serve": serve, "ui": ui}
