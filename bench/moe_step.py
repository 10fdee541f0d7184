"""LoRA on the expert tensors of a mixture-of-experts model: a training step and a generation step,
hybridtune against peft's ``target_parameters`` and the floor, interleaved in one run.

python bench/moe_step.py [--rounds 3] [--steps 6] [--rank 8]

The model is a Qwen3-MoE built from a config (hidden 512, 8 experts, top-2, expert width 512,
4 layers, vocab 4096; random weights: the cost does not depend on the values). Regimes:
- floor: the base frozen, backward through it down to the input embeddings (the least any PEFT
  method can cost), and the base's own generation step;
- peft: peft LoRA with ``target_parameters`` on every expert's gate_up_proj and down_proj (peft
  adds B A for all experts to the 3-D tensors at every forward);
- hybridtune: the same LoRA (rank, tensors) as a hybridtune entry (per-expert deltas on the routed
  pairs only);
- hybridtune + adapter: the same plus a bottleneck Adapter after each MoE block (peft cannot).
Each step time is the median of ``--steps`` steps after one warm-up, per round; the regimes take
turns within each round (this machine is shared and noisy), and every ratio is against the floor
of the same round. Writes bench/results/moe_step.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

HERE = Path(__file__).parent
REGIMES = ["floor", "peft", "hybridtune", "hybridtune + adapter"]
TENSORS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                            head_dim=64, vocab_size=4096, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=512, intermediate_size=1024, max_position_embeddings=512)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def build(regime: str, rank: int) -> torch.nn.Module:
    model = base_model()
    if regime == "floor":
        model.requires_grad_(False)
        return model
    if regime == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[],
                                                target_parameters=TENSORS))  # fmt: skip
    import hybridtune as ht

    methods = {"lora": {"type": "lora", "r": rank, "alpha": 2 * rank, "targets": [t.split(".", 1)[1] for t in TENSORS]}}
    if regime == "hybridtune + adapter":
        methods["adapter"] = {"type": "adapter", "after": "mlp", "bottleneck_size": 64}
    return ht.inject(model, {"methods": methods})


def train_step_ms(model: torch.nn.Module, ids: torch.Tensor, steps: int, floor: bool) -> float:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        if floor:  # backward down to the input embeddings
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def decode_step_ms(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    """One new token for every row, with the KV cache of a prompt (what generation repeats)."""
    model.eval()
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if step:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "moe_step.md")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids = torch.randint(0, 4096, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    models = {regime: build(regime, args.rank) for regime in REGIMES}
    results: dict[str, dict[str, list[float]]] = {r: {"train": [], "decode": []} for r in REGIMES}
    for round_ in range(args.rounds):
        for regime in REGIMES if round_ % 2 == 0 else reversed(REGIMES):
            model = models[regime]
            results[regime]["train"].append(train_step_ms(model, ids, args.steps, floor=regime == "floor"))
            results[regime]["decode"].append(decode_step_ms(model, ids, args.steps * 3))
            print(f"round {round_ + 1} {regime}: train {results[regime]['train'][-1]:.0f} ms, "
                  f"decode {results[regime]['decode'][-1]:.1f} ms", flush=True)  # fmt: skip
    lines = [
        "# LoRA on MoE expert tensors: training and generation step",
        "",
        f"`python bench/moe_step.py --rounds {args.rounds} --steps {args.steps} --rank {args.rank}` on "
        f"{platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}. Qwen3-MoE config: "
        "hidden 512, 4 layers, 8 experts, top-2, expert width 512, vocab 4096; fp32. LoRA rank "
        f"{args.rank} on every expert's gate_up_proj and down_proj; training batch {args.batch} x {args.length}; "
        f"decode: one token per row with the cache of a {args.length}-token prompt. Medians per round; ratios "
        "are against the floor of the same round, then the median over rounds.",
        "",
        "| regime | train step (ms) | x floor | decode step (ms) | x floor |",
        "|---|---|---|---|---|",
    ]

    def ratio(regime: str, other: str, kind: str) -> float:
        return statistics.median(t / o for t, o in zip(results[regime][kind], results[other][kind], strict=True))

    for regime in REGIMES:
        lines.append(f"| {regime} | {statistics.median(results[regime]['train']):.0f} | "
                     f"{ratio(regime, 'floor', 'train'):.2f} | {statistics.median(results[regime]['decode']):.1f} | "
                     f"{ratio(regime, 'floor', 'decode'):.2f} |")  # fmt: skip
    lines += ["", f"hybridtune / peft: training step {ratio('hybridtune', 'peft', 'train'):.2f}x, "
              f"decode step {ratio('hybridtune', 'peft', 'decode'):.2f}x (lower is faster)."]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
