"""Generation speed: the base model vs LoRA unmerged, LoRA merged, and an adapter (hybridtune).

python bench/inference.py [--rounds 5] [--new-tokens 64]

Greedy decoding of a batch of 1 with the KV cache, regimes interleaved in rounds; ms per generated
token, median and spread, ratio to the base model measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import hybridtune as ht
from bench.train_step import build_model

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(1))
    models = {"base": build_model("config").eval()}
    lora = {"methods": {"lora": {"type": "lora", "r": 8, "targets": "all-linear"}}}
    for name in ("lora_unmerged", "lora_merged"):
        hybrid = ht.inject(build_model("config").eval(), lora)
        with torch.no_grad():
            for p in hybrid.parameters_to_train():
                p.normal_(0, 0.02)
        if name == "lora_merged":
            hybrid.merge()
        models[name] = hybrid
    models["adapter"] = ht.inject(build_model("config").eval(), {"methods": {"adapter": {"type": "adapter"}}})
    kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
              "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.generate(ids, **kwargs)
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model.generate(ids, **kwargs)
                times[name].append((time.perf_counter() - start) * 1000 / args.new_tokens)
    base = statistics.median(times["base"])
    lines = [
        "# Generation speed (ms per token)",
        "",
        f"Llama config hidden 512, 4 layers, vocab 4096, fp32, batch 1, 32-token prompt, {args.new_tokens} new "
        f"tokens greedy with KV cache, {args.threads} threads, {platform.machine()} CPU; LoRA r8 on all linear "
        f"layers; adapter after every MLP; {args.rounds} interleaved rounds. Command: `python -m bench.inference`.",
        "",
        "| regime | median ms/token | min-max | x base |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {min(values):.2f}-{max(values):.2f} | {median / base:.3f} |")
    text = "\n".join(lines) + "\n"
    (HERE / "results" / "inference.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
