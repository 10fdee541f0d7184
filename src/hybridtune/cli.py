"""The ``hybridtune`` command line. Thin: every verb calls the library or a recipe."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from . import __version__, cli_deploy
from .cli_common import AdaptersOpt, ModelOpt, fail, run_config, weighted

app = typer.Typer(
    help="Fine-tune transformers models with LoRA and bottleneck Adapters in one model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags read as flags (rich panels show every flag as `<bool>`)
)
DEBUG_ENV = "HYBRIDTUNE_DEBUG"  # set to 1 (or pass --debug) for a traceback instead of the one-line error


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
    from_checkpoint: Annotated[
        Path | None,
        typer.Option(help="Resume from this checkpoint of the run (later ones are kept in checkpoints/superseded/)."),
    ] = None,
    nproc: Annotated[
        str,
        typer.Option(
            help="Processes on this machine: a number, or 'auto' for one per visible GPU. More than one runs "
            "the same command under `torchrun --standalone` (DDP, or the YAML's fsdp/deepspeed)."
        ),
    ] = "1",
) -> None:
    """Train (or resume) the run a YAML file describes, evaluate it, and save its adapters."""
    from .training.recipe import train as run_training
    from .training.run_config import ConfigError
    from .training.run_dir import TrainingStopped

    cfg = run_config(config, overrides)  # checked once, before any process starts
    for note in cfg.notes:  # how a LLaMA-Factory config was read
        typer.echo(f"LLaMA-Factory config: {note}")
    processes = _processes(nproc)
    if processes > 1:
        resume = ["--from-checkpoint", str(from_checkpoint)] if from_checkpoint else []
        raise typer.Exit(_torchrun(processes, config, [*(overrides or []), *resume], overwrite))
    try:
        result = run_training(cfg, overwrite=overwrite, from_checkpoint=from_checkpoint)
    except ConfigError as exc:
        fail(str(exc))
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
        fail(f"--nproc: expected a number of processes (1 or more) or 'auto', got {nproc!r}")
    return int(nproc)


def _torchrun(processes: int, config: Path, overrides: list[str], overwrite: bool) -> int:
    """This training command again, in ``processes`` processes started by torchrun (the engine
    that does the work; nothing here coordinates processes). Returns torchrun's exit status."""
    if "RANK" in os.environ:
        fail("--nproc: this is already one process of a multi-process launch (torchrun/accelerate); drop --nproc")
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
    """Check a config (keys, types, stages, data files, and every target against the model's
    config, without loading its weights); list every problem."""
    from .training.preflight import model_problems
    from .training.run_config import ConfigError

    problems = model_problems(run_config(config, []))
    if problems:
        fail(str(ConfigError(problems, str(config))))
    typer.secho(f"{config}: ok", fg=typer.colors.GREEN)


data_app = typer.Typer(help="Look at a run's data before training.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


@data_app.command("preview")
def data_preview(
    config: Annotated[Path, typer.Argument(help="Run YAML file.")],
    count: Annotated[int, typer.Option(help="How many training examples to show.")] = 3,
) -> None:
    """Rendered training examples with the trained tokens marked, token-length statistics, and how
    many examples max_length cuts (the tokenizer only: no model weights load)."""
    from .core.base_models import load_tokenizer
    from .training.data_preview import preview

    cfg = run_config(config, [])
    typer.echo(preview(cfg, load_tokenizer(cfg.model), count))


@app.command("convert")
def convert_config(
    config: Annotated[Path, typer.Argument(help="A LLaMA-Factory training YAML.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the hybridtune YAML (default: NAME.hybridtune.yaml).")
    ] = None,
) -> None:
    """Write the hybridtune run YAML equivalent to a LLaMA-Factory training YAML."""
    from .training.llamafactory_yaml import write_converted
    from .training.run_config import ConfigError

    out = out or config.with_name(f"{config.stem}.hybridtune.yaml")
    try:
        notes = write_converted(config, out)
    except ConfigError as exc:
        fail(str(exc))
    for note in notes:
        typer.echo(note)
    typer.secho(f"wrote {out}", fg=typer.colors.GREEN)


@app.command("eval")
def evaluate(
    config: Annotated[Path, typer.Argument(help="Run YAML file (its data.eval / eval_split is used).")],
    adapters: AdaptersOpt,
) -> None:
    """Loss, perplexity and the task metric of saved adapters on the config's eval split."""
    from .training.data_prep import prepare_data
    from .training.evaluation import eval_loss, exact_match
    from .training.trained_sets import load_trained

    cfg = run_config(config, None)
    model, tokenizer = load_trained(adapters, cfg.model)
    data = prepare_data(cfg, tokenizer)
    if not data.eval:
        fail("the config has no eval data (data.eval, data.eval_dataset or data.eval_split)")
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
    from .core.base_models import EMBEDDED_NAME, load_base
    from .training.data import render_prompt
    from .training.evaluation import generate_batch
    from .training.trained_sets import load_sets, load_trained

    if prompt is None and not interactive:
        fail("give a prompt, or --interactive")
    if ensemble is not None and adapters is not None:
        fail("give --adapters or --ensemble, not both")
    route = {}
    if ensemble is not None:
        from .interop.set_merging import Ensemble

        hybrid, tokenizer, weights = load_sets(weighted(ensemble), model)
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
    for cfg in hybrid.entries.values():
        tasks = cfg.routing_tasks()
        if tasks:
            if task not in tasks:
                fail(f"unknown task '{task}'; these adapters know: {', '.join(tasks)}")
            return tasks.index(task)
    fail("--task needs adapters with an entry that routes rows by task (a hard lora_mixture)")


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

    from .training.rank_search import search
    from .training.run_config import ConfigError

    cfg = run_config(config, None)
    try:
        result = search(config, budget, probe_steps=probe_steps, probe_rank=probe_rank)
    except ConfigError as exc:
        fail(str(exc))
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


for _name, _command in cli_deploy.COMMANDS.items():
    app.command(_name)(_command)


def main(argv: list[str] | None = None) -> int:
    """The console entry point: expected errors (every HybridTuneError: a bad path, not an adapter
    directory, a bad config...) are one line and exit code 2; a traceback only with --debug."""
    from .core.errors import HybridTuneError, HybridTuneWarning

    shown = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):  # our warnings: one plain line
        if issubclass(category, HybridTuneWarning):
            typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="hybridtune")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except HybridTuneError as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return 2
    finally:
        warnings.showwarning = shown
    return 0
