"""What every PEFT method provides: a validated config and a branch module.

A *branch* is a small nn.Module attached to one target module of the base model. After the target
runs, each of its branches gets the target's inputs and output and returns the new output. That
one contract covers additive methods (LoRA: output + B A x), wrappers (Adapter: f(output)) and
rescalers (IA3), and leaves the base model's module tree and names untouched.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..core.routing import replace_rows
from ..core.validation import StrictModel

# Hints for the web UI's generated forms, given as ``Field(json_schema_extra=...)``: they land in
# the config's JSON schema, and the page offers the model's own modules for these fields.
LINEAR_TARGETS = {"ui": "linear_targets"}  # linear layer names: a checkbox per linear layer of the model
BLOCKS = {"ui": "blocks"}  # sub-module names of a layer (self_attn, mlp, ...): a checkbox each
PER_TARGET = {"ui": "per_target"}  # {target: number}: an optional number beside each checked target


class MethodConfig(StrictModel):
    """Base of every method's config. Unknown keys are errors that name the closest valid key."""

    type: str
    # What the method can do: the core, recipe, CLI, interop and UI read these, never a method's name.
    mergeable: ClassVar[bool] = False  # its branches fold into the base weights (merge_into / unmerge_from)
    identity_at_init: ClassVar[bool] = True  # False for methods that change outputs from the start (prompts)
    supports_routing: ClassVar[bool] = True  # False: cannot serve a different adapter set per row
    supports_packing: ClassVar[bool] = True  # False: cannot train on rows packed with several examples
    supports_quantized_base: ClassVar[bool] = True  # False: needs the full-precision weights it targets
    # True: each branch's effect is exactly W + scale · B @ A on its target, and the branch is a
    # LoRABranch-like module: A, B (the active directions), lora_A / lora_B (the stored tensors),
    # scale, rank, alpha, transposed, delta_weight(); the config has use_rslora and dropout.
    # Set merging and rank search read these; the config class also provides exact(ranks, alphas)
    # (a config targeting exactly those modules) and stack_deltas(parts) (one exact LoRA for several).
    linear_low_rank: ClassVar[bool] = False
    # peft's name for the method whose adapter files this method reads and writes (``peft_type`` in
    # adapter_config.json), or None: no peft equivalent. Such a config implements the peft_* hooks
    # below; interop/peft_format.py handles the files and peft's generic keys.
    peft_type: ClassVar[str | None] = None
    peft_tensor_names: ClassVar[tuple[str, ...]] = ()  # the tensors peft saves per module ("lora_A.weight")
    # The keys of a LLaMA-Factory training YAML this method reads (from_llamafactory), with
    # LLaMA-Factory's defaults for them; training/llamafactory_yaml.py asks every registered method.
    llamafactory_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def example(cls) -> MethodConfig:
        """A small config for a Llama-style model; every registered method provides one, so the
        contract test suite (tests/test_method_contract.py) covers it automatically."""
        raise NotImplementedError(f"{cls.__name__} must provide example()")

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs of ``model`` this entry attaches a branch to."""
        raise NotImplementedError

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> Branch:
        """A freshly initialised branch for target ``name``; its parameters follow the target's
        dtype and device."""
        raise NotImplementedError

    def begin_attach(self) -> None:
        """Called once before this entry's branches are built (state the branches of one entry
        share, e.g. LoRA's dropout masks, starts here)."""

    def rank_at(self, step: int, epoch: float) -> int | None:
        """The rank the entry's branches should have at this point of its stage (a growing-rank
        schedule), or None when the method has no schedule."""
        return None

    def routing_tasks(self) -> list[str] | None:
        """The task names a row can be routed to by ``task_ids`` (hard mixtures), or None."""
        return None

    @classmethod
    def from_llamafactory(cls, values: dict[str, Any], given: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """This method's entry, as (entry name, hybridtune entry mapping), for a LLaMA-Factory YAML
        that asks for it; None when it doesn't. ``values`` is the YAML over LLaMA-Factory's
        defaults, ``given`` the YAML as written. A value it cannot honour: ValueError("key: what to do")."""
        return None

    # ---- peft's adapter format (methods with a peft_type) ----------------------------------
    @classmethod
    def peft_accepts(cls, peft_config: dict[str, Any]) -> bool:
        """Whether this method reads the peft adapter with this config (e.g. DoRA: use_dora set)."""
        return cls.peft_type is not None and peft_config.get("peft_type") == cls.peft_type

    @classmethod
    def peft_problems(cls, peft_config: dict[str, Any]) -> list[str]:
        """Every key of the method's part of a peft config that an import would not reproduce
        exactly, by name ("'bias': 'all' is not supported (...)"); empty when it imports exactly."""
        return []

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> MethodConfig:
        """The config of an entry equal to this peft adapter: it targets exactly the modules in
        ``tensors`` (module name -> tensor name -> tensor)."""
        raise NotImplementedError(f"{cls.__name__} has no peft format")

    def load_peft(self, branch: Branch, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one module's saved peft tensors into its branch; ValueError naming the shapes
        when they do not fit the layer."""
        raise NotImplementedError(f"{type(self).__name__} has no peft format")

    @classmethod
    def to_peft(
        cls, entries: list[tuple[MethodConfig, list[tuple[str, Branch]]]]
    ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """The method's peft config keys and the tensors per module of these entries (configs of
        this class with their (module name, branch) pairs) written as ONE peft adapter that
        computes what they compute; ValueError when they cannot be one."""
        raise NotImplementedError(f"{cls.__name__} has no peft format")


class Branch(nn.Module):
    """The trainable part of one method at one target module. Whether it merges is its config's
    ``mergeable``; a branch of a mergeable method implements ``merge_into``/``unmerge_from``."""

    modifies_input: ClassVar[bool] = False  # True: ``pre`` runs before the target module (IA3 on FFN inputs)
    # True: the branch acts inside its target's computation (a delta on one of the fused expert
    # tensors of an MoE block, before the gate's nonlinearity), so it cannot run after the target:
    # the target is computed by ``run_target(module, [(branch, token indices or None)], *args)``,
    # shared by every such branch of the module (core/experts.py's experts_forward).
    runs_inside: ClassVar[bool] = False
    run_target: ClassVar[Any] = None
    per_expert: ClassVar[bool] = False  # True: factors per expert of an MoE block, not one matrix per target

    def __init__(self) -> None:
        super().__init__()
        self.active = True
        self.set_name = "default"  # the adapter set this branch belongs to (set when attached)

    def forward(self, args: tuple, kwargs: dict, output: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def pre(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Change the target's input before it runs (only if ``modifies_input``)."""
        return args, kwargs

    def routed_pre(self, args: tuple, kwargs: dict, rows: torch.Tensor) -> tuple[tuple, dict]:
        x = first_input(args, kwargs)
        new_args, new_kwargs = self.pre(args, kwargs)
        changed = first_input(new_args, new_kwargs)
        return replace_first_input(args, kwargs, replace_rows(x, rows, changed.index_select(0, rows)))

    def routed(self, args: tuple, kwargs: dict, output: Any, rows: torch.Tensor) -> Any:
        """Apply the branch to ``rows`` of the batch only (mixed-batch serving). This generic
        version computes every row and keeps the chosen ones; methods override it to compute less."""
        new = self(args, kwargs, output)
        if isinstance(output, torch.Tensor):
            return replace_rows(output, rows, new.index_select(0, rows))
        return type(output)((replace_rows(output[0], rows, new[0].index_select(0, rows)), *output[1:]))

    def after_load(self) -> None:
        """Called after a checkpoint's tensors were copied in (to refresh derived state)."""

    # Mergeable branches override these three.
    merged: bool = False

    def merge_into(self, module: nn.Module, keep_original: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base module")

    def unmerge_from(self, module: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base module")


def peft_key_problems(
    peft_config: dict[str, Any], known: set[str], only: dict[str, tuple], why: dict[str, str]
) -> list[str]:
    """The problems of a peft config's method keys: each key that is neither ``known`` (reproduced
    or without effect) nor at one of its ``only`` values, by name. Unknown keys pass when unset."""
    problems = []
    for key, value in peft_config.items():
        if key in known:
            continue
        allowed = only.get(key)
        if allowed is None:  # a key this version does not know: harmless only when unset
            if value not in (None, False, {}, [], ""):
                problems.append(f"'{key}': {value!r} is a peft option hybridtune does not know")
        elif value not in allowed:
            reason = why.get(key, "the entry would not compute the same")
            problems.append(f"'{key}': {value!r} is not supported ({reason}; supported: {list(allowed)})")
    return problems


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a module was called with, positional or keyword (decoder layers use keywords)."""
    if args:
        return args[0]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("the target module was called without a tensor input")


def replace_first_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) with the tensor ``first_input`` would return replaced by ``value``."""
    if args:
        return (value, *args[1:]), kwargs
    for key, old in kwargs.items():
        if isinstance(old, torch.Tensor):
            return args, {**kwargs, key: value}
    raise TypeError("the target module was called without a tensor input")


def for_weights(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype a branch's weights compute in. Under autocast nothing is cast: autocast
    runs the matmuls in its own dtype, so a copy of the input here would only be cast back."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def param_like(module: nn.Module) -> dict[str, Any]:
    """dtype/device of a module's first parameter, so new parameters sit next to the base weights."""
    for p in module.parameters():
        dtype = p.dtype if p.dtype.is_floating_point else torch.get_default_dtype()
        return {"dtype": dtype, "device": p.device}
    return {"dtype": torch.get_default_dtype(), "device": torch.device("cpu")}
