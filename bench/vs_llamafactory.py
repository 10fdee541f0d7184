"""One LLaMA-Factory training YAML run by LLaMA-Factory and by hybridtune, on token-identical data.

python bench/vs_llamafactory.py --lf-python VENV/bin/python [--rounds 2] [--steps 10] [--regimes a,b]

LLaMA-Factory pins its own transformers/peft/TRL, so it runs from its own venv (``--lf-python``;
`pip install torch==2.13.0 && pip install -c <(echo torch==2.13.0) llamafactory`; the registry's
torchaudio wheels are CUDA builds that do not load beside the CPU torch, and LLaMA-Factory imports
torchaudio at start-up for audio inputs, so that venv gets a stand-in module, see ``stub_torchaudio``).

The YAML: SmolLM2-135M-Instruct (the embedded model, as a transformers directory), LoRA r8 on all
linear layers, the quickstart's sentiment data as an alpaca dataset (dataset_info.json), LLaMA-Factory's
``empty`` template, cutoff 128, batch 8, ``--steps`` steps, with and without gradient checkpointing
(LLaMA-Factory's default is on). hybridtune runs the YAML that ``hybridtune convert`` writes from it,
with ``data.template`` a Jinja file that renders as LLaMA-Factory's ``empty`` does; the first training
example's token ids are compared with the ones LLaMA-Factory logs (they must be equal). Time: each
trainer's own training time (LLaMA-Factory's ``train_runtime``, hybridtune's ``train_seconds``);
memory: the peak resident set of each run's process. The tools alternate within each round.

The ``neat packing (1 epoch)`` regime trains the same YAML with ``neat_packing: true`` for one
epoch (no ``max_steps``): both pack the split into rows and train every token once, so the split's
tokens over the training time is each one's real-token throughput; LLaMA-Factory's first packed
row (which it logs) is checked to be the split's examples, token for token. Writes
bench/results/vs_llamafactory.md (``--out``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).parent
PACKED = "neat packing (1 epoch)"
EMPTY_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"  # LLaMA-Factory's `empty`
REGIMES = {"checkpointing": {}, "no checkpointing": {"disable_gradient_checkpointing": True},
           # one epoch of packed rows, each example attending to itself (LLaMA-Factory's neat_packing,
           # hybridtune's data.packing): both train every token of the split once, so the split's
           # tokens over the training time is each one's real-token throughput
           PACKED: {"neat_packing": True, "max_steps": -1, "num_train_epochs": 1.0}}  # fmt: skip


def stub_torchaudio(python: str) -> None:
    """A stand-in torchaudio in the LLaMA-Factory venv when the real one cannot load there."""
    if subprocess.run([python, "-c", "import torchaudio"], capture_output=True).returncode == 0:
        return
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    package = Path(site) / "torchaudio"
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir()
    stub = '"""Stand-in (bench/vs_llamafactory.py): text training only."""\n__version__ = "0+stub"\n'
    (package / "__init__.py").write_text(stub)


def run(command: list[str], cwd: Path) -> tuple[str, float]:
    """(output, peak resident set in MB) of one training process."""
    with open(cwd / "log.txt", "w") as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                   "PYTHONPATH": str(HERE.parent / "src")})  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)
    output = (cwd / "log.txt").read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[0]} failed:\n{output[-3000:]}")
    return output, usage.ru_maxrss / 1024


def packed_rows(log: str) -> int:
    """How many (packed) rows LLaMA-Factory trains on, from the Trainer's log."""
    return int(log.split("Num examples = ", 1)[1].split()[0].replace(",", ""))


def made_of(row: list[int], examples: list[list[int]], pads: set[int]) -> bool:
    """Whether ``row`` is whole examples of ``examples`` one after another, then padding (one of
    ``pads``: LLaMA-Factory pads with the end-of-text token where a tokenizer has no pad token)."""
    start = 0
    while start < len(row):
        fits = [e for e in examples if row[start : start + len(e)] == e]
        if not fits:
            return start > 0 and len(set(row[start:])) == 1 and row[start] in pads
        start += max(len(e) for e in fits)
    return True


