"""liger-kernel's fused linear cross-entropy as the chunked loss's kernel (core/chunked_loss.py):
the same loss and gradients as transformers' plain loss and as the torch kernel, through the
model's normal call; chosen by ``auto`` on CUDA only; refused by name where it cannot run.

Its Triton kernels run here, on the CPU, under Triton's interpreter (``TRITON_INTERPRET=1``, read
when the kernels are defined, so in a process of their own)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hybridtune.core.chunked_loss as chunked
from conftest import write_config
from hybridtune.cli import app
from hybridtune.training.launch import environment_problems
from hybridtune.training.run_config import load_run_config

pytest.importorskip("liger_kernel", reason="the [liger] extra (in [test])")

HERE = Path(__file__).parent
COMPARE = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import hybridtune as ht
import liger_kernel.transformers as liger
from conftest import make_model, randomize
from test_chunked_loss import METHODS, batch, loss_and_grads

calls = []
original = liger.LigerFusedLinearCrossEntropyLoss.forward
liger.LigerFusedLinearCrossEntropyLoss.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)

model = randomize(ht.inject(make_model("llama"), {"methods": METHODS}))
model.train()
plain, plain_grads = loss_and_grads(model)
ours, ours_grads = loss_and_grads(model, chunked_loss="torch")
theirs, theirs_grads = loss_and_grads(model, chunked_loss="liger")
assert len(calls) == 1, calls  # liger computed the last loss, nothing else did
assert theirs.logits is None and plain_grads.keys() == theirs_grads.keys() and plain_grads
for reference, grads in ((plain.loss, plain_grads), (ours.loss, ours_grads)):
    torch.testing.assert_close(theirs.loss, reference, atol=1e-6, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(theirs_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
unlabelled = {**batch(), "labels": torch.full((3, 11), -100)}
assert float(model(**unlabelled, chunked_loss="liger").loss) == 0.0  # as the torch kernel: no label, no loss
print("same", float(theirs.loss))
"""


def test_liger_loss_and_gradients_equal_the_plain_loss_and_the_torch_kernel():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", COMPARE, str(HERE)], env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("same ")


def test_auto_is_liger_on_cuda_only_and_torch_without_liger(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert chunked.resolve_loss_kernel("auto", torch.device("cuda")) == "liger"
    assert chunked.resolve_loss_kernel("auto", torch.device("cpu")) == "torch"
    assert chunked.resolve_loss_kernel("torch", torch.device("cuda")) == "torch"
    find_spec = chunked.importlib.util.find_spec
    without_liger = lambda name, *rest: None if name == "liger_kernel" else find_spec(name, *rest)  # noqa: E731
    monkeypatch.setattr(chunked.importlib.util, "find_spec", without_liger)
    assert chunked.resolve_loss_kernel("auto", torch.device("cuda")) == "torch"
    assert "pip install 'hybridtune[liger]'" in chunked.liger_usable(torch.device("cuda"))


def test_liger_where_it_cannot_run_is_one_line_naming_the_key(project, tiny_lm_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["train", str(write_config(project, tiny_lm_dir, loss_kernel="liger"))])
    assert result.exit_code == 2, result.output
    assert "training.loss_kernel: liger, but its Triton kernels need a CUDA device, not cpu; use auto or torch" in (
        result.output
    )
    assert not (project / "runs").exists()  # refused before anything ran
    plain = load_run_config(write_config(project, tiny_lm_dir, loss_kernel="liger", chunked_loss=False))
    assert environment_problems(plain) == []  # no chunked loss: no kernel to run it
