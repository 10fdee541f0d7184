"""Peak memory of one real training run per precision regime, on the embedded model.

python bench/memory.py [--regimes fp32,bf16,fp16,4bit,8bit,ds-zero2-bf16,...] [--steps 24]

Each regime is a `hybridtune train` of the quickstart (examples/sentiment: LoRA q,v + Adapter
after every MLP) in its own process, so its peak is its own: allocated GPU memory on CUDA, the
resident set on the CPU. DeepSpeed regimes (ds-*) run under torchrun with one process. Quantized
and DeepSpeed regimes also check that the saved adapters load back into a fresh base and give
the eval loss the run itself measured. Writes a markdown table to bench/results/memory_<device>.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
CONFIG = HERE.parent / "examples" / "sentiment" / "config.yaml"
REGIMES = {
    "fp32": ["training.precision=fp32", "training.base_dtype=fp32"],
    "bf16": ["training.precision=bf16", "training.base_dtype=bf16"],
    "fp32-plain-loss": ["training.precision=fp32", "training.base_dtype=fp32", "training.chunked_loss=false"],
    "fp32-checkpointing": [
        "training.precision=fp32",
        "training.base_dtype=fp32",
        "training.gradient_checkpointing=true",
    ],
    "4bit": ["model_quantization={bits: 4, type: nf4, double_quant: true, compute_dtype: bf16}"],
    "8bit": ["model_quantization={bits: 8, compute_dtype: bf16}"],
    "fp16": ["training.precision=fp16", "training.base_dtype=fp16"],
    "ds-zero2-bf16": ["training.precision=bf16", "deepspeed={zero_optimization: {stage: 2}}"],
    "ds-zero2-fp16": ["training.precision=fp16", "deepspeed={zero_optimization: {stage: 2}}"],
    "ds-zero3-bf16": ["training.precision=bf16", "deepspeed={zero_optimization: {stage: 3}}"],
}
CUDA_REGIMES = "fp32,bf16,fp16,4bit,8bit,ds-zero2-bf16,ds-zero2-fp16,ds-zero3-bf16"
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]


def reload_check(run_dir: Path, overrides: list[str]) -> float:
    """Eval loss of the saved adapters in a freshly loaded (quantized) base."""
    import torch

    import hybridtune as ht
    from hybridtune.core.base_models import load_base
    from hybridtune.training.data_prep import prepare_data
    from hybridtune.training.evaluation import eval_loss
    from hybridtune.training.run_config import load_run_config

    config = load_run_config(CONFIG, [o for o in overrides if not o.startswith("deepspeed=")])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tokenizer = load_base(config.model, quantization=config.model_quantization, device=device)
    model = ht.load(base, run_dir / "adapters")
    if config.model_quantization is None:
        model.to(device)
    data = prepare_data(config, tokenizer)
    half = torch.float16 if config.training.precision == "fp16" else torch.bfloat16
    with torch.autocast(device, dtype=half):
        return eval_loss(model, data.eval, tokenizer.pad_token_id, config.eval.batch_size)["eval_loss"]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    cuda = torch.cuda.is_available()
    parser.add_argument("--regimes", default=CUDA_REGIMES if cuda else "fp32-plain-loss,fp32,fp32-checkpointing")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--reload-check", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reload_check:
        run_dir, regime = args.reload_check.split(",")
        print(json.dumps(reload_check(Path(run_dir), REGIMES[regime])))
        return
    device = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, 2 threads"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for regime in args.regimes.split(","):
            run_dir = Path(tmp) / regime
            overrides = [*REGIMES[regime], f"training.max_steps={args.steps}", f"output={run_dir}"]
            launcher = TORCHRUN if regime.startswith("ds-") else []
            cmd = [sys.executable, *launcher, "-m", "hybridtune", "train", str(CONFIG), *overrides]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                rows.append(f"| {regime} | failed: {done.stderr.strip().splitlines()[-1][:120]} | | | | |")
                continue
            s = json.loads((run_dir / "summary.json").read_text())
            reload = ""
            if regime.endswith("bit") or regime.startswith("ds-"):
                check = [sys.executable, __file__, "--reload-check", f"{run_dir},{regime}"]
                loaded = json.loads(subprocess.run(check, capture_output=True, text=True, check=True).stdout)
                reload = f"{loaded:.4f} (run: {s['after']['eval_loss']:.4f})"
            rows.append(
                f"| {regime} | {s['peak_memory_mb']:.0f} | {s['train_seconds']} | "
                f"{s['before']['eval_loss']:.3f} -> {s['after']['eval_loss']:.3f} | "
                f"{s['before']['exact_match']:.2f} -> {s['after']['exact_match']:.2f} | {reload} |"
            )
            print(rows[-1], file=sys.stderr)
    memory = "peak allocated GPU MB" if cuda else "peak RSS MB"
    lines = [
        f"# Peak memory per precision regime ({device})",
        "",
        f"The quickstart (`examples/sentiment/config.yaml`: SmolLM2-135M-Instruct, LoRA r8 q,v + Adapter after "
        f"every MLP, batch 8, {args.steps} steps, eval before/after included), one `hybridtune train` process "
        "per regime; branch weights stay fp32 in every regime (under DeepSpeed: its fp32 masters). Command: "
        f"`python bench/memory.py --regimes {args.regimes} --steps {args.steps}`.",
        "",
        f"| regime | {memory} | train s | eval loss | exact match | reloaded eval loss |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    out = HERE / "results" / f"memory_{'cuda' if cuda else 'cpu'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
