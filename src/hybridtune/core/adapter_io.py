"""Adapter checkpoints: one directory, a JSON that describes everything, one safetensors file.

Keys are ``{entry}.{target module}.{parameter}``, so two entries never collide. The JSON records
the method configs, the library version, the base model's identity, the targeted modules' shapes
and the weights file's sha256, so a load can say exactly what does not fit. Files are written to
a temporary name and renamed; nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .attach import describe_target
from .config import HybridConfig
from .errors import CheckpointError, TargetError
from .partitioned import gathered
from .validation import describe_errors

CONFIG_NAME = "hybridtune_config.json"
WEIGHTS_NAME = "hybridtune_model.safetensors"
FORMAT = "hybridtune-adapters"
FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: temporary files and folders get the modes a plain open()/mkdir() would


def normal_mode(path: str | Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or folder (0700) the permissions of an ordinary new one, before
    it is renamed into place: a run directory's files must not end up with mixed modes."""
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def base_identity(model: nn.Module) -> dict[str, Any]:
    """What adapters record of their base: its name, type, and a sample of its input embedding's
    values, so the same weights are recognised under any name or path (see ``check_base``)."""
    config = getattr(model, "config", None)
    identity = {
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None),
    }
    sample = weights_sample(model)
    if sample is not None:
        identity["embedding_sample"] = sample
    return identity


_SAMPLE_SIZE = 64


def _plain(weight: Any) -> bool:
    """A whole local floating tensor (not meta, not partitioned, sharded or quantized)."""
    return (type(weight) in (torch.Tensor, nn.Parameter) and weight.device.type != "meta"
            and not hasattr(weight, "ds_id") and weight.dtype.is_floating_point)  # fmt: skip


