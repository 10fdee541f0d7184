"""Start-up of the one-shot commands against the floor every PyTorch program pays.

python bench/startup.py [--rounds 5]

Each regime is a fresh process (a cold start, as a user's terminal runs it), regimes interleaved
in rounds on the same machine; median wall seconds and the ratio to the floor measured in the
same run. The floor is ``python -c "import torch, transformers"``; ``floor + load`` also loads the
embedded SmolLM2 and its tokenizer with transformers (what any tool must do before it can answer).
``generate`` answers one token with a LoRA + Adapter set of the embedded model, ``eval`` scores
that set on 4 examples. Writes bench/results/startup.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
PY = sys.executable

LOAD = (
    "import torch, transformers\n"
    "from hybridtune.core.base_models import resolve_model\n"
    "path = resolve_model('smollm2-135m')\n"
    "transformers.AutoModelForCausalLM.from_pretrained(path)\n"
    "transformers.AutoTokenizer.from_pretrained(path)\n"
)


def make_adapters(work: Path) -> tuple[Path, Path]:
    """A LoRA + Adapter set of the embedded model (untrained: start-up does not depend on it), and
    a run YAML with a 4-example eval file."""
    import hybridtune as ht
    from hybridtune.core.base_models import load_base

    base, _ = load_base("smollm2-135m")
    cfg = ht.HybridConfig(methods={
        "lora": ht.LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]),
        "adapter": ht.AdapterConfig(reduction_factor=16, after="mlp"),
    })  # fmt: skip
    ht.inject(base, cfg).save_adapters(work / "adapters")
    rows = [{"instruction": f"Is {w} good?", "output": "yes"} for w in ("cake", "rain", "tea", "mud")]
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "run.yaml").write_text(
        "model: smollm2-135m\nmethods:\n  lora: {type: lora, r: 8, alpha: 16, targets: [q_proj, v_proj]}\n"
        "data: {train: eval.jsonl, eval: eval.jsonl}\neval: {metric: exact_match, max_new_tokens: 1}\n"
    )
    return work / "adapters", work / "run.yaml"


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapters, config = make_adapters(work)
        cli = [PY, "-m", "hybridtune"]
        regimes = {
            "floor: import torch, transformers": [PY, "-c", "import torch, transformers"],
            "floor + load: the model and tokenizer": [PY, "-c", LOAD],
            "hybridtune --help": [*cli, "--help"],
            "hybridtune generate (1 token)": [
                *cli,
                "generate",
                "--adapters",
                str(adapters),
                "--max-new-tokens",
                "1",
                "Hello",
            ],
            "hybridtune eval (4 examples)": [*cli, "eval", str(config), "--adapters", str(adapters)],
        }
        times: dict[str, list[float]] = {name: [] for name in regimes}
        for _ in range(args.rounds):
            for name, command in regimes.items():
                times[name].append(timed(command, work))
    floor = statistics.median(times["floor: import torch, transformers"])
    loaded = statistics.median(times["floor + load: the model and tokenizer"])
    lines = [
        "# Start-up of one-shot commands (cold processes)",
        "",
        f"`python bench/startup.py --rounds {args.rounds}` on {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; median of {args.rounds} interleaved rounds.",
        "",
        "| command | median s | min s | / floor | / floor + load |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {min(values):.2f} | {median / floor:.2f} | {median / loaded:.2f} |")
    lines += [
        "",
        "Targets: `--help` under 1 s; `generate` within 2x of the floor plus the model load.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results" / "startup.md").write_text(text)


if __name__ == "__main__":
    main()
