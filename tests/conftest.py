"""Tiny models built from configs (no downloads), one per architecture family we promise to support."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

torch.set_num_threads(2)

_COMMON = dict(vocab_size=97, max_position_embeddings=64)
_LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, **_LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**_COMMON, **_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_COMMON, **_LLAMA_LIKE),
    "gpt2": lambda: GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "gpt_neox": lambda: GPTNeoXConfig(
        **_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ),
}

# Per architecture: its attention projections, its attention block and its FFN block names.
ATTN_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}
ATTN_BLOCK = {
    "llama": "self_attn",
    "qwen2": "self_attn",
    "mistral": "self_attn",
    "gpt2": "attn",
    "gpt_neox": "attention",
}


def make_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


@pytest.fixture
def llama():
    return make_model("llama")


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 12), generator=g)


def randomize(model, std: float = 0.1, seed: int = 7):
    """Give every branch parameter random values, so tests see non-trivial deltas."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, branch in model.branches():
            for p in branch.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