def _values(weight: torch.Tensor, count: int) -> list[float]:
    flat = weight.detach().reshape(-1)
    picks = (torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // max(count - 1, 1)).to(flat.device)
    return [round(float(v), 6) for v in flat[picks].double().cpu()]


def weights_sample(model: nn.Module) -> dict[str, Any] | None:
    """The shape and 64 evenly spaced values of the input embedding, and 8 values of each of the
    first and last four weight matrices by name: enough to tell the same weights (up to dtype
    rounding; a 4-bit load keeps its embedding) from a fine-tune that changed some layers. None
    where the embedding is not a plain local tensor (meta, sharded)."""
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if callable(get) else None
    if not _plain(weight):
        return None
    # not the layers branches sit on: a merge changes those (and a save may follow a merge)
    targeted = {n for n, m in model.named_modules() if any(c == "hybridtune" for c, _ in m.named_children())}
    matrices = [(n, p) for n, p in model.named_parameters()
                if p.dim() == 2 and p is not weight and ".hybridtune." not in n and _plain(p)
                and n.rsplit(".", 1)[0] not in targeted]  # fmt: skip
    chosen = dict(matrices[:4] + matrices[-4:])
    return {"shape": list(weight.shape), "values": _values(weight, _SAMPLE_SIZE),
            "matrices": {n: _values(p, 8) for n, p in chosen.items()}}  # fmt: skip


def same_weights(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    """Whether two samples are of the same weights (to bf16 rounding); None: unknown, or of
    different shapes (a different architecture, which check_targets names module by module)."""
    if not a or not b or a["shape"] != b["shape"]:
        return None
    pairs = [(a["values"], b["values"])]
    pairs += [(v, b["matrices"][n]) for n, v in a.get("matrices", {}).items() if n in b.get("matrices", {})]
    for left, right in pairs:
        x, y = torch.tensor(left), torch.tensor(right)
        if not torch.allclose(x, y, rtol=1e-2, atol=1e-2 * float(x.abs().max()) + 1e-8):
            return False
    return True


def state_key(entry: str, target: str, name: str) -> str:
    """``{entry}.{target module}.{parameter}``; a branch on the model itself has no module part."""
    return ".".join(part for part in (entry, target, name) if part)


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The active set's tensors on the CPU, by checkpoint key. Under FSDP (DTensor shards) and
    DeepSpeed ZeRO-3 (partitioned parameters) the branch weights are gathered here, so every
    process must call this together."""
    branches = list(model.branches())
    state = {}
    with gathered([p for *_, branch in branches for p in branch.parameters()]):
        for entry, target, _, branch in branches:
            params = dict(branch.named_parameters())
            for name, tensor in branch.state_dict().items():
                master = fp32_master(params.get(name))
                if master is not None:
                    tensor = master
                elif hasattr(tensor, "full_tensor"):
                    tensor = tensor.full_tensor()
                state[state_key(entry, target, name)] = tensor.detach().to("cpu").contiguous()
    return state


def fp32_master(param: nn.Parameter | None) -> torch.Tensor | None:
    """The full fp32 master copy DeepSpeed's bf16/fp16 optimizers keep of a weight they train
    (the module itself then holds a half-precision copy); None for anything else. A collective
    under ZeRO: every process calls it for the same weights."""
    if param is None or not param.requires_grad or param.dtype == torch.float32:
        return None
    if not (hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer")):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def save_adapters(model: Any, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the config JSON and the weights; ``state`` is ``adapter_state(model)`` when the caller
    gathered it already (multi-process runs, where only one process writes)."""
    directory = Path(directory)
    from .. import __version__

    weights = save_safetensors(adapter_state(model) if state is None else state, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hybridtune_version": __version__,
        "base_model": base_identity(model.base_model),
        "targets": model.targets,
        "fingerprint": model.fingerprint,
        "methods": model.hybrid_config.to_dict()["methods"],
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    atomic_write(directory / WEIGHTS_NAME, weights)
    atomic_write(directory / CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return directory


def not_an_adapter_dir(directory: Path) -> str:
    """Why ``directory`` is not an adapter directory, with the likely one when it is nearby (a run
    directory holds its adapters in ``adapters/``)."""
    problem = f"no {CONFIG_NAME} in '{directory}': not a hybridtune adapter directory"
    if not directory.exists():
        return f"{problem} (it does not exist)"
    if not directory.is_dir():
        return f"{problem} (it is a file)"
    nearby = [p.parent for p in directory.glob(f"*/{CONFIG_NAME}")]
    nearby.sort(key=lambda p: (p.name != "adapters", str(p)))
    return f"{problem}; did you mean {nearby[0]}?" if nearby else problem


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(not_an_adapter_dir(Path(directory)))
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated (not valid JSON: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hybridtune adapter config (format should be '{FORMAT}')")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta['format_version']}, newer than this hybridtune "
            f"understands ({FORMAT_VERSION}); upgrade hybridtune"
        )
    return meta


def read_weights(directory: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = Path(directory) / meta.get("weights_file", WEIGHTS_NAME)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    data = path.read_bytes()
    expected = meta.get("weights_sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"{path} is corrupt or truncated: its sha256 does not match the one recorded in {CONFIG_NAME}"
        )
    try:
        return load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is corrupt or truncated: {exc}") from exc


def check_base(
    model: nn.Module, meta: dict[str, Any], allow_base_mismatch: bool, config: HybridConfig | None = None
) -> None:
    """Refuse a base the adapters were not trained on: another model type, then (with ``config``)
    modules that differ from the saved targets, then other weights (the same weights under another
    name or path are fine)."""
    saved, here = meta.get("base_model", {}), base_identity(model)
    if saved.get("model_type") and here["model_type"] and saved["model_type"] != here["model_type"]:
        raise CheckpointError(
            f"these adapters were trained on a '{saved['model_type']}' model ({saved.get('name_or_path') or 'unnamed'})"
            f", but the base model given is a '{here['model_type']}'"
        )
    if config is not None:
        check_targets(model, config, meta)
    if allow_base_mismatch:
        return
    same = same_weights(saved.get("embedding_sample"), here.get("embedding_sample"))
    names_differ = saved.get("name_or_path") and here["name_or_path"] and saved["name_or_path"] != here["name_or_path"]
    if same is False or (same is None and names_differ):  # the same weights by another name or path are fine
        how = "different weights" if same is False else "a different name, and its weights could not be compared"
        raise CheckpointError(
            f"these adapters were trained on base model '{saved.get('name_or_path') or 'unnamed'}', but the base "
            f"model given is '{here['name_or_path'] or 'unnamed'}' ({how}); pass allow_base_mismatch=True if that "
            "is intended"
        )


def check_targets(base: nn.Module, config: HybridConfig, meta: dict[str, Any]) -> None:
    """Compare the modules the config selects on this base with the ones recorded at save time."""
    here: dict[str, Any] = {}
    for entry, cfg in config.methods.items():
        try:
            chosen = cfg.select_targets(base, entry)
        except TargetError as exc:
            raise CheckpointError(
                f"the base model does not fit these adapters (a different base model?): {exc}"
            ) from exc
        here.update({name: describe_target(module) for name, module in chosen})
    saved: dict[str, Any] = meta.get("targets", {})
    missing = sorted(set(saved) - set(here))
    if missing:
        raise CheckpointError(
            f"the base model has no module(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            "that these adapters were trained on: a different base model"
        )
    for name, desc in saved.items():
        if desc != here[name]:
            now = here[name]
            raise CheckpointError(
                f"module '{name}' is {now['class']} with weight shape {now['shape']} in this base model, but "
                f"the adapters were trained on {desc['class']} with shape {desc['shape']}: a different base model"
            )


def load_state(model: Any, state: dict[str, torch.Tensor], entries: list[str], source: str) -> None:
    """Copy ``{entry}.{target}.{param}`` tensors into the entries' branches, checking every key."""
    expected: dict[str, torch.Tensor] = {}
    for entry in entries:
        for _, target, _, branch in model.branches(entry):
            for name, tensor in branch.state_dict(keep_vars=True).items():
                expected[state_key(entry, target, name)] = tensor
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}")
    for key, target in expected.items():
        if state[key].shape != target.shape:
            entry, _, rest = key.partition(".")
            module, _, param = rest.rpartition(".")
            raise CheckpointError(
                f"{source}: entry '{entry}' at module '{module or '(the model)'}': '{param}' has shape "
                f"{list(state[key].shape)} "
                f"in the checkpoint but {list(target.shape)} in the model"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(dtype=target.dtype, device=target.device))
    for entry in entries:
        for _, _, _, branch in model.branches(entry):
            branch.after_load()


def saved_config(directory: str | Path, meta: dict[str, Any] | None = None) -> HybridConfig:
    """The method entries saved in ``directory`` (its config read unless ``meta`` is given),
    validated; nothing is loaded."""
    meta = read_meta(directory) if meta is None else meta
    try:
        return HybridConfig.model_validate({"methods": meta.get("methods")})
    except ValidationError as exc:
        problems = "; ".join(describe_errors(exc))
        raise CheckpointError(f"the method configs in {directory}/{CONFIG_NAME} are invalid: {problems}") from exc
