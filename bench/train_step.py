"""Training-step cost of PEFT regimes, hybridtune against peft, in one run on one machine.

python bench/train_step.py [--rounds 3] [--steps 15] [--dropout 0.0] [--model config|smollm2]

Each regime runs in its own process (so peak memory is its own), the regimes are interleaved in
rounds (this machine is shared and noisy), and every ratio is against the floor measured in the
same run: the base model frozen, backward through it down to the input embeddings — the least any
PEFT method can cost. Writes a markdown table to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
REGIMES = ["floor", "full", "peft_lora_qv", "peft_lora_all", "ht_lora_qv", "ht_lora_all", "ht_adapter", "ht_hybrid"]
# AdapterHub's `adapters` pins an older transformers, so these run in their own venv
# (--adapters-python), next to a floor measured with that transformers version.
ADAPTERHUB = ["ah_floor", "ah_lora_qv", "ah_seqbn", "ah_union"]


def build_model(kind: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if kind == "smollm2":
        from hybridtune.models import load_base

        return load_base("smollm2-135m")[0]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def prepare(regime: str, model, dropout: float):
    """The model to train and its trainable parameters, for one regime."""
    lora = {"r": 8, "alpha": 16, "dropout": dropout}
    adapter = {"type": "adapter", "after": "mlp", "reduction_factor": 16}
    if regime in ("floor", "ah_floor"):
        model.requires_grad_(False)
        return model, []
    if regime.startswith("ah_"):
        import adapters
        from adapters import ConfigUnion, SeqBnConfig
        from adapters import LoRAConfig as AHLoRAConfig

        ah_lora = AHLoRAConfig(r=8, alpha=16, dropout=dropout, attn_matrices=["q", "v"])
        ah_seqbn = SeqBnConfig(reduction_factor=16)
        config = {"ah_lora_qv": ah_lora, "ah_seqbn": ah_seqbn, "ah_union": ConfigUnion(ah_lora, ah_seqbn)}[regime]
        adapters.init(model)
        model.add_adapter("bench", config=config)
        model.train_adapter("bench")
        return model, [p for p in model.parameters() if p.requires_grad]
    if regime == "full":
        return model, list(model.parameters())
    if regime.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj"] if regime.endswith("qv") else "all-linear"
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets))
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    import hybridtune as ht

    methods = {
        "ht_lora_qv": {"lora": {"type": "lora", **lora, "targets": ["q_proj", "v_proj"]}},
        "ht_lora_all": {"lora": {"type": "lora", **lora, "targets": "all-linear"}},
        "ht_adapter": {"adapter": adapter},
        "ht_hybrid": {"lora": {"type": "lora", **lora, "targets": ["q_proj", "v_proj"]}, "adapter": adapter},
    }[regime]
    hybrid = ht.inject(model, {"methods": methods})
    return hybrid, hybrid.parameters_to_train()


def child(regime: str, steps: int, warmup: int, dropout: float, kind: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = build_model(kind)
    model.train()
    model, params = prepare(regime, model, dropout)
    vocab = model.config.vocab_size if hasattr(model, "config") else 4096
    ids = torch.randint(0, vocab, (4, 256), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        if regime in ("floor", "ah_floor"):
            embeds = embed(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return {
        "times": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--model", choices=["config", "smollm2"], default="config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--adapters-python", default=None, help="python of a venv with `adapters` installed")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.dropout, args.model, args.threads)))
        return
    regimes = args.regimes.split(",") + (ADAPTERHUB if args.adapters_python else [])
    results: dict[str, dict] = {r: {"times": [], "rounds": [], "peak": [], "trainable": 0} for r in regimes}
    for round_index in range(args.rounds):
        for regime in regimes:
            python = args.adapters_python if regime.startswith("ah_") else sys.executable
            cmd = [python, __file__, "--child", regime, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--dropout", str(args.dropout), "--model", args.model, "--threads",
                   str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            data = json.loads(out)
            results[regime]["times"] += data["times"]
            results[regime]["rounds"].append(statistics.median(data["times"]))
            results[regime]["peak"].append(data["peak_rss_mb"])
            results[regime]["trainable"] = data["trainable"]
            print(f"round {round_index + 1}: {regime}: {results[regime]['rounds'][-1]:.1f} ms/step", file=sys.stderr)
    floor = statistics.median(results["floor"]["times"]) if "floor" in results else None
    ah_floor = statistics.median(results["ah_floor"]["times"]) if "ah_floor" in results else None
    ah_note = (
        [
            "AdapterHub rows (`ah_`, adapters 1.3.0 on its transformers 4.57) are relative to `ah_floor`: the floor "
            "measured with that transformers version in the same run.",
            "",
        ]
        if ah_floor
        else []
    )
    model_desc = ("Llama config hidden 512, 4 layers, intermediate 1376, vocab 4096" if args.model == "config"
                  else "SmolLM2-135M-Instruct (embedded)")  # fmt: skip
    lines = [
        f"# Training step, {args.model} model",
        "",
        f"{model_desc}; batch 4 x 256 tokens, fp32, {args.threads} threads, {platform.machine()} CPU, "
        f"AdamW step included, LoRA r8 alpha 16 dropout {args.dropout}; {args.rounds} interleaved rounds of "
        f"{args.steps} steps (after {args.warmup} warm-up), one process per regime and round. Command: "
        f"`python bench/train_step.py --model {args.model} --dropout {args.dropout} --rounds {args.rounds}`.",
        "",
        *ah_note,
        "| regime | median ms/step | per-round medians | x floor | peak RSS MB | trainable params |",
        "|---|---|---|---|---|---|",
    ]
    for regime, data in results.items():
        median = statistics.median(data["times"])
        reference = ah_floor if regime.startswith("ah_") else floor
        ratio = f"{median / reference:.2f}" if reference else ""
        per_round = " / ".join(f"{v:.0f}" for v in data["rounds"])
        lines.append(f"| {regime} | {median:.1f} | {per_round} | {ratio} | {max(data['peak']):.0f} | "
                     f"{data['trainable']:,} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out_path = HERE / "results" / f"train_step_{args.model}_dropout{args.dropout}.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
