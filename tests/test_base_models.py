"""How the embedded model's conversion stores its weights: each tensor once, a tied head under the
input embeddings' name, so loaders that tie weights themselves (vLLM) find every weight."""

import json

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import make_model
from hybridtune.core.base_models import tensors_once


def test_a_tied_head_is_stored_as_the_input_embeddings_and_loads_back_exactly(tmp_path):
    model = make_model("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tensors = tensors_once(model)
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    assert set(tensors) == set(model.state_dict()) - {"lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 30, 60]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True


def test_an_untied_model_keeps_every_tensor():
    model = make_model("llama", tie_word_embeddings=False)
    assert set(tensors_once(model)) == set(model.state_dict())
