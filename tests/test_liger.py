"""liger-kernel's kernels (core/liger.py): its fused linear cross-entropy as the chunked loss's
kernel, and its RMSNorm / rotary / SwiGLU kernels in the base of a hybrid. Each gives the same loss
and gradients as the model without them, through the model's normal call and through a whole
`hybridtune train`; ``auto`` picks liger's loss on CUDA only; both are refused by name where they
cannot run.

The Triton kernels run here, on the CPU, under Triton's interpreter (``TRITON_INTERPRET=1``, read
when the kernels are defined, and liger patches transformers' classes: so in processes of their
own)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hybridtune.core.chunked_loss as chunked
import hybridtune.core.liger as liger
from conftest import make_model, make_tokenizer, set_keys, write_config
from hybridtune.cli import app
from hybridtune.training.launch import environment_problems
from hybridtune.training.run_config import load_run_config
from hybridtune.training.tracking import read_metrics

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
# a hybrid (LoRA on every linear layer, an Adapter after every MLP) on a base with liger's kernels,
# against the same hybrid on a plain base (computed first: liger patches the rotary function globally)
MODEL_KERNELS = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import triton_floats  # noqa: F401  (liger's RMSNorm under the interpreter)
import hybridtune as ht
from conftest import make_model, randomize
from test_chunked_loss import batch, loss_and_grads
from transformers.models.llama import modeling_llama
from hybridtune.core.liger import apply_model_kernels

methods = {"lora": {"type": "lora", "r": 4, "targets": "all-linear"},
           "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8}}
plain = randomize(ht.inject(make_model("llama"), {"methods": methods}))
plain.train()
expected, expected_grads = loss_and_grads(plain)
base = make_model("llama")
apply_model_kernels(base)
fused = randomize(ht.inject(base, {"methods": methods}))
fused.train()
layer = base.model.layers[0]
assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
assert layer.mlp.forward.__func__.__module__.startswith("liger_kernel")
assert layer.input_layernorm.forward.__func__.__module__.startswith("liger_kernel")
got, grads = loss_and_grads(fused)
torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
assert grads.keys() == expected_grads.keys()
assert any("adapter" in n for n in grads) and any("mlp.down" in n for n in grads)
for name in grads:
    torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
print("same", float(got.loss))
"""
TRAIN = r"""
import atexit
import sys
sys.path.insert(0, sys.argv[1])
import triton_floats  # noqa: F401
import hybridtune.training.base_setup as base_setup
from hybridtune.cli import main
applied = []
apply = base_setup.apply_model_kernels
base_setup.apply_model_kernels = lambda model: applied.append(type(model).__name__) or apply(model)
atexit.register(lambda: print("liger kernels applied to", applied))
sys.argv = ["hybridtune", "train", sys.argv[2]]
main()
"""


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(HERE), *args], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_liger_loss_and_gradients_equal_the_plain_loss_and_the_torch_kernel():
    result = run_python(COMPARE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("same ")


def test_liger_base_kernels_leave_a_hybrids_loss_and_gradients_unchanged():
    result = run_python(MODEL_KERNELS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("same ")


@pytest.mark.slow
def test_a_run_with_liger_kernels_trains_as_the_run_without(project, tiny_lm_dir):
    """The whole `hybridtune train`, liger's loss and base kernels against the torch loss and the
    plain base: the same loss at every step (dropout masks come from the same seed)."""
    losses = {}
    for name, fused in (("plain", False), ("liger", True)):
        kernels = {"liger_kernels": fused, "loss_kernel": "liger" if fused else "torch"}
        path = write_config(project, tiny_lm_dir, f"{name}.yaml", max_steps=3, save_every=3, **kernels)
        set_keys(path, eval={"max_new_tokens": 2, "batch_size": 8, "max_samples": 2})
        result = run_python(TRAIN, str(path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"liger kernels applied to {['LlamaForCausalLM'] if fused else []}" in result.stdout
        run = project / "runs" / name
        assert json.loads((run / "summary.json").read_text())["loss_kernel"] == ("liger" if fused else "torch")
        losses[name] = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    assert len(losses["liger"]) == 3
    assert losses["liger"] == pytest.approx(losses["plain"], rel=1e-4)


def test_auto_is_liger_on_cuda_only_and_torch_without_liger(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert chunked.resolve_loss_kernel("auto", torch.device("cuda")) == "liger"
    assert chunked.resolve_loss_kernel("auto", torch.device("cpu")) == "torch"
    assert chunked.resolve_loss_kernel("torch", torch.device("cuda")) == "torch"
    find_spec = liger.importlib.util.find_spec
    without_liger = lambda name, *rest: None if name == "liger_kernel" else find_spec(name, *rest)  # noqa: E731
    monkeypatch.setattr(liger.importlib.util, "find_spec", without_liger)
    assert chunked.resolve_loss_kernel("auto", torch.device("cuda")) == "torch"
    assert "pip install 'hybridtune[liger]'" in liger.liger_problem(torch.device("cuda"))


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
    kernels = load_run_config(write_config(project, tiny_lm_dir, liger_kernels=True))
    assert environment_problems(kernels) == [
        "training.liger_kernels: true, but its Triton kernels need a CUDA device, not cpu; remove the key"
    ]


def test_liger_kernels_for_a_model_they_do_not_fit_are_refused_once_it_loads(project, tiny_lm_dir, monkeypatch):
    from transformers import LlamaConfig

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the kernels could run
    make_model("gpt2").save_pretrained(project / "gpt2")
    make_tokenizer().save_pretrained(project / "gpt2")
    path = set_keys(write_config(project, tiny_lm_dir, liger_kernels=True), model=str(project / "gpt2"))
    assert environment_problems(load_run_config(path)) == []  # the machine could run them
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert "training.liger_kernels: true, but liger-kernel has no kernels for model type 'gpt2'; remove the key" in (
        result.output
    )
    assert liger.model_kernels_problem(LlamaConfig(hidden_act="gelu")) == (
        "liger's SwiGLU computes SiLU, and this llama model's hidden_act is 'gelu'"
    )
    assert liger.model_kernels_problem(LlamaConfig()) is None


def test_liger_loss_with_fp16_is_refused_and_auto_takes_the_torch_kernel(project, tiny_lm_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = load_run_config(write_config(project, tiny_lm_dir, loss_kernel="liger", base_dtype="fp16"))
    assert environment_problems(config)[-1].startswith("training.loss_kernel: liger with fp16: liger writes")
    assert chunked.resolve_loss_kernel("auto", torch.device("cuda"), fp16=True) == "torch"
    hidden, weight = torch.randn(4, 8, dtype=torch.float16), torch.randn(16, 8, dtype=torch.float16)
    assert chunked._half_precision(hidden, weight) and not chunked._half_precision(hidden.float(), weight.float())