def first_example_ids(log: str) -> list[int]:
    """The token ids of the first training example, as LLaMA-Factory logs them."""
    return ast.literal_eval(log.split("input_ids:\n", 1)[1].split("\n", 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lf-python", required=True, help="python of a venv with llamafactory installed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vs_llamafactory.md")
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated, of: " + ", ".join(REGIMES))
    args = parser.parse_args()
    names = [name.strip() for name in args.regimes.split(",")]
    if unknown := [name for name in names if name not in REGIMES]:
        parser.error(f"--regimes: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(REGIMES)}")
    regimes = {name: REGIMES[name] for name in names}
    from transformers import AutoTokenizer

    from hybridtune.core.base_models import resolve_model
    from hybridtune.training.data import encode, pack

    stub_torchaudio(args.lf_python)
    lf_cli = str(Path(args.lf_python).parent / "llamafactory-cli")
    model = resolve_model("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="vs-llamafactory-"))
    (work / "data").mkdir()
    shutil.copy(HERE.parent / "examples" / "sentiment" / "train.jsonl", work / "data" / "train.jsonl")
    (work / "data" / "dataset_info.json").write_text(json.dumps({"sentiment": {"file_name": "train.jsonl"}}))
    (work / "empty.jinja").write_text(EMPTY_TEMPLATE)
    rows = [json.loads(line) for line in (work / "data" / "train.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = EMPTY_TEMPLATE
    encoded = [encode(tokenizer, [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                                  {"role": "assistant", "content": r["output"]}], 128) for r in rows]  # fmt: skip
    split_tokens = sum(len(e.input_ids) for e in encoded)
    our_rows, their_rows = len(pack(encoded, 128)), 0
    mean_tokens = statistics.mean(
        len(tokenizer(f"{r['instruction']}\n{r['input']}{r['output']}", add_special_tokens=False)["input_ids"])
        for r in rows
    )
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    identical = row_identical = None
    for round_ in range(args.rounds):
        for regime, extra in regimes.items():
            tools = ["llamafactory", "hybridtune"] if round_ % 2 == 0 else ["hybridtune", "llamafactory"]
            for tool in tools:
                where = work / f"{tool}-{regime.replace(' ', '-')}-{round_}"
                where.mkdir()
                config = {"model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "lora",
                          "lora_target": "all", "lora_rank": 8, "lora_alpha": 16, "dataset": "sentiment",
                          "dataset_dir": str(work / "data"), "template": "empty", "cutoff_len": 128,
                          "per_device_train_batch_size": 8, "max_steps": args.steps, "learning_rate": 1e-3,
                          "logging_steps": 1, "output_dir": str(where / "out"), "overwrite_output_dir": True,
                          "report_to": "none", "bf16": False, "dataloader_num_workers": 0, **extra}  # fmt: skip
                (where / "lf.yaml").write_text(yaml.safe_dump(config))
                if tool == "llamafactory":
                    log, peak = run([lf_cli, "train", "lf.yaml"], where)
                    seconds = json.loads((where / "out" / "all_results.json").read_text())["train_runtime"]
                    if regime == PACKED:  # it logs its first packed row, several examples long
                        their_rows = packed_rows(log)
                        pads = {tokenizer.pad_token_id, tokenizer.eos_token_id}
                        row_identical = made_of(first_example_ids(log), [e.input_ids for e in encoded], pads)
                    elif identical is None:
                        identical = first_example_ids(log) == encoded[0].input_ids
                else:
                    hybridtune = [sys.executable, "-m", "hybridtune"]
                    subprocess.run([*hybridtune, "convert", "lf.yaml", "--out", "ht.yaml"], cwd=where, check=True,
                                   capture_output=True)  # fmt: skip
                    converted = yaml.safe_load((where / "ht.yaml").read_text())
                    converted["data"]["template"] = str(work / "empty.jinja")
                    (where / "ht.yaml").write_text(yaml.safe_dump(converted))
                    _, peak = run([*hybridtune, "train", "ht.yaml"], where)
                    seconds = json.loads((where / "out" / "summary.json").read_text())["train_seconds"]
                entry = results.setdefault((regime, tool), {"seconds": [], "peak": []})
                entry["seconds"].append(seconds)
                entry["peak"].append(peak)
                print(f"round {round_ + 1} {regime} {tool}: {seconds:.1f} s, peak {peak:.0f} MB", flush=True)
    lines = ["# LLaMA-Factory's YAML, run by LLaMA-Factory and by hybridtune", ""]
    steps = [regime for regime in regimes if regime != PACKED]
    if steps:
        lines += [
            f"`python bench/vs_llamafactory.py --rounds {args.rounds} --steps {args.steps} --regimes "
            f'"{",".join(steps)}"` on {platform.machine()} ({os.cpu_count()} cores). SmolLM2-135M-Instruct fp32, '
            f"LoRA r8 on all linear layers, the sentiment data with LLaMA-Factory's `empty` template (mean "
            f"{mean_tokens:.1f} tokens per example, batch 8, cutoff 128), {args.steps} steps. First training example "
            f"token-identical: {'yes' if identical else 'NO'}. Time: the trainers' own training time (median over "
            "rounds); memory: the process's peak resident set.",
            "",
            "| regime | LLaMA-Factory s/step | hybridtune s/step | hybridtune / LLaMA-Factory | LLaMA-Factory peak MB "
            "| hybridtune peak MB |",
            "|---|---|---|---|---|---|",
        ]
    for regime in steps:
        theirs, ours = results[(regime, "llamafactory")], results[(regime, "hybridtune")]
        ratio = statistics.median(o / t for o, t in zip(ours["seconds"], theirs["seconds"], strict=True))
        lines.append(f"| {regime} | {statistics.median(theirs['seconds']) / args.steps:.2f} | "
                     f"{statistics.median(ours['seconds']) / args.steps:.2f} | {ratio:.2f} | "
                     f"{max(theirs['peak']):.0f} | {max(ours['peak']):.0f} |")  # fmt: skip
    if PACKED in regimes:
        theirs, ours = results[(PACKED, "llamafactory")], results[(PACKED, "hybridtune")]
        ratio = statistics.median(t / o for o, t in zip(ours["seconds"], theirs["seconds"], strict=True))
        lines += [
            *([""] if steps else []),
            "## Neat packing, one epoch",
            "",
            f'`python bench/vs_llamafactory.py --rounds {args.rounds} --regimes "{PACKED}"`: the same YAML with '
            "`neat_packing: true` and one epoch instead of `max_steps` (gradient checkpointing on, LLaMA-Factory's "
            f"default, which the converted YAML keeps). Both train the split's {split_tokens:,} tokens once, in packed "
            f"rows of up to 128 tokens, each example attending to itself (LLaMA-Factory: {their_rows} rows, "
            f"hybridtune: {our_rows}). LLaMA-Factory's first packed row is the split's examples token for token: "
            f"{'yes' if row_identical else 'NO'}. Real tokens/s = the split's tokens / the training time (median over "
            "rounds), so no padding token counts.",
            "",
            "| LLaMA-Factory real tokens/s | hybridtune real tokens/s | hybridtune / LLaMA-Factory | "
            "LLaMA-Factory peak MB | hybridtune peak MB |",
            "|---|---|---|---|---|",
            f"| {split_tokens / statistics.median(theirs['seconds']):.0f} | "
            f"{split_tokens / statistics.median(ours['seconds']):.0f} | {ratio:.2f} | {max(theirs['peak']):.0f} | "
            f"{max(ours['peak']):.0f} |",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
