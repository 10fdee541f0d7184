"""Mixed-batch serving: 8 rows over 4 adapter sets in one pass vs looping set by set.

Run: python bench/mixed_batch.py [--rounds 7] [--out bench/results/mixed_batch.md]
The two regimes are interleaved in every round (this machine is shared and noisy); the table
reports medians and the spread over rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hybridtune as ht

SETS = {
    "qv_r8": {"lora": {"type": "lora", "r": 8, "targets": ["q_proj", "v_proj"]}},
    "all_r16": {"lora": {"type": "lora", "r": 16, "targets": "all-linear"}},
    "hybrid": {"lora": {"type": "lora", "r": 8, "targets": ["q_proj", "v_proj"]},
               "adapter": {"type": "adapter", "after": "mlp", "reduction_factor": 16}},
    "q_r4": {"lora": {"type": "lora", "r": 4, "targets": ["q_proj"]}},
}  # fmt: skip


def build() -> ht.HybridModel:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)  # fmt: skip
    names = list(SETS)
    model = ht.inject(AutoModelForCausalLM.from_config(config).eval(), {"methods": SETS[names[0]]}, set_name=names[0])
    for name in names[1:]:
        model.add_set(name, {"methods": SETS[name]})
    with torch.no_grad():
        for name in names:
            with model.using(name):
                for p in model.parameters_to_train():
                    p.normal_(0, 0.02)
    return model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mixed_batch.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build()
    names = list(SETS)
    rows = [names[i % 4] for i in range(8)]  # 2 rows per set, interleaved
    ids = torch.randint(0, 4096, (8, args.seq), generator=torch.Generator().manual_seed(1))
    groups = {name: [i for i, r in enumerate(rows) if r == name] for name in names}

    def mixed_forward():
        model(ids, adapter_sets=rows)

    def loop_forward():
        for name, idx in groups.items():
            with model.using(name):
                model(ids[idx])

    def mixed_generate():
        model.generate(
            ids, adapter_sets=rows, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens
        )

    def loop_generate():
        for name, idx in groups.items():
            with model.using(name):
                model.generate(
                    ids[idx], max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens
                )

    regimes = {"forward, mixed batch": mixed_forward, "forward, set by set": loop_forward,
               "generate, mixed batch": mixed_generate, "generate, set by set": loop_generate}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in regimes}
    with torch.no_grad():
        for fn in regimes.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in regimes.items():
                times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# Mixed-batch serving: 8 rows over 4 adapter sets",
        "",
        f"Machine: {platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}. "
        f"Model: Llama config hidden 512, 4 layers, vocab 4096, fp32; batch 8 x {args.seq} tokens; "
        f"generate {args.new_tokens} new tokens greedy. Sets: {', '.join(names)} (ranks 8/16/8+adapter/4). "
        f"{args.rounds} interleaved rounds; command: `python bench/mixed_batch.py`.",
        "",
        "| regime | median ms | min-max ms | set by set / mixed |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        kind = name.split(",")[0]
        ratio = med[f"{kind}, set by set"] / med[f"{kind}, mixed batch"] if "mixed" in name else None
        lines.append(f"| {name} | {med[name]:.1f} | {min(values):.1f}-{max(values):.1f} | "
                     f"{f'{ratio:.2f}x' if ratio else ''} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
