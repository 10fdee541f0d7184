"""The training engine of a run: accelerate's Accelerator set up from the YAML.

Processes come from the launcher (``torchrun``, ``accelerate launch``); DDP, FSDP2 and DeepSpeed
are accelerate's and PyTorch's. This file only translates the run config into their settings and
checks, before any model loads, that the machine can do what the config asks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import parse_flag_from_env
from pydantic import ValidationError

from ..core.attach import iter_branches, move_input_hook_last
from ..core.model import HybridModel
from ..core.quantization import DTYPES, quantization_problems
from ..core.validation import describe_errors
from .base_setup import kernel_problems
from .run_config import ConfigError, FSDPConfig, RunConfig


def environment_problems(config: RunConfig) -> list[str]:
    """What this machine cannot do of what ``config`` asks (empty when it can)."""
    t = config.training
    problems = quantization_problems(config.model_quantization)
    if not torch.cuda.is_available():
        if t.precision == "fp16":
            problems.append(
                "training.precision: fp16 (with loss scaling) needs a CUDA GPU; use bf16 or fp32 on this machine"
            )
        if t.base_dtype == "fp16":
            problems.append("training.base_dtype: fp16 weights need a CUDA GPU; use bf16 or fp32 on this machine")
    asked = launcher_precision()
    if asked not in (None, "bf16", "fp16"):
        problems.append(f"accelerate launch --mixed_precision {asked}: hybridtune trains in fp32, bf16 or fp16")
    elif asked is not None and t.precision != "auto" and t.precision != asked:
        problems.append(
            f"training.precision: {t.precision}, but accelerate launch asks for --mixed_precision {asked}; "
            "make them agree (or leave training.precision at auto)"
        )
    if not torch.cuda.is_available() and asked == "fp16" and t.precision == "auto":
        problems.append("accelerate launch --mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    problems += kernel_problems(config)
    launcher = launcher_deepspeed()
    if launcher is not None and config.deepspeed is not None:
        problems.append(
            "deepspeed: DeepSpeed is set twice, by the accelerate launch config and by the YAML's 'deepspeed' key; "
            "keep one"
        )
    if launcher is not None and config.fsdp is not None:
        problems.append("fsdp: accelerate launch asks for DeepSpeed; give either 'fsdp' or DeepSpeed, not both")
    if launcher is not None and config.model_quantization is not None:
        problems.append(
            "model_quantization is for one GPU per process (DDP); accelerate launch asks for DeepSpeed, which "
            "cannot shard it"
        )
    source = config.deepspeed if config.deepspeed is not None else launcher
    if source is not None:
        if importlib.util.find_spec("deepspeed") is None:
            problems.append('deepspeed: the deepspeed package is not installed: pip install "hybridtune[deepspeed]"')
        if isinstance(source, Path) and not source.is_file():
            problems.append(f"deepspeed: config file '{source}' does not exist")
    return problems


# accelerate's FSDP1 sharding strategies (by name or number) and FSDP2's booleans, as hybridtune's
# FSDP2 reshard_after_forward; the others (no sharding, hybrid sharding) it does not do
_RESHARD = {"true": True, "full_shard": True, "1": True, "false": False, "shard_grad_op": False, "2": False}


def launcher_fsdp() -> FSDPConfig | None:
    """FSDP as ``accelerate launch --use_fsdp`` (or an accelerate config's fsdp section) asks for
    it, as the YAML's ``fsdp:`` section: resharding after forward and CPU offload are taken from
    the launcher (activation checkpointing too, see ``with_launcher_fsdp``); the wrapping is
    hybridtune's own (each transformer layer with its branches), so the launcher's wrap policy,
    prefetch and state-dict settings do not apply. None when the launcher asked for no FSDP."""
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return None
    if os.environ.get("FSDP_VERSION", "1") == "1":  # accelerate reads FSDP1's strategy from here
        setting = "--fsdp_sharding_strategy"
        reshard = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").lower()
    else:
        setting = "--fsdp_reshard_after_forward"
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in _RESHARD:
        raise ConfigError(
            [f"accelerate launch: FSDP {setting} '{reshard}' is not one hybridtune's FSDP2 sharding does "
             "(true/FULL_SHARD or false/SHARD_GRAD_OP); without sharding, launch without --use_fsdp (DDP)"]
        )  # fmt: skip
    offload = parse_flag_from_env("FSDP_OFFLOAD_PARAMS")
    return FSDPConfig(reshard_after_forward=_RESHARD[reshard], cpu_offload=offload)


def with_launcher_fsdp(config: RunConfig) -> RunConfig:
    """``config`` with the FSDP the launcher asked for as its ``fsdp`` section (validated like one
    written there), and its ``--fsdp_activation_checkpointing`` as ``training.gradient_checkpointing``;
    asking for FSDP in both places is an error, as for DeepSpeed."""
    fsdp = launcher_fsdp()
    if fsdp is None:
        return config
    if config.fsdp is not None:
        raise ConfigError(["fsdp: FSDP is set twice, by accelerate launch and by the YAML's 'fsdp' key; keep one"])
    raw = {**config.dump(), "fsdp": fsdp.model_dump()}
    if parse_flag_from_env("FSDP_ACTIVATION_CHECKPOINTING"):
        raw["training"] = {**raw.get("training", {}), "gradient_checkpointing": True}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(
            [f"accelerate launch asks for FSDP: {problem}" for problem in describe_errors(error)]
        ) from None


def launcher_deepspeed() -> dict[str, Any] | Path | None:
    """DeepSpeed as ``accelerate launch`` asks for it (the deepspeed section of its config arrives
    as environment variables): the DeepSpeed JSON it names, or the settings it passes (ZeRO stage,
    offload devices) with the rest "auto". None when the launcher asked for no DeepSpeed."""
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        return Path(path)
    from accelerate import DeepSpeedPlugin

    return DeepSpeedPlugin().deepspeed_config


def deepspeed_source(config: RunConfig) -> dict[str, Any] | Path | None:
    """The run's DeepSpeed config as given: the YAML's ``deepspeed`` key or the launcher's."""
    return config.deepspeed if config.deepspeed is not None else launcher_deepspeed()


def mixed_precision(config: RunConfig) -> str:
    """accelerate's mixed_precision for the run. ``auto``: the compute dtype of a quantized base;
    else what ``accelerate launch --mixed_precision`` asked for; else bf16 on a GPU with bf16 units
    (Ampere and newer), fp16 with loss scaling on an older one (V100, T4: torch would run bf16
    there, emulated and slow), full precision on the CPU."""
    precision = config.training.precision
    if precision == "auto":
        quant = config.model_quantization
        if quant is not None:
            return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[quant.compute_dtype]
        launcher = launcher_precision()
        if launcher is not None:
            return launcher
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def launcher_precision() -> str | None:
    """``accelerate launch --mixed_precision`` (or its config's), when it asks for half precision.
    Its "no" is also the launcher's default, so it is no choice; "fp8" is returned for the error."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return None if value == "no" else value


def base_dtype(config: RunConfig) -> torch.dtype | None:
    """Storage dtype of the frozen base. ``auto``: the half dtype the run computes in when on a GPU
    (frozen weights need no fp32 copy), fp32 on the CPU; a quantized base keeps its own choice."""
    choice = config.training.base_dtype
    if choice != "auto":
        return DTYPES[choice]
    if config.model_quantization is not None:
        return None
    if torch.cuda.is_available() and config.fsdp is None:
        return DTYPES.get(mixed_precision(config), torch.float32)  # "no" (full precision): fp32
    return torch.float32


def _processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config(config: RunConfig, processes: int) -> dict[str, Any]:
    """The run's DeepSpeed config with what the YAML decides filled in where it says "auto" or
    nothing: the batch per process, the accumulation steps, the clipping norm. A value it sets
    differently from the YAML is an error naming both, never a silent choice of one.

    Any ZeRO stage: under ZeRO-3 the base is partitioned as it loads, the branches when the engine
    is made (see ``Run._build_model``); evaluation runs on every process and adapter saving gathers
    (``checkpoint.adapter_state``).
    """
    ds = deepspeed_source(config)
    ds = json.loads(ds.read_text()) if isinstance(ds, Path) else dict(ds)
    t = config.training
    decided = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * processes,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
    }
    problems = []
    for key, value in decided.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif given != value:
            problems.append(
                f"deepspeed: '{key}' is {given!r} in the DeepSpeed config, but the YAML's training settings give "
                f'{value!r}; write "auto" there (the YAML decides) or make them agree'
            )
    precision = mixed_precision(config)
    for half in ("bf16", "fp16"):  # the YAML's precision decides these too
        given = (ds.get(half) or {}).get("enabled", "auto")
        if given != "auto" and bool(given) != (precision == half):
            problems.append(
                f"deepspeed: '{half}.enabled' is {given!r} in the DeepSpeed config, but training.precision gives "
                f"{config.training.precision!r} ({precision if precision != 'no' else 'fp32'} here); "
                'write "auto" there or make them agree'
            )
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed: zero_optimization.stage {stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    elif stage == 0 and precision != "no":
        problems.append(
            f"deepspeed: ZeRO stage 0 in {precision} keeps its fp32 master weights where they cannot be read back for "
            "checkpoints; use stage 1, 2 or 3, or leave out 'deepspeed' (DDP) for one copy per process"
        )
    if problems:
        raise ConfigError(problems)
    ds.setdefault("zero_allow_untested_optimizer", True)  # the recipe's own torch AdamW
    return ds


def make_accelerator(config: RunConfig) -> Accelerator:
    # accelerate keeps one state per process; a second run in the same process (a notebook, the
    # tests) may ask for another precision or accumulation, so start from a clean one. The
    # distributed state (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    kwargs = {}
    deepspeed = deepspeed_source(config) is not None
    if deepspeed:
        from accelerate import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(config, _processes()))
        if not torch.cuda.is_available():  # else accelerate sees no backend and counts one process
            from accelerate.utils import InitProcessGroupKwargs

            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    # gradient accumulation is the recipe's own (token-weighted windows), not accelerate's; so is
    # the schedule's length (in optimizer steps of the global batch): accelerate must not step the
    # scheduler once per process
    launcher_flag = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    # the launcher's FSDP is the run's own fsdp section (with_launcher_fsdp): accelerate must not wrap the model too
    fsdp_flag = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        return Accelerator(
            mixed_precision=mixed_precision(config),
            step_scheduler_with_optimizer=False,
            # several processes without CUDA: accelerate's gloo backend, which it uses only when asked
            # (DeepSpeed brings its own: gloo through its CPU accelerator)
            cpu=_processes() > 1 and not torch.cuda.is_available() and not deepspeed,
            **kwargs,
        )
    finally:  # given a plugin, accelerate marks the process as launched for DeepSpeed: a later run here must not be
        if launcher_flag is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = launcher_flag
        if fsdp_flag is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp_flag


def shard(model: HybridModel, config: RunConfig, device: torch.device) -> None:
    """FSDP2: ``fully_shard`` each transformer layer (the classes the model names in
    ``_no_split_modules``, so a layer's branches are sharded and gathered with it), then the rest.

    PyTorch's own API rather than accelerate's FSDP path, which only engages on GPUs: the same
    code then runs on CPU processes (gloo, in the tests) and on GPUs (NCCL). Parameters stay
    fp32 and sharded; a half ``training.precision`` becomes FSDP's mixed-precision policy.

    Only the first process holds the weights (loaded on the CPU; fully_shard moves them to
    ``device`` a layer at a time as it shards); the others built the model on the meta device
    (``models.load_skeleton``), so no process but the first ever holds the whole model. They
    allocate their shards on ``device`` (the CPU with ``cpu_offload``) and receive them, and the
    buffers, from the first.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    base = model.base_model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ConfigError([f"fsdp: cannot tell the transformer layers of {type(base).__name__} (no _no_split_modules)"])
    kwargs: dict = {"reshard_after_forward": config.fsdp.reshard_after_forward}
    if config.fsdp.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())  # pinning needs CUDA
    half = DTYPES.get(mixed_precision(config))  # None when the run computes in full precision
    if half is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    contiguous_parameters(model)
    several = dist.is_initialized() and dist.get_world_size() > 1
    first = not several or dist.get_rank() == 0
    if several:  # the first process's loaded model and the others' skeletons must match, tied weights included
        layouts = [None] * dist.get_world_size()
        dist.all_gather_object(layouts, [(name, tuple(p.shape)) for name, p in model.named_parameters()])
        if any(layout != layouts[0] for layout in layouts):
            raise RuntimeError("fsdp: the processes built models with different parameters (names, shapes or tying)")
    full = model.state_dict() if first and several else {}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(base, **kwargs)
    if not several:
        return
    if not first:  # fully_shard placed the first process's tensors itself (sharded params offloaded or not)
        model.to_empty(device=torch.device("cpu") if config.fsdp.cpu_offload else device)
        if config.fsdp.cpu_offload:  # the parameters' shards live on the CPU, the buffers where compute is
            for module in model.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.to(device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    for buffer in model.buffers():  # not in the state dict when non-persistent (rotary frequencies)
        dist.broadcast(buffer, src=0)


def reshard(model: HybridModel) -> None:
    """Put FSDP2 weights back into their shards after forwards without a backward (eval, generate).
    With ``reshard_after_forward: false`` FSDP keeps them gathered until a backward that never
    comes, with the gathered tensors registered as the module's parameters: an optimizer made then
    held those copies, which no gradient reaches (the stage silently learned nothing), and saving
    its state crashed."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def full_weights_at_load(accelerator: Accelerator) -> Iterator[None]:
    """Under ZeRO-3, transformers builds every model inside ``deepspeed.zero.Init``, whose
    partitioning is a collective of all processes. That is what the run's base wants (each process
    only ever holds its part), but not a load that one process does alone: converting the embedded
    GGUF model into the cache. Such loads go in this block."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or getattr(plugin, "dschf", None) is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:  # generate's synced_gpus and transformers' other ZeRO-3 paths need it afterwards
        set_hf_deepspeed_config(plugin.dschf)


def zero3_input_branches(model: HybridModel) -> None:
    """ZeRO-3 gathers a module's own weights in a forward pre-hook added when the engine is made,
    which runs after the branches' input hooks (prompt, prefix, IA3 on FFN inputs) and does not
    cover their weights. So: their weights become the target's external parameters (gathered
    with it, and kept gathered: they are small), and the input hook moves after DeepSpeed's. The
    same for branches that run inside their target (MoE experts and routers): the target's own
    forward reads their weights without calling them."""
    import deepspeed

    for *_, target, branch in iter_branches(model):
        if branch.modifies_input or branch.runs_inside:
            for param in branch.parameters():
                deepspeed.zero.register_external_parameter(target, param)
        if branch.modifies_input:
            move_input_hook_last(target)


def contiguous_parameters(model: HybridModel) -> None:
    """FSDP and DeepSpeed flatten or shard parameters as contiguous tensors; LoRA's B is stored
    transposed for the speed of one matmul (see the LoRA branch's forward), so give them plain copies."""
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
