"""ONNX export: merged LoRA plus an unmergeable Adapter in the graph, checked with onnxruntime."""

import json

import pytest
import torch
from typer.testing import CliRunner

import hybridtune as ht
from conftest import make_model, randomize
from hybridtune.cli import app
from hybridtune.core.base_models import load_base
from hybridtune.interop.onnx_export import export_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

METHODS = {
    "lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8},
}


def test_export_keeps_the_adapter_in_the_graph_and_matches_pytorch(tmp_path):
    hybrid = randomize(ht.inject(make_model("llama"), {"methods": METHODS}), std=0.3)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = hybrid(input_ids=ids, attention_mask=mask).logits
        plain = make_model("llama")(input_ids=ids, attention_mask=mask).logits
    check = export_onnx(hybrid, tmp_path)
    assert check["ok"] and check["entries_in_graph"] == ["adapter"]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    keep = mask.bool()
    torch.testing.assert_close(torch.from_numpy(logits)[keep], expected[keep], atol=1e-4, rtol=1e-4)
    assert (expected[keep] - plain[keep]).abs().max() > 0.1  # the adapters matter: the match is not trivial


def test_cli_export_onnx(tmp_path, tiny_lm_dir):
    base, _ = load_base(str(tiny_lm_dir))
    randomize(ht.inject(base, {"methods": METHODS}), std=0.3).save_adapters(tmp_path / "adapters")
    result = CliRunner().invoke(app, ["export", "--adapters", str(tmp_path / "adapters"), "--format", "onnx",
                                      "--out", str(tmp_path / "onnx")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "entries in the graph: adapter" in result.output
    check = json.loads((tmp_path / "onnx" / "onnx_check.json").read_text())
    assert check["ok"] and check["max_abs_logit_difference"] <= check["tolerance"]
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
