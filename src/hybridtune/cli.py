"""The ``hybridtune`` command line. Thin: every verb calls the library or a recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

app = typer.Typer(
    help="Fine-tune transformers models with LoRA and bottleneck Adapters in one model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags read as flags (rich panels show every flag as `<bool>`)
)
DEBUG_ENV = "HYBRIDTUNE_DEBUG"  # set to 1 (or pass --debug) for a traceback instead of the one-line error

AdaptersOpt = Annotated[Path, typer.Option("--adapters", help="A saved adapter directory (e.g. RUN/adapters).")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Base model; default: the one recorded with the adapters.")
]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _run_config(config: Path, overrides: list[str] | None):
    from .run_config import ConfigError, load_run_config

    try:
        return load_run_config(config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if version:
        typer.echo(__version__)
        raise typer.Exit()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars are enough; theirs garble the output


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run YAML file.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, e.g. training.lr=1e-4")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run in the output directory first.")] = False,
    nproc: Annotated[
        str,
        typer.Option(
            help="Processes on this machine: a number, or 'auto' for one per visible GPU. More than one runs "
            "the same command under `torchrun --standalone` (DDP, or the YAML's fsdp/deepspeed)."
        ),
    ] = "1",
) -> None:
    """Train (or resume) the run a YAML file describes, evaluate it, and save its adapters."""
    from .recipes.finetune import TrainingStopped
    from .recipes.finetune import train as run_training
    from .run_config import ConfigError

    cfg = _run_config(config, overrides)  # checked once, before any process starts
    processes = _processes(nproc)
    if processes > 1:
        raise typer.Exit(_torchrun(processes, config, overrides or [], overwrite))
    try:
        result = run_training(cfg, overwrite=overwrite)
    except ConfigError as exc:
        _fail(str(exc))
    except TrainingStopped as exc:
        typer.echo(str(exc))
        return
    if result.is_main:
        _report(result, cfg.eval.show)


def _processes(nproc: str) -> int:
    if nproc == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    if not nproc.isdigit() or int(nproc) < 1:
        _fail(f"--nproc: expected a number of processes (1 or more) or 'auto', got {nproc!r}")
    return int(nproc)


def _torchrun(processes: int, config: Path, overrides: list[str], overwrite: bool) -> int:
    """This training command again, in ``processes`` processes started by torchrun (the engine
    that does the work; nothing here coordinates processes). Returns torchrun's exit status."""
    if "RANK" in os.environ:
        _fail("--nproc: this is already one process of a multi-process launch (torchrun/accelerate); drop --nproc")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = ["-m", "hybridtune", "train", str(config), *overrides, *(["--overwrite"] if overwrite else [])]
    return subprocess.call([*launch, *command])


def _report(result, show: int) -> None:
    s = result.summary
    typer.echo("")
    before = {g.prompt: g.output for g in result.generations_before}
    for gen in result.generations[:show]:
        typer.echo(f"input:     {gen.question.splitlines()[-1]!r}")
        if gen.prompt in before:
            typer.echo(f"  base:    {before[gen.prompt].strip()!r}")
        typer.echo(f"  trained: {gen.output.strip()!r}   (reference: {gen.reference!r})")
    before, after = s.get("before", {}), s.get("after", {})
    for key in ("exact_match", "eval_loss"):
        if key in after:
            was = f"{before[key]:.3f} -> " if key in before else ""
            typer.secho(f"{key}: {was}{after[key]:.3f}", bold=True)
    skipped = f" ({s['skipped_steps']} skipped for fp16 overflow)" if s.get("skipped_steps") else ""
    typer.echo(f"trained {s.get('steps')} steps in {s.get('train_seconds')} s{skipped}")
    typer.echo(f"adapters:   {s['adapters']}")
    typer.echo(f"metrics:    {result.run_dir / 'metrics.jsonl'}")
    if s.get("loss_curve"):
        typer.echo(f"loss curve: {s['loss_curve']}")


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="Run YAML file.")]) -> None:
    """Check a config (keys, types, stages, data files) without loading any model; list every problem."""
    _run_config(config, [])
    typer.secho(f"{config}: ok", fg=typer.colors.GREEN)


@app.command("eval")
def evaluate(
    config: Annotated[Path, typer.Argument(help="Run YAML file (its data.eval / eval_split is used).")],
    adapters: AdaptersOpt,
) -> None:
    """Loss, perplexity and the task metric of saved adapters on the config's eval split."""
    from .evaluation import eval_loss, exact_match
    from .recipes.data_prep import prepare_data
    from .recipes.loading import load_trained

    cfg = _run_config(config, None)
    model, tokenizer = load_trained(adapters, cfg.model)
    data = prepare_data(cfg, tokenizer)
    if not data.eval:
        _fail("the config has no eval data (data.eval or data.eval_split)")
    result = eval_loss(model, data.eval, tokenizer.pad_token_id, cfg.eval.batch_size)
    if cfg.eval.metric == "exact_match":
        result["exact_match"], _ = exact_match(
            model,
            tokenizer,
            data.eval_examples[: cfg.eval.max_samples],
            system=cfg.data.system,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
        )
    for key, value in result.items():
        typer.echo(f"{key}: {value:.4f}")


