"""The quantized-base recipe with real bitsandbytes 4-bit layers.

bitsandbytes can run its 4-bit layers on the CPU (slowly), so these tests exercise the whole
QLoRA path here: loading, k-bit preparation, LoRA + Adapter on Linear4bit layers, training,
saving, reloading, eval-mode inference and the merge refusal. hybridtune itself refuses quantized
bases without CUDA (the CPU path is far too slow for real use), so the tests lift that one check.
The same run on a GPU is in bench/memory.py (results in bench/results/memory_cuda.md).

The model is wide enough for bitsandbytes' blocks (every layer's input a multiple of its 64-wide
quantization blocks, every output a multiple of 32): on CPUs with avx512_bf16, bitsandbytes runs
4-bit layers in eval mode through a packed-weight kernel that needs that (a narrower model fails
there with "shape '[32, 0]' is invalid"), on other CPUs through its plain path. Both must give
what training mode gives, so the tests pass or fail the same on either kind of CPU; the eval-mode
test's failure message names the path this machine took.
"""

import pytest
import torch
from safetensors.torch import load_file

import hybridtune as ht
from conftest import quiet, save_tiny_lm, set_keys, write_config
from hybridtune.core.base_models import load_base
from hybridtune.core.errors import MergeError
from hybridtune.core.quantization import QuantizationConfig, is_quantized
from hybridtune.training import launch as engine
from hybridtune.training.data_prep import prepare_data
from hybridtune.training.evaluation import eval_loss
from hybridtune.training.recipe import train
from hybridtune.training.run_config import load_run_config

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def wide_lm_dir(tmp_path_factory):
    """Layers 64 and 128 wide: whole quantization blocks (see the module docstring)."""
    return save_tiny_lm(tmp_path_factory.mktemp("wide-lm"), hidden_size=64, intermediate_size=128)


@pytest.fixture
def cpu_quantization(monkeypatch):
    import hybridtune.core.base_models

    for module in (hybridtune.core.base_models, engine):
        monkeypatch.setattr(module, "quantization_problems", lambda config: [])


def test_qlora_hybrid_trains_saves_and_reloads(project, wide_lm_dir, cpu_quantization):
    quantization = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
    config = load_run_config(set_keys(write_config(project, wide_lm_dir, max_steps=6), model_quantization=quantization))
    result = train(config, log=quiet)
    assert result.summary["after"]["eval_loss"] < result.summary["before"]["eval_loss"] - 1.0
    weights = load_file(result.adapters_dir / "hybridtune_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # branches trained and saved in fp32

    base, tokenizer = load_base(str(wide_lm_dir), quantization=config.model_quantization, device="cpu")
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and is_quantized(q_proj)
    model = ht.load(base, result.adapters_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the run evaluated
        reloaded = eval_loss(model, prepare_data(config, tokenizer).eval, tokenizer.pad_token_id, 8)
    assert reloaded["eval_loss"] == pytest.approx(result.summary["after"]["eval_loss"], rel=1e-4)
    with pytest.raises(MergeError, match="quantized \\(Params4bit\\)"):
        model.merge()


def test_4bit_hybrid_in_eval_mode_matches_training_mode(wide_lm_dir, tmp_path, cpu_quantization):
    """What a user does after training: model.eval(), then inference without gradients, generation,
    and saving the adapters afterwards. On avx512_bf16 CPUs bitsandbytes would send that inference
    through a packed bf16 kernel with no backward (0.13 off on these logits): load_base keeps its
    training path, so eval mode computes what training computes (core/quantization.py)."""
    quantization = QuantizationConfig(bits=4, compute_dtype="fp32")
    base, tokenizer = load_base(str(wide_lm_dir), quantization=quantization, device="cpu")
    cfg = ht.HybridConfig(methods={
        "lora": ht.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
        "adapter": ht.AdapterConfig(bottleneck_size=8, after="mlp"),
    })  # fmt: skip
    model = ht.inject(base, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, _, _, branch in model.branches():
            for p in branch.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(3))
    model.train()
    with torch.no_grad():
        reference = model(input_ids=ids).logits  # training mode: bitsandbytes' plain path
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-3, atol=1e-3)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, 12)
    model.save_adapters(tmp_path / "adapters")
    fresh, _ = load_base(str(wide_lm_dir), quantization=quantization, device="cpu")
    reloaded = ht.load(fresh, tmp_path / "adapters")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=1e-3, atol=1e-3)


def test_8bit_config_loads_int8_layers(tiny_lm_dir, cpu_quantization):
    base, _ = load_base(str(tiny_lm_dir), quantization=QuantizationConfig(bits=8), device="cpu")
    layer = base.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt) and is_quantized(layer)


def test_hybrid_trainer_on_a_4bit_base_checkpoints_adapters_and_resumes(wide_lm_dir, tmp_path, cpu_quantization):
    """transformers' Trainer on a QLoRA hybrid with its default checkpointing: the checkpoints hold
    the adapters only (no 4-bit base copy), ht.load reads them into a fresh 4-bit base, and a
    resumed run ends where the uninterrupted one did."""
    from transformers import TrainingArguments

    quantization = QuantizationConfig(bits=4, compute_dtype="fp32")
    cfg = {"methods": {"lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
                       "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8}}}  # fmt: skip

    def hybrid():
        torch.manual_seed(0)
        return ht.inject(load_base(str(wide_lm_dir), quantization=quantization, device="cpu")[0], cfg)

    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, 90, (8, 10), generator=g)]

    def args(out):
        return TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=3)  # fmt: skip

    model = hybrid()
    ht.HybridTrainer(model=model, args=args(tmp_path / "full"), train_dataset=rows).train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert "model.safetensors" not in {p.name for p in checkpoint.iterdir()}
    final = load_file(tmp_path / "full" / "checkpoint-4" / "hybridtune_model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}

    loaded = ht.load(load_base(str(wide_lm_dir), quantization=quantization, device="cpu")[0],
                     tmp_path / "full" / "checkpoint-4")  # fmt: skip
    model.eval()
    x = rows[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)

    resumed = hybrid()
    ht.HybridTrainer(model=resumed, args=args(tmp_path / "resumed"), train_dataset=rows).train(
        resume_from_checkpoint=str(checkpoint)
    )
    ours = load_file(tmp_path / "resumed" / "checkpoint-4" / "hybridtune_model.safetensors")
    assert ours.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(ours[key], final[key], rtol=1e-5, atol=1e-6)
