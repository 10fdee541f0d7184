#!/usr/bin/env bash
# The training-speed checks that need a CUDA GPU, as one run (about 8 minutes on one H200):
#   1. liger's loss and base kernels, compiled for the GPU, against transformers' plain loss, the
#      branches' seeded dropout kernel in bf16, and activation offload (same gradients, peak memory,
#      step time) on a ~1B Llama config;
#   2. bench/train_step.py's GPU regimes (LoRA all-linear + an Adapter against peft's LoRA
#      all-linear, each with and without liger-kernel) on SmolLM2's architecture and on a ~1B
#      Llama config, bf16; tables land in bench/results/*_cuda.md (and in $OUT when set).
#
# On the lent machine (device tool): python3 there has torch, transformers, peft, accelerate,
# typer and triton, not pydantic or liger-kernel. Fetch their wheels here first, into an ignored
# folder that travels with `carry: [".whl"]`:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core annotated-types typing-inspection liger-kernel==0.8.5
#   (pydantic-core: the version pydantic 2.14.4 requires, see its METADATA)
# then run: bash bench/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

python3 - <<'PY'
import torch
import hybridtune as ht
from transformers import AutoModelForCausalLM, LlamaConfig
from hybridtune.core.liger import apply_model_kernels

config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
methods = {"lora": {"type": "lora", "r": 8, "targets": "all-linear"},
           "adapter": {"type": "adapter", "after": "mlp", "reduction_factor": 16}}
ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(0)).cuda()
labels = ids.clone()
labels[:, :100] = -100  # a prompt: rows the head skips
results = {}
for name in ("plain", "liger"):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).cuda()
    if name == "liger":
        apply_model_kernels(base)
    model = ht.inject(base, {"methods": methods})
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters_to_train():
            p.normal_(0, 0.02)
    model.train()
    loss = model(input_ids=ids, labels=labels, use_cache=False, chunked_loss=False if name == "plain" else "liger").loss
    loss.backward()
    results[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
(plain, plain_grads), (liger, liger_grads) = results["plain"], results["liger"]
torch.testing.assert_close(liger, plain, atol=1e-4, rtol=1e-4)
worst = max(((liger_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in plain_grads.items())
assert worst < 1e-2, worst
print(f"liger on CUDA: loss {liger.item():.6f} vs {plain.item():.6f}, worst gradient difference {worst:.2e} of its max")

from hybridtune.kernels.seeded_dropout import SeededDropout  # the branches' dropout kernel, compiled, in bf16
x = torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16)
dropped = SeededDropout.apply(x, 11, 0.25)
kept = dropped != 0
assert torch.equal(dropped[kept], (x[kept].float() * (1 / 0.75)).bfloat16()), "kept values are x / (1 - p)"
assert abs(1 - kept.float().mean().item() - 0.25) < 0.005 and torch.equal(SeededDropout.apply(x, 11, 0.25), dropped)
print(f"seeded dropout on CUDA (bf16): {1 - kept.float().mean().item():.4f} dropped at p 0.25")

import time  # activation offload under checkpointing: same gradients, lower peak, what it costs
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000)
ids = torch.randint(0, 32000, (4, 2048), generator=torch.Generator().manual_seed(0)).cuda()
torch.manual_seed(0)
model = ht.inject(AutoModelForCausalLM.from_config(config).cuda().bfloat16(), {"methods": methods})
model.cast_branches(torch.float32)
model.train()
seen = {}
for offload in (False, True, False, True):
    model.activation_checkpointing_enable(offload_to_cpu=offload)
    for p in model.parameters_to_train():
        p.grad = None
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); start = time.perf_counter()
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False, chunked_loss="torch").loss
    loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    seen[offload] = (loss.item(), grads, torch.cuda.max_memory_allocated() / 2**20, time.perf_counter() - start)
(kept_loss, kept, kept_mb, kept_s), (off_loss, off, off_mb, off_s) = seen[False], seen[True]
assert abs(kept_loss - off_loss) <= 1e-5 * abs(kept_loss), "offload changed the loss"  # SDPA's backward may vary
worst = max(((off[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in kept.items())
assert worst < 1e-2 and off_mb < 0.9 * kept_mb, (worst, kept_mb, off_mb)  # the same gradients, less memory
print(f"offload (1B Llama, 4 x 2048, checkpointing): peak {kept_mb:.0f} -> {off_mb:.0f} MB, "
      f"step {kept_s:.2f} -> {off_s:.2f} s ({off_s / kept_s:.2f}x)")
PY

python3 bench/train_step.py --device cuda --model smollm2-arch --regimes gpu --rounds 2 --steps 10 \
  --warmup 3 --batch 8 --seq 1024 --labelled 0.5
python3 bench/train_step.py --device cuda --model large --regimes gpu --rounds 2 --steps 8 \
  --warmup 3 --batch 4 --seq 1024 --labelled 0.5
if [ -n "${OUT:-}" ]; then cp bench/results/train_step_*_cuda.md "$OUT"/; fi
