"""DoRA: weight-decomposed LoRA. W' = m · (W + s·B A) / ||W + s·B A||, with the norm taken per
output feature and a learned magnitude vector m (initialised to ||W||, so the model starts
unchanged). As in the paper and peft, the norm is treated as a constant for the gradient.

Computed on top of the base output: y = b + (m/n)·(W x + s·B A x) = base + (m/n − 1)(W x) + (m/n)·s·B A x.
With dropout (in training), peft's placement: y = W x + (m/n − 1)(W x̃) + (m/n)·s·B A x̃ with x̃ the
dropped input, so an adapter trained here or in peft follows the same gradients.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import TargetError
from ..core.partitioned import gathered
from ..core.quantization import is_quantized
from .base import first_input, for_weights
from .lora import LoRABranch, LowRankConfig, RankSchedule


class DoRAConfig(LowRankConfig):
    """DoRA: LoRA with a learned per-output magnitude (see the module docstring)."""

    type: Literal["dora"] = "dora"
    mergeable: ClassVar[bool] = True
    supports_quantized_base: ClassVar[bool] = False  # the magnitude needs ||W|| of the real weights
    peft_use_dora: ClassVar[bool] = True  # peft writes DoRA as LoRA with use_dora and a magnitude
    peft_tensor_names: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

    def load_peft(self, branch: nn.Module, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        super().load_peft(branch, module, tensors)
        magnitude = tensors["lora_magnitude_vector"]
        if tuple(magnitude.shape) != tuple(branch.magnitude.shape):
            raise ValueError(f"lora_magnitude_vector {list(magnitude.shape)}, but the layer has "
                             f"{branch.magnitude.shape[0]} outputs")  # fmt: skip
        branch.magnitude.copy_(magnitude)

    def build_branch(self, entry: str, name: str, module: nn.Module, model: nn.Module) -> DoRABranch:
        if isinstance(self.r, RankSchedule):
            raise ValueError(f"entry '{entry}': DoRA does not support a growing rank")
        if is_quantized(module):
            raise TargetError(
                f"entry '{entry}': DoRA needs the column norms of '{name}''s weight, which is quantized "
                f"({type(module.weight).__name__}); use lora on quantized layers"
            )
        return DoRABranch(module, **self.branch_args(name, module))


class DoRABranch(LoRABranch):
    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.__dict__["base_layer"] = base_layer  # a reference, not a child: its weight is the base's
        with torch.no_grad(), gathered([base_layer.weight]):  # ZeRO-3: partitioned outside a forward
            magnitude = self.weight_norm().to(self.lora_A.dtype)
        self.magnitude = nn.Parameter(magnitude)
        self._norm_at_merge: torch.Tensor | None = None

    def base_weight(self) -> torch.Tensor:
        """The base weight as [out, in] (Conv1D stores [in, out])."""
        weight = self.base_layer.weight
        return weight.T if self.transposed else weight

    def weight_norm(self) -> torch.Tensor:
        """||W + s·B A|| per output feature, in fp32, with no gradient (a constant, as in the paper)."""
        with torch.no_grad():
            combined = self.base_weight().float() + (self.B.float() @ self.A.float()) * self.scale
            return torch.linalg.norm(combined, dim=1)

    def _dora(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        ratio = (self.magnitude / self.weight_norm().to(self.magnitude.dtype)).to(base_out.dtype)
        if self.training and self.input_dropout.p:  # the magnitude rescales W x̃ (see the module docstring)
            dropped = self.input_dropout(for_weights(x, self.lora_A), True)
            plain = F.linear(dropped.to(base_out.dtype), self.base_weight().to(base_out.dtype))
            return base_out + (ratio - 1) * plain + ratio * self._up(F.linear(dropped, self.A)).to(base_out.dtype)
        bias = self.base_layer.bias
        plain = base_out if bias is None else base_out - bias
        return base_out + (ratio - 1) * plain + ratio * self._delta(x).to(base_out.dtype)

    def forward(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return output
        return self._dora(first_input(args, kwargs), output)

    def routed(self, args: tuple, kwargs: dict, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs).index_select(0, rows)
        return output.index_copy(0, rows, self._dora(x, output.index_select(0, rows)))

    def merged_weight(self) -> torch.Tensor:
        """(m/n)·(W + s·B A) in the base weight's layout, fp32."""
        combined = self.base_weight().float() + (self.B.float() @ self.A.float()) * self.scale
        merged = (self.magnitude.float() / self.weight_norm())[:, None] * combined
        return merged.T if self.transposed else merged

    def delta_weight(self) -> torch.Tensor:
        base = self.base_layer.weight.float()
        return self.merged_weight() - base

    def merged_value(self, weight: torch.Tensor) -> torch.Tensor:
        self._norm_at_merge = self.weight_norm()
        return self.merged_weight()

    def unmerged_value(self, weight: torch.Tensor) -> torch.Tensor:
        """Invert W' = (m/n)(W + sBA) with the n saved at merge time."""
        ratio = (self.magnitude.float() / self._norm_at_merge)[:, None]
        restored = self.base_weight().float() / ratio - (self.B.float() @ self.A.float()) * self.scale
        return restored.T if self.transposed else restored
