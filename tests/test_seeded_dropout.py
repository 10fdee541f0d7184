"""The seeded dropout kernel (kernels/seeded_dropout.py), run by Triton's interpreter on the CPU:
its mask is a fair draw at rate p, scaled by 1/(1 - p), the same for the same seed; its backward
applies exactly the forward's mask; and inside a hybrid it is what the branches' input dropout
uses, with activation checkpointing's recompute drawing the same masks (the same gradients as
without checkpointing)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton (the [liger] extra, in [test]; CUDA builds of torch bring it)")

HERE = Path(__file__).parent
CHECKS = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import hybridtune as ht
from conftest import make_model, randomize
from test_chunked_loss import batch, loss_and_grads
from hybridtune.kernels.seeded_dropout import SeededDropout, kernel_runs_on
from hybridtune.methods.dropout import SharedDropout

p = 0.3
x = torch.randn(200_003, dtype=torch.float64).float().requires_grad_(True)
assert kernel_runs_on(x)
out = SeededDropout.apply(x, 1234, p)
ratio = out.detach() / x.detach()
kept = (ratio - 1 / (1 - p)).abs() < 1e-5
assert bool((kept | (ratio == 0)).all())  # every element is 0 or x / (1 - p)
assert abs(1 - float(kept.float().mean()) - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5  # 5 sigma
assert torch.equal(SeededDropout.apply(x.detach(), 1234, p), out.detach())  # the seed's mask
assert not torch.equal(SeededDropout.apply(x.detach(), 1235, p), out.detach())
weights = torch.randn(x.shape)
(out * weights).sum().backward()
torch.testing.assert_close(x.grad, weights * kept / (1 - p), atol=1e-6, rtol=1e-6)  # the same mask again

half = x.detach()[:4096].half()  # (the interpreter cannot load bf16: bench/gpu_checks.sh checks it on a GPU)
dropped = SeededDropout.apply(half, 7, 0.5)
assert dropped.dtype == torch.float16
assert bool(((dropped == 0) | (dropped == half * 2)).all()) and bool((dropped != 0).any())

shared = SharedDropout(p)
inputs = torch.randn(3, 5, 64, requires_grad=True)
masked = shared(inputs, True)
assert type(masked.grad_fn).__name__ == "SeededDropoutBackward"  # the branches' dropout is the kernel
assert shared(inputs, True) is masked  # siblings reading the same input share it

methods = {"lora": {"type": "lora", "r": 4, "targets": ["q_proj", "v_proj", "down_proj"], "dropout": 0.3},
           "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8}}
model = randomize(ht.inject(make_model("llama"), {"methods": methods}))
model.train()
torch.manual_seed(5)
plain, plain_grads = loss_and_grads(model)
torch.manual_seed(6)
other, _ = loss_and_grads(model)
assert not torch.equal(other.loss, plain.loss)  # dropout acts
model.activation_checkpointing_enable()
torch.manual_seed(5)
again, grads = loss_and_grads(model)
torch.testing.assert_close(again.loss, plain.loss, atol=0, rtol=0)
assert grads.keys() == plain_grads.keys() and grads
for name in grads:
    torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)
print("ok")
"""


def test_seeded_dropout_under_the_interpreter():
    result = subprocess.run([sys.executable, "-c", CHECKS, str(HERE)], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_on_the_cpu_without_the_interpreter_dropout_stays_the_torch_mask(monkeypatch):
    import torch

    from hybridtune.kernels.seeded_dropout import kernel_runs_on
    from hybridtune.methods.dropout import SharedDropout

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 8, requires_grad=True)
    assert not kernel_runs_on(x)
    assert type(SharedDropout(0.5)(x, True).grad_fn).__name__ == "MulBackward0"


def test_a_kernel_that_cannot_launch_falls_back_to_the_torch_mask_once(monkeypatch, caplog):
    import torch

    import hybridtune.kernels.seeded_dropout as seeded
    from hybridtune.methods.dropout import SharedDropout

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the kernel would run
    monkeypatch.setattr(seeded, "_failed", [])
    x = torch.randn(4, 8, requires_grad=True)
    assert seeded.kernel_runs_on(x)
    monkeypatch.setenv("HYBRIDTUNE_TRITON_KERNELS", "0")
    assert not seeded.kernel_runs_on(x)  # switched off
    monkeypatch.delenv("HYBRIDTUNE_TRITON_KERNELS")

    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(seeded, "_apply", no_compiler)
    dropped = SharedDropout(0.5)(x, True)
    assert type(dropped.grad_fn).__name__ == "MulBackward0"  # the torch mask instead
    assert "the Triton dropout kernel cannot run here (RuntimeError: Failed to find C compiler)" in caplog.text
    assert not seeded.kernel_runs_on(x)  # not tried again
