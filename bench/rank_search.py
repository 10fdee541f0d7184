"""Searched ranks vs uniform ranks at the same parameter budget, on the embedded model and the
quickstart task. One command: python bench/rank_search.py [--budget 460800 | 0.1%]

It runs the probe, trains the searched allocation and the uniform one (same seed, steps and data),
and writes a table to bench/results/rank_search.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import yaml

from hybridtune.training.rank_search import search
from hybridtune.training.recipe import train
from hybridtune.training.run_config import load_run_config

HERE = Path(__file__).parent
CONFIG = HERE.parent / "examples" / "sentiment" / "lora_only.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="460800", help="default: what uniform rank 4 costs on q/k/v/o")
    parser.add_argument("--probe-steps", type=int, default=10)
    parser.add_argument("--probe-rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "rank_search.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    quiet = lambda *a, **k: None  # noqa: E731
    start = time.time()
    result = search(CONFIG, args.budget, probe_steps=args.probe_steps, probe_rank=args.probe_rank, log=quiet)
    probe_s = time.time() - start
    rows = []
    searched_path = CONFIG.with_name("lora_only.searched.yaml")
    searched_path.write_text(yaml.safe_dump(result["config"], sort_keys=False))
    for name, overrides in [
        ("searched", ["output=runs/rank-search-searched"]),
        ("uniform", [f"methods.lora.r={result['uniform_rank']}", "output=runs/rank-search-uniform"]),
    ]:
        path = searched_path if name == "searched" else CONFIG
        config = load_run_config(path, overrides)
        t0 = time.time()
        run = train(config, overwrite=True, log=quiet)
        params = sum(run_params(run).values())
        rows.append((name, params, run.summary["after"], time.time() - t0))
    searched_path.unlink()
    ranks = sorted(result["ranks"]["lora"].values())
    lines = [
        "# Rank search vs uniform rank at the same budget",
        "",
        f"Embedded SmolLM2-135M-Instruct, quickstart sentiment task, LoRA on q/k/v/o of 30 layers, "
        f"{load_run_config(CONFIG).training.max_steps} training steps, seed 0, {platform.machine()} CPU, 2 threads. "
        f"Budget {args.budget} = {result['lora_budget']:,} LoRA parameters; probe: "
        f"{args.probe_steps} steps at rank {args.probe_rank} ({probe_s:.0f} s). Searched ranks per module: "
        f"{ranks[0]}..{ranks[-1]} (mean {sum(ranks) / len(ranks):.2f}); uniform rank {result['uniform_rank']}. "
        f"Command: `python bench/rank_search.py --budget {args.budget}`.",
        "",
        "| allocation | LoRA parameters | exact match | eval loss | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, params, after, seconds in rows:
        lines.append(f"| {name} | {params:,} | {after['exact_match']:.2f} | {after['eval_loss']:.4f} | {seconds:.0f} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


def run_params(run) -> dict[str, int]:
    from safetensors.torch import load_file

    tensors = load_file(run.adapters_dir / "hybridtune_model.safetensors")
    return {k: v.numel() for k, v in tensors.items()}


if __name__ == "__main__":
    main()