def _weighted(spec: str) -> list[tuple[Path, float]]:
    """``DIR:0.5,DIR:0.5`` (a bare DIR weighs 1) -> [(path, weight), ...]."""
    items = []
    for part in spec.split(","):
        path, sep, weight = part.rpartition(":")
        if not sep:
            path, weight = part, "1"
        try:
            items.append((Path(path), float(weight)))
        except ValueError:
            _fail(f"'{part}': expected DIR:WEIGHT with a number as weight")
    return items


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The user message.")] = None,
    adapters: Annotated[Path | None, typer.Option("--adapters", help="Saved adapters; none = base model.")] = None,
    ensemble: Annotated[
        str | None, typer.Option(help="Average several adapter dirs' logits: DIR:0.5,DIR:0.5 (instead of --adapters).")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task name, for adapters with a hard lora_mixture.")] = None,
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Chat until an empty line.")] = False,
) -> None:
    """Greedy generation with saved adapters, through the tokenizer's chat template when it has one."""
    from .data import render_prompt
    from .evaluation import generate_batch
    from .models import EMBEDDED_NAME, load_base
    from .recipes.loading import load_sets, load_trained

    if prompt is None and not interactive:
        _fail("give a prompt, or --interactive")
    if ensemble is not None and adapters is not None:
        _fail("give --adapters or --ensemble, not both")
    route = {}
    if ensemble is not None:
        from .combine import Ensemble

        hybrid, tokenizer, weights = load_sets(_weighted(ensemble), model)
        lm = Ensemble(hybrid, weights)
    elif adapters is not None:
        lm, tokenizer = load_trained(adapters, model)
        if task is not None:
            route = {"task_ids": [_task_index(lm, task)]}
    else:
        lm, tokenizer = load_base(model or EMBEDDED_NAME)
    lm.eval()
    history = [{"role": "system", "content": system}] if system else []
    while True:
        if prompt is None:
            prompt = input("> ").strip()
            if not prompt:
                return
        history.append({"role": "user", "content": prompt})
        text = render_prompt(tokenizer, history)
        if ensemble is not None:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = lm.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        else:
            (answer,) = generate_batch(lm, tokenizer, [text], max_new_tokens, **route)
        typer.echo(answer.strip())
        if not interactive:
            return
        history.append({"role": "assistant", "content": answer.strip()})
        prompt = None


def _task_index(hybrid, task: str) -> int:
    from .methods.lora_mixture import LoRAMixtureConfig

    for cfg in hybrid.entries.values():
        if isinstance(cfg, LoRAMixtureConfig) and cfg.tasks:
            if task not in cfg.tasks:
                _fail(f"unknown task '{task}'; these adapters know: {', '.join(cfg.tasks)}")
            return cfg.tasks.index(task)
    _fail("--task needs adapters with a hard lora_mixture entry")


@app.command("merge-sets")
def merge_sets_command(
    adapters: Annotated[list[str], typer.Argument(help="DIR:WEIGHT for each LoRA adapter dir to merge.")],
    out: Annotated[Path, typer.Option("--out", help="Output adapter directory.")],
    method: Annotated[str, typer.Option(help="concat (exact, ranks add up) or svd (compress to --rank).")] = "concat",
    rank: Annotated[int | None, typer.Option(help="Rank per module for --method svd.")] = None,
    model: ModelOpt = None,
) -> None:
    """Merge several LoRA adapter sets into one (linear weighted), for deployment."""
    from .combine import merge_sets
    from .recipes.loading import load_sets

    if method not in {"concat", "svd"}:
        _fail(f"--method must be concat or svd, not '{method}'")
    hybrid, _, weights = load_sets([spec for arg in adapters for spec in _weighted(arg)], model)
    try:
        merge_sets(hybrid, weights, into="merged", method=method, rank=rank)
    except ValueError as exc:
        _fail(str(exc))
    hybrid.save_set("merged", out)
    typer.echo(f"merged adapters: {out}")


@app.command()
def merge(
    adapters: AdaptersOpt,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    model: ModelOpt = None,
    keep_adapters: Annotated[
        bool, typer.Option(help="Merge LoRA into the base and save the other entries as a hybrid checkpoint.")
    ] = False,
) -> None:
    """Fold LoRA into the base weights and save a plain transformers model (or base + remaining adapters)."""
    from .errors import MergeError
    from .recipes.loading import load_trained

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
        _fail(f"{exc} (or use --keep-adapters)")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    typer.echo(f"merged model: {out}")


