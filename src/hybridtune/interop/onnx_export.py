"""ONNX export of an adapted model, checked with onnxruntime against PyTorch.

Mergeable entries (LoRA, DoRA, IA3) are folded into the base weights first, so they cost nothing
in the graph; entries that cannot be merged (bottleneck Adapters, ...) run from their hooks while
the exporter traces the model, so their computation is part of the graph. The graph maps
``input_ids`` and ``attention_mask`` (dynamic batch and length) to ``logits``, without a KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.model import HybridModel

ONNX_FILE = "model.onnx"
CHECK_FILE = "onnx_check.json"
TOLERANCE = 1e-3  # max |logit difference| accepted between onnxruntime and PyTorch (fp32)


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _sample(vocab: int, batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with the last row left-padded, to check the mask's handling too."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, : length // 3] = 0
    return ids, mask


def export_onnx(model: nn.Module, out: str | Path, tokenizer: Any | None = None) -> dict[str, Any]:
    """Write ``out/model.onnx`` (+ the tokenizer), check it with onnxruntime on inputs of another
    shape than the traced ones, and return the check (also written to ``out/onnx_check.json``).
    A HybridModel is changed in place: its mergeable entries are baked into the base weights."""
    import onnxruntime

    if isinstance(model, HybridModel):
        model.bake()
        kept = sorted(model.entries)
        model = model.base_model
    else:
        kept = []
    model = model.float().eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wrapper = _Logits(model).eval()
    vocab = model.config.vocab_size
    dims = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            _sample(vocab, 2, 16, seed=0),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
            dynamo=True,
        )
    program.save(str(out / ONNX_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    model.config.save_pretrained(out)

    ids, mask = _sample(vocab, 3, 11, seed=1)
    session = onnxruntime.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        reference = wrapper(ids, mask)
    keep = mask.bool()  # padded positions' logits are not meaningful in either
    difference = float((torch.from_numpy(ours)[keep] - reference[keep]).abs().max())
    check = {"max_abs_logit_difference": difference, "tolerance": TOLERANCE, "ok": difference <= TOLERANCE,
             "checked_shape": list(ids.shape), "entries_in_graph": kept}  # fmt: skip
    (out / CHECK_FILE).write_text(json.dumps(check, indent=2) + "\n")
    if not check["ok"]:
        raise RuntimeError(f"the ONNX model's logits differ from PyTorch's by {difference:.2e} (> {TOLERANCE})")
    return check
