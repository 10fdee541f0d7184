"""The quantized-base recipe with real bitsandbytes 4-bit layers.

bitsandbytes can run its 4-bit layers on the CPU (slowly), so these tests exercise the whole
QLoRA path here: loading, k-bit preparation, LoRA + Adapter on Linear4bit layers, training,
saving, reloading, and the merge refusal. hybridtune itself refuses quantized bases without CUDA
(the issue's rule: the CPU path is far too slow for real use), so the tests lift that one check.
The same run on a GPU is in bench/memory.py (results in bench/results/memory_cuda.md).
"""

import pytest
import torch
from safetensors.torch import load_file

import hybridtune as ht
from conftest import quiet, set_keys, write_config
from hybridtune.errors import MergeError
from hybridtune.evaluation import eval_loss
from hybridtune.models import load_base
from hybridtune.quantization import QuantizationConfig, is_quantized
from hybridtune.recipes import engine
from hybridtune.recipes.finetune import prepare_data, train
from hybridtune.run_config import load_run_config

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def cpu_quantization(monkeypatch):
    import hybridtune.models

    for module in (hybridtune.models, engine):
        monkeypatch.setattr(module, "quantization_problems", lambda config: [])


def test_qlora_hybrid_trains_saves_and_reloads(project, tiny_lm_dir, cpu_quantization):
    quantization = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
    config = load_run_config(set_keys(write_config(project, tiny_lm_dir, max_steps=6), model_quantization=quantization))
    result = train(config, log=quiet)
    assert result.summary["after"]["eval_loss"] < result.summary["before"]["eval_loss"] - 1.0
    weights = load_file(result.adapters_dir / "hybridtune_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # branches trained and saved in fp32

    base, tokenizer = load_base(str(tiny_lm_dir), quantization=config.model_quantization, device="cpu")
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and is_quantized(q_proj)
    model = ht.load(base, result.adapters_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the run evaluated
        reloaded = eval_loss(model, prepare_data(config, tokenizer).eval, tokenizer.pad_token_id, 8)
    assert reloaded["eval_loss"] == pytest.approx(result.summary["after"]["eval_loss"], rel=1e-4)
    with pytest.raises(MergeError, match="quantized \\(Params4bit\\)"):
        model.merge()


def test_8bit_config_loads_int8_layers(tiny_lm_dir, cpu_quantization):
    base, _ = load_base(str(tiny_lm_dir), quantization=QuantizationConfig(bits=8), device="cpu")
    layer = base.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt) and is_quantized(layer)
