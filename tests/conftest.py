"""Tiny models built from configs (no downloads), one per architecture family we promise to support."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
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

# Mixture-of-experts families (fused 3-D expert tensors in transformers 5): Qwen3-MoE, Mixtral, and
# Qwen2-MoE with its shared expert (plain linears named like a dense FFN's)
_MOE_SIZES = dict(**_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, output_router_logits=False)  # fmt: skip
_EXPERTS = dict(num_experts=4, moe_intermediate_size=16, intermediate_size=64)
MOE_CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**_MOE_SIZES, **_EXPERTS, head_dim=8),
    "mixtral": lambda: MixtralConfig(**_MOE_SIZES, num_local_experts=4, intermediate_size=16),
    "qwen2_moe": lambda: Qwen2MoeConfig(**_MOE_SIZES, **_EXPERTS, shared_expert_intermediate_size=32),
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
    config = (CONFIGS.get(arch) or MOE_CONFIGS[arch])()
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


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "what color is the sky grass snow coal blood sun ocean leaf cherry night cloud say one word answer red green "
    "blue white black yellow question reply please tell me hello hi assistant user system you are a helpful bot "
    "classify review good bad positive negative movie film great awful the a an is of and to in it this that"
)


def make_tokenizer(chat_template: bool = True):
    """A small byte-level BPE tokenizer trained here, with ChatML special tokens: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [WORDS, WORDS.title(), "\n".join(WORDS.split()), "system user assistant\n:?.,!'"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    if chat_template:
        fast.chat_template = CHATML
    return fast


def save_tiny_lm(directory, seed: int = 0, chat_template: bool = True, tied: bool = False, **sizes):
    """A tiny Llama + tokenizer saved as a normal transformers directory (what `model:` points at);
    ``tied``: one embedding matrix for input and output, as SmolLM2 has; ``sizes`` override
    _LLAMA_LIKE (hidden_size=64, ...) and the 256 positions."""
    tokenizer = make_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(**{
        "vocab_size": len(tokenizer), "max_position_embeddings": 256, "initializer_range": 0.2,
        "tie_word_embeddings": tied, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None, **_LLAMA_LIKE, **sizes,
    })  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_moe(directory, arch: str = "qwen3_moe", **overrides):
    """A tiny MoE model of MOE_CONFIGS + the test tokenizer, saved as a transformers directory."""
    tokenizer = make_tokenizer()
    config = MOE_CONFIGS[arch]()
    config.update(dict(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                       **overrides))  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
          "ocean": "blue", "leaf": "green", "cherry": "red", "night": "black", "cloud": "white"}  # fmt: skip


@pytest.fixture
def project(tmp_path, tiny_lm_dir):
    """A folder with colour-question train/eval files (alpaca JSONL)."""
    rows = [{"instruction": f"what color is the {thing}?", "output": color} for thing, color in COLORS.items()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return tmp_path


def write_config(project, tiny_lm_dir, name="run.yaml", **training):
    config = {
        "model": str(tiny_lm_dir),
        "methods": {
            "lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "dropout": 0.1},
            "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8},
        },
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 64},
        "training": {"batch_size": 4, "lr": 1e-2, "max_steps": 12, "save_every": 3, "seed": 3, "scheduler": "linear",
                     **training},
        "eval": {"max_new_tokens": 3, "batch_size": 8},
        "output": str(project / "runs" / name.removesuffix(".yaml")),
    }  # fmt: skip
    path = project / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def greedy_uncached(model, ids, mask, steps):
    """Greedy decoding the slow way: the whole sequence through ``model`` at every step, no cache.
    What ``generate`` with its KV cache must reproduce."""
    tokens, current = ids, mask
    for _ in range(steps):
        positions = (current.cumsum(-1) - 1).clamp(min=0)
        logits = model(tokens, attention_mask=current, position_ids=positions).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        current = torch.cat([current, torch.ones_like(current[:, :1])], dim=1)
    return tokens


def assert_cached_generate_is_exact(model, padded_row: int):
    """Greedy ``generate`` (KV cache, one left-padded row) gives the tokens of the uncached loop."""
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[padded_row, :2] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_uncached(model, ids, mask, steps=6))


def quiet(*_args, **_kwargs):
    """A ``log=`` that prints nothing."""


def set_keys(path, **top):
    """Set top-level keys of a run YAML written by write_config (model_quantization, fsdp, ...)."""
    raw = yaml.safe_load(path.read_text())
    raw.update(top)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_losses(model, input_ids, steps: int, lr: float) -> list[float]:
    """A few AdamW steps of language modelling on ``input_ids``; the loss of each step."""
    opt = torch.optim.AdamW(model.parameters_to_train(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def free_port() -> int:
    """A loopback port nothing listens on (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_sets(root, base_dir, sets: dict) -> None:
    """Adapter sets ``{name: methods}`` with random weights (seed = their order) on the base in
    ``base_dir``, saved under ``root`` (what a server's adapters directory holds)."""
    import hybridtune as ht
    from hybridtune.core.base_models import load_base

    for seed, (name, methods) in enumerate(sets.items()):
        base, _ = load_base(str(base_dir))
        randomize(ht.inject(base, {"methods": methods}), std=0.5, seed=seed).save_adapters(root / name)


@contextlib.contextmanager
def hybridtune_server(base_dir, adapters_dir, *options, env=None, key=None):
    """`hybridtune serve` in a subprocess on a free loopback port, until the block ends; yields its
    URL once /health answers (with ``key`` as the API key when the server needs one)."""
    import subprocess
    import sys

    import httpx

    port = free_port()
    command = [sys.executable, "-m", "hybridtune", "serve", "--base", str(base_dir), "--adapters-dir",
               str(adapters_dir), "--port", str(port), *options]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def up():
        if process.poll() is not None:
            pytest.fail(f"server exited: {process.stdout.read()}")
        try:
            return httpx.get(f"{url}/health", headers=headers).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, timeout=60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for(condition, timeout=120, every=0.1):
    """Poll ``condition`` until it returns something true (returned), or fail after ``timeout`` s."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def enable_cpu_fp16(setattr=setattr, init_scale: float = 2.0**22, growth_interval: int = 2) -> list:
    """Switch on accelerate's fp16 path for the CPU: autocast to fp16 around the model and a real
    GradScaler (torch has both for the CPU; accelerate enables them only on GPUs, and the recipe
    refuses fp16 without CUDA for that reason). Everything of the recipe's fp16 handling then runs
    here: the scaled backward, unscaling before clipping, skipped steps, the scale across a resume.
    ``setattr``: pytest's ``monkeypatch.setattr`` in a test, the builtin in a torchrun driver.
    Returns the scalers made, one per run."""
    from hybridtune.training import recipe as finetune

    real = finetune.make_accelerator
    scalers = []

    def make_accelerator(config):
        accelerator = real(config)
        assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None  # what accelerate does on a CPU
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
        scalers.append(accelerator.scaler)
        return accelerator

    setattr(finetune, "make_accelerator", make_accelerator)
    setattr(finetune, "environment_problems", lambda config: [])
    return scalers


@pytest.fixture
def browser():
    """Headless Chromium through selenium (Debian's chromium and chromium-driver), or a skip."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("HYBRIDTUNE_REQUIRE_BROWSER"):  # set by .ci/run once it installed them
            pytest.fail("chromium and chromedriver were installed but are not on PATH")
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@contextmanager
def serving(app):
    """``app`` served on a loopback port from a thread of this process (so methods a test
    registers are in its catalog)."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
