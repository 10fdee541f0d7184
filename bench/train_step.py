"""Training-step cost of PEFT regimes, hybridtune against peft, in one run on one machine.

python bench/train_step.py [--rounds 3] [--steps 15] [--dropout 0.0] [--model config|smollm2|large]
python bench/train_step.py --device cuda --model smollm2-arch   # bf16 on a GPU (see --help)

Each regime runs in its own process (so peak memory is its own), the regimes are interleaved in
rounds (this machine is shared and noisy), and every ratio is against the floor measured in the
same run: the base model frozen, backward through it down to the input embeddings — the least any
PEFT method can cost. Writes a markdown table to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
REGIMES = ["floor", "full", "peft_lora_qv", "peft_lora_all", "ht_lora_qv", "ht_lora_all", "ht_adapter", "ht_hybrid",
           "floor_chunked", "ht_hybrid_chunked"]  # fmt: skip
# `_chunked`: the same regime with the LM head + loss computed in chunks (training.chunked_loss), so
# no [batch, seq, vocab] logits are held; `floor_chunked` is the floor with that loss
# AdapterHub's `adapters` pins an older transformers, so these run in their own venv
# (--adapters-python), next to a floor measured with that transformers version, and hybridtune's
# own adapter regimes in that venv too (ah_ht_*), so peak memory compares on the same transformers.
ADAPTERHUB = ["ah_floor", "ah_lora_qv", "ah_seqbn", "ah_union", "ah_ht_adapter", "ah_ht_hybrid"]
# the GPU comparison (LoRA all-linear + an Adapter against peft's LoRA all-linear), named
# with --regimes; `_liger`: liger-kernel's RMSNorm, rotary and SwiGLU kernels and its fused linear
# cross-entropy (peft: applied to the model as transformers' Trainer does with use_liger_kernel;
# hybridtune: training.liger_kernels + loss_kernel liger). liger's kernels need CUDA.
GPU_REGIMES = ["floor", "floor_chunked", "peft_lora_all", "peft_lora_all_liger", "ht_lora_all_adapter_chunked",
               "ht_lora_all_adapter_liger"]  # fmt: skip


# Config-built Llama models: the small CPU model, SmolLM2-135M's architecture (random
# weights: step cost does not depend on the values, and no weights need to travel to a GPU
# machine), and a larger one for GPUs.
CONFIGS = {
    "config": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=4096),
    "smollm2-arch": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "large": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32000),
}  # fmt: skip
DESCRIPTIONS = {
    "config": "Llama config hidden 512, 4 layers, intermediate 1376, vocab 4096",
    "smollm2": "SmolLM2-135M-Instruct (embedded)",
    "smollm2-arch": "SmolLM2-135M's architecture built from its config (random weights)",
    "large": "Llama config hidden 2048, 16 layers, intermediate 5504, vocab 32000",
}


def build_model(kind: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if kind == "smollm2":
        from hybridtune.core.base_models import load_base

        return load_base("smollm2-135m")[0]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(max_position_embeddings=2048, **CONFIGS[kind]))


def prepare(regime: str, model, dropout: float):
    """The model to train and its trainable parameters, for one regime."""
    lora = {"r": 8, "alpha": 16, "dropout": dropout}
    regime = regime.removesuffix("_chunked")
    if regime.endswith("_liger"):
        regime = regime.removesuffix("_liger")
        if regime.startswith("peft"):
            from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model)  # its defaults: the fused linear cross-entropy too
        else:
            from hybridtune.core.liger import apply_model_kernels

            apply_model_kernels(model)
    adapter = {"type": "adapter", "after": "mlp", "reduction_factor": 16}
    if regime.startswith("ah_ht_"):
        regime = regime.removeprefix("ah_")
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
        "ht_lora_all_adapter": {"lora": {"type": "lora", **lora, "targets": "all-linear"}, "adapter": adapter},
    }[regime]
    hybrid = ht.inject(model, {"methods": methods})
    return hybrid, hybrid.parameters_to_train()


def child(regime: str, steps: int, warmup: int, dropout: float, kind: str, threads: int, device: str,
          batch: int, seq: int, labelled: float = 1.0) -> dict:  # fmt: skip
    import torch

    torch.set_num_threads(threads)
    cuda = device == "cuda"
    model = build_model(kind)
    if cuda:  # bf16 base, fp32 trainable weights (full fine-tune: fp32 too), bf16 autocast
        model = model.to("cuda", torch.float32 if regime == "full" else torch.bfloat16)
    model.train()
    model, params = prepare(regime, model, dropout)
    if cuda:  # like peft's default on a half-precision base (autocast_adapter_dtype): fp32 trainables
        for p in params:
            p.data = p.data.float()
    vocab = model.config.vocab_size if hasattr(model, "config") else 4096
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.clone()
    labels[:, : seq - round(seq * labelled)] = -100  # an SFT batch: the prompt is not trained
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None) if params else None
    embed = model.get_input_embeddings()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        one_step(regime, model, embed, ids, labels, optimizer, autocast)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    profiled = lambda: one_step(regime, model, embed, ids, labels, optimizer)  # noqa: E731
    tensors = None if cuda else tensor_peak_mb(model, optimizer, profiled)
    return {"times": times, "peak_rss_mb": peak, "peak_tensor_mb": tensors, "trainable": sum(p.numel() for p in params)}


def one_step(regime: str, model, embed, ids, labels, optimizer, autocast=None) -> None:
    """Forward, backward, AdamW. No KV cache: training has no use for one, and a cache keeps the
    keys and values of layers that need no gradient alive until the step ends."""
    with autocast or contextlib.nullcontext():
        if regime == "floor_chunked":
            from hybridtune.core.chunked_loss import chunked_causal_lm_forward

            embeds = embed(ids).detach().requires_grad_(True)
            loss = chunked_causal_lm_forward(
                model, (), {"inputs_embeds": embeds, "labels": labels, "use_cache": False}, "torch"
            ).loss
        elif regime in ("floor", "ah_floor"):
            embeds = embed(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=labels, use_cache=False).loss
        else:
            # `_chunked`: the chunked loss's torch kernel (never liger's, even where it is installed)
            chunked = {"chunked_loss": "torch"} if regime.endswith("_chunked") else {}
            if regime.startswith("ht_") and regime.endswith("_liger"):
                chunked = {"chunked_loss": "liger"}
            loss = model(input_ids=ids, labels=labels, use_cache=False, **chunked).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def tensor_peak_mb(model, optimizer, step) -> float:
    """Peak bytes held by tensors during one training step: the weights, buffers and optimizer
    state alive before it, plus the highest point of torch's own allocations within it (from the
    profiler's memory events). Unlike the resident set, this does not move with the allocator's
    caching or with what the process imported, so two libraries' regimes compare exactly."""
    from torch.profiler import ProfilerActivity, profile

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}  # fmt: skip
    if optimizer is not None:
        for state in optimizer.state.values():
            storages.update({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                             for v in state.values() if hasattr(v, "untyped_storage")})  # fmt: skip
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    level = peak = 0
    # each op's own net allocations (children excluded), and "[memory]" events for frees outside ops
    changes = [(e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
               for e in prof.events() if e.device_type.name == "CPU"]  # fmt: skip
    for _, change in sorted(changes):
        level += change
        peak = max(peak, level)
    return (sum(storages.values()) + peak) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--model", choices=["smollm2", *CONFIGS], default="config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 base + autocast")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--labelled", type=float, default=1.0,
                        help="share of each row's tokens with a label (the rest: a prompt, -100)")  # fmt: skip
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated; gpu: GPU_REGIMES")
    parser.add_argument("--adapters-python", default=None, help="python of a venv with `adapters` installed")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.dropout, args.model, args.threads,
                               args.device, args.batch, args.seq, args.labelled)))  # fmt: skip
        return
    named = GPU_REGIMES if args.regimes == "gpu" else args.regimes.split(",")
    regimes = named + (ADAPTERHUB if args.adapters_python else [])
    results: dict[str, dict] = {
        r: {"times": [], "rounds": [], "peak": [], "tensor_peak": [], "trainable": 0} for r in regimes
    }
    for round_index in range(args.rounds):
        for regime in regimes:
            python = args.adapters_python if regime.startswith("ah_") else sys.executable
            cmd = [python, __file__, "--child", regime, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--dropout", str(args.dropout), "--model", args.model, "--threads",
                   str(args.threads), "--device", args.device, "--batch", str(args.batch), "--seq",
                   str(args.seq), "--labelled", str(args.labelled)]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}  # hybridtune for ah_ht_* in the other venv
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            data = json.loads(out.strip().splitlines()[-1])
            results[regime]["times"] += data["times"]
            results[regime]["rounds"].append(statistics.median(data["times"]))
            results[regime]["peak"].append(data["peak_rss_mb"])
            results[regime]["tensor_peak"].append(data["peak_tensor_mb"] or 0.0)
            results[regime]["trainable"] = data["trainable"]
            print(f"round {round_index + 1}: {regime}: {results[regime]['rounds'][-1]:.1f} ms/step", file=sys.stderr)
    floor = statistics.median(results["floor"]["times"]) if "floor" in results else None
    ah_floor = statistics.median(results["ah_floor"]["times"]) if "ah_floor" in results else None
    ah_note = (
        [
            "AdapterHub rows (`ah_`, adapters 1.3.0 on its transformers 4.57) are relative to `ah_floor`: the floor "
            "measured with that transformers version in the same run. `ah_ht_` rows are hybridtune's own regimes run "
            "in that venv, so their peak memory compares with AdapterHub's on the same transformers.",
            "",
        ]
        if ah_floor
        else []
    )
    cuda = args.device == "cuda"
    if cuda:
        import torch

        where = (f"{torch.cuda.get_device_name()}, bf16 base weights with fp32 trainable weights (full fine-tune: "
                 "fp32 weights) under bf16 autocast, fused AdamW")  # fmt: skip
    else:
        where = f"fp32, {args.threads} threads, {platform.machine()} CPU"
    command = (
        f"python bench/train_step.py --model {args.model} --dropout {args.dropout} --rounds {args.rounds} "
        f"--steps {args.steps} --warmup {args.warmup}"
    )
    command += f" --batch {args.batch} --seq {args.seq}" + (" --device cuda" if cuda else "")
    if args.labelled != 1.0:
        command += f" --labelled {args.labelled}"
    if args.regimes != ",".join(REGIMES):
        command += f" --regimes {args.regimes}"
    peak_name = "peak GPU MB" if cuda else "peak RSS MB"
    lines = [
        f"# Training step, {args.model} model" + (" on a GPU" if cuda else ""),
        "",
        f"{DESCRIPTIONS[args.model]}; batch {args.batch} x {args.seq} tokens"
        + (f" ({args.labelled:.0%} of each row labelled, the rest a prompt)" if args.labelled != 1.0 else "")
        + f", {where}, AdamW step included, LoRA "
        f"r8 alpha 16 dropout {args.dropout}; {args.rounds} interleaved rounds of {args.steps} steps (after "
        f"{args.warmup} warm-up), one process per regime and round. Command: `{command}`.",
        "",
        *ah_note,
        *(
            []
            if cuda
            else [
                "`peak tensor MB`: the weights, buffers and optimizer state plus the highest point of "
                "torch's allocations during one profiled step (exact and repeatable, unlike the resident set).",
                "",
            ]
        ),
        f"| regime | median ms/step | per-round medians | x floor | tokens/s | {peak_name} |"
        + ("" if cuda else " peak tensor MB |")
        + " trainable params |",
        "|---|---|---|---|---|---|" + ("" if cuda else "---|") + "---|",
    ]
    for regime, data in results.items():
        median = statistics.median(data["times"])
        reference = ah_floor if regime.startswith("ah_") else floor
        ratio = f"{median / reference:.2f}" if reference else ""
        per_round = " / ".join(f"{v:.0f}" for v in data["rounds"])
        tokens = args.batch * args.seq / (median / 1000)
        tensors = "" if cuda else f" {max(data['tensor_peak']):.1f} |"
        lines.append(f"| {regime} | {median:.1f} | {per_round} | {ratio} | {tokens:,.0f} | {max(data['peak']):.0f} |"
                     f"{tensors} {data['trainable']:,} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    suffix = "_cuda" if cuda else ""
    if args.labelled != 1.0:
        suffix = f"_labelled{args.labelled}{suffix}"
    out_path = HERE / "results" / f"train_step_{args.model}_dropout{args.dropout}{suffix}.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
