"""IA3: learned rescaling vectors. Output features of attention projections (keys, values) are
multiplied by l; for the modules listed in ``feedforward`` (the FFN's down projection) the *input*
features are, i.e. the FFN activations — the (IA)^3 paper's placement. Vectors start at 1
(identity). Mergeable: scaling rows (and the bias) or columns of the weight.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.targeting import first_match, is_linear, linear_features, select_modules
from .base import LINEAR_TARGETS, Branch, MethodConfig, first_input, param_like, peft_key_problems, replace_first_input


class IA3Config(MethodConfig):
    type: Literal["ia3"] = "ia3"
    mergeable: ClassVar[bool] = True

    @classmethod
    def example(cls) -> IA3Config:
        """A small config for a Llama-style model (the contract test suite runs every method with it)."""
        return cls(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])

    targets: list[str] = Field(min_length=1, json_schema_extra=LINEAR_TARGETS)
    feedforward: list[str] = Field(default_factory=list)  # targets whose input (not output) is rescaled
    exclude: list[str] = Field(default_factory=list)

    @field_validator("targets", "feedforward", "exclude", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    def select_targets(self, model: nn.Module, entry: str) -> list[tuple[str, nn.Module]]:
        chosen = select_modules(
            model, self.targets, entry=entry, accept=is_linear,
            accepted_what="linear layers (nn.Linear or transformers' Conv1D)", exclude=self.exclude,
        )  # fmt: skip
        for pattern in self.feedforward:
            if not any(first_match([pattern], name) for name, _ in chosen):
                raise ValueError(f"entry '{entry}': feedforward pattern '{pattern}' matches none of the targets")
        return chosen

    # ---- peft's IA3 format: ia3_l per module, [out, 1] on outputs and [1, in] on FFN inputs ----
    peft_type: ClassVar[str | None] = "IA3"
    peft_tensor_names: ClassVar[tuple[str, ...]] = ("ia3_l",)

    @classmethod
    def peft_problems(cls, peft_config: dict[str, Any]) -> list[str]:
        # the saved vectors name the modules targets/exclusions chose, and which are feed-forward
        known = {"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights"}
        return peft_key_problems(peft_config, known, {"modules_to_save": (None, [])}, {})

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> IA3Config:
        on_input = [t for t, named in tensors.items() if named["ia3_l"].dim() == 2 and named["ia3_l"].shape[0] == 1]
        return cls(targets=sorted(tensors), feedforward=sorted(on_input))

    def load_peft(self, branch: IA3Branch, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        vector = tensors["ia3_l"]
        fan_in, fan_out = linear_features(module)
        expected = (1, fan_in) if branch.on_input else (fan_out, 1)
        if tuple(vector.shape) != expected:
            raise ValueError(f"ia3_l {list(vector.shape)}, but the layer is {fan_in} -> {fan_out} "
                             f"(expected {list(expected)})")  # fmt: skip
        branch.ia3_l.copy_(vector.flatten())

    @classmethod
    def to_peft(cls, entries: list[tuple[IA3Config, list[tuple[str, IA3Branch]]]]):
        pairs = [pair for _, branches in entries for pair in branches]
        targets = [t for t, _ in pairs]
        if len(set(targets)) < len(targets):
            raise ValueError("IA3 entries on the same module cannot be written as one peft adapter")
        tensors = {
            t: {"ia3_l": b.ia3_l.detach()[None, :] if b.on_input else b.ia3_l.detach()[:, None]} for t, b in pairs
        }
        peft_config = {
            "target_modules": sorted(targets),
            "feedforward_modules": sorted(t for t, b in pairs if b.on_input),
            "fan_in_fan_out": any(b.transposed for _, b in pairs),
            "modules_to_save": None,
            "init_ia3_weights": True,
        }
        return peft_config, tensors

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> IA3Branch:
        fan_in, fan_out = linear_features(module)
        on_input = first_match(self.feedforward, name) is not None
        return IA3Branch(fan_in if on_input else fan_out, on_input, isinstance(module, Conv1D), **param_like(module))


class IA3Branch(Branch):
    def __init__(self, features: int, on_input: bool, transposed: bool, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.on_input, self.transposed = on_input, transposed
        self.modifies_input = on_input  # instance value read by the pre-hook dispatcher
        self.ia3_l = nn.Parameter(torch.ones(features, dtype=dtype, device=device))
        self.merged = False
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def pre(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.merged:
            return args, kwargs
        x = first_input(args, kwargs)
        return replace_first_input(args, kwargs, x * self.ia3_l.to(x.dtype))

    def forward(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if self.on_input or self.merged:
            return output
        return output * self.ia3_l.to(output.dtype)

    def routed(self, args: tuple, kwargs: dict, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.on_input:
            return output
        return output.index_copy(0, rows, output.index_select(0, rows) * self.ia3_l.to(output.dtype))

    def _weight_scale(self) -> torch.Tensor:
        """l shaped to multiply the stored weight: rows of [out, in] for outputs, columns for inputs."""
        l = self.ia3_l.float()  # noqa: E741 - the paper's name
        out_axis_first = not self.transposed  # Linear stores [out, in], Conv1D [in, out]
        scales_rows = out_axis_first != self.on_input
        return l[:, None] if scales_rows else l[None, :]

    @torch.no_grad()
    def merge_into(self, module: nn.Module, keep_original: bool) -> None:
        if self.merged:
            return
        weight, bias = module.weight, getattr(module, "bias", None)
        if keep_original:
            self._original = (
                weight.detach().to("cpu", copy=True),
                None if bias is None else bias.detach().cpu().clone(),
            )
        weight.copy_((weight.float() * self._weight_scale()).to(weight.dtype))
        if bias is not None and not self.on_input:
            bias.copy_((bias.float() * self.ia3_l.float()).to(bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge_from(self, module: nn.Module) -> None:
        if not self.merged:
            return
        weight, bias = module.weight, getattr(module, "bias", None)
        if self._original is not None:
            weight.copy_(self._original[0].to(weight.device))
            if bias is not None and self._original[1] is not None:
                bias.copy_(self._original[1].to(bias.device))
        else:
            weight.copy_((weight.float() / self._weight_scale()).to(weight.dtype))
            if bias is not None and not self.on_input:
                bias.copy_((bias.float() / self.ia3_l.float()).to(bias.dtype))
        self._original = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"features={self.ia3_l.shape[0]}, on={'input' if self.on_input else 'output'}"