@app.command("search-rank")
def search_rank(
    config: Annotated[Path, typer.Argument(help="Run YAML file with at least one LoRA entry.")],
    budget: Annotated[str, typer.Option(help="Trainable parameters: 0.5% (of the base), 0.005, or 120000.")],
    probe_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of the generous-rank probe.")] = 20,
    probe_rank: Annotated[int, typer.Option(min=1, help="LoRA rank used during the probe.")] = 16,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the new YAML (default: CONFIG.searched.yaml).")
    ] = None,
) -> None:
    """Choose LoRA ranks per layer and projection for a parameter budget, from a short probe."""
    import yaml

    from .rank_search import search
    from .run_config import ConfigError

    cfg = _run_config(config, None)
    try:
        result = search(config, budget, probe_steps=probe_steps, probe_rank=probe_rank)
    except ConfigError as exc:
        _fail(str(exc))
    target = out or config.with_name(config.stem + ".searched.yaml")
    new = result["config"]
    if target.resolve().parent != config.resolve().parent:  # keep the data files reachable
        for key in ("train", "eval"):
            value = new.get("data", {}).get(key)
            if value is not None:
                new["data"][key] = str(getattr(cfg.data, key))
    target.write_text(yaml.safe_dump(new, sort_keys=False))
    for entry, ranks in result["ranks"].items():
        values = sorted(ranks.values())
        typer.echo(
            f"{entry}: {len(values)} modules, ranks {values[0]}..{values[-1]} (mean {sum(values) / len(values):.1f})"
        )
    typer.echo(f"LoRA parameters: {result['used']:,} of a {result['lora_budget']:,} budget "
               f"(uniform rank at this budget: {result['uniform_rank']})")  # fmt: skip
    typer.echo(f"searched config: {target}")


class ExportFormat(str, Enum):
    peft = "peft"
    merged = "merged"
    onnx = "onnx"


@app.command()
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
) -> None:
    """Export saved adapters for other tools."""
    if format is ExportFormat.merged:
        merge(adapters=adapters, out=out, model=model, keep_adapters=False)
        return
    from .recipes.loading import load_trained

    hybrid, tokenizer = load_trained(adapters, model)
    if format is ExportFormat.onnx:
        from .onnx_export import export_onnx

        try:
            check = export_onnx(hybrid, out, tokenizer)
        except (ImportError, RuntimeError) as exc:
            _fail(
                f"ONNX export failed: {exc}"
                + (" (pip install onnx onnxscript onnxruntime)" if isinstance(exc, ImportError) else "")
            )
        typer.echo(
            f"onnx model: {out / 'model.onnx'}; onnxruntime vs PyTorch logits: max |diff| "
            f"{check['max_abs_logit_difference']:.2e} (tolerance {check['tolerance']:.0e}); "
            f"entries in the graph: {', '.join(check['entries_in_graph']) or 'none (all merged)'}"
        )
        return
    from .peft_interop import export_peft

    try:
        export_peft(hybrid, out)
    except ValueError as exc:
        _fail(str(exc))
    others = [e for e, c in hybrid.entries.items() if c.type != "lora"]
    typer.echo(f"peft adapter: {out}" + (f" (not exported, no peft equivalent: {', '.join(others)})" if others else ""))


@app.command()
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
    max_batch: Annotated[int, typer.Option(help="Requests generated together in one batch.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 512,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens.")] = 4096,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 1_000_000,
) -> None:
    """Serve the base model and every adapter set in a directory over an OpenAI-compatible API."""
    import uvicorn

    from .models import EMBEDDED_NAME
    from .serving import Limits, build_app

    base = base or EMBEDDED_NAME
    if not adapters_dir.is_dir():
        _fail(f"--adapters-dir '{adapters_dir}' is not a directory")
    limits = Limits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_request_bytes=max_request_bytes)
    api = build_app(base, adapters_dir, api_key=api_key, max_loaded=max_loaded, max_batch=max_batch, limits=limits)
    typer.echo(f"serving {base} and the adapter sets in {adapters_dir} on http://{host}:{port}/v1")
    uvicorn.run(api, host=host, port=port, log_level="warning")


@app.command()
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
    import uvicorn

    from .ui import create_app

    typer.echo(f"hybridtune ui on http://{host}:{port} (work directory: {workdir.resolve()})")
    uvicorn.run(create_app(workdir), host=host, port=port, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    """The console entry point: expected errors (every HybridTuneError: a bad path, not an adapter
    directory, a bad config...) are one line and exit code 2; a traceback only with --debug."""
    from .errors import HybridTuneError

    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="hybridtune")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except HybridTuneError as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return 2
    return 0
