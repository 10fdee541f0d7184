"""What ``hybridtune validate`` checks against the model itself, from its config alone (weights on
the meta device: no memory, no values): every entry's target patterns and placements select
modules and build branches, so ``train`` never fails on a pattern that ``validate`` passed."""

from __future__ import annotations

from ..core.base_models import load_skeleton
from ..core.errors import HybridTuneError
from .run_config import RunConfig


def model_problems(config: RunConfig) -> list[str]:
    """One line per method entry that would fail on this model, naming the entry."""
    try:
        model, _ = load_skeleton(config.model)
    except HybridTuneError as exc:
        return [f"model: {exc}"]
    problems = []
    for entry, method in config.methods.items():
        try:
            method.begin_attach()
            for name, module in method.select_targets(model, entry):
                method.build_branch(entry, name, module, model)
        except (HybridTuneError, ValueError, TypeError) as exc:
            problems.append(f"methods.{entry}: {exc}")
    return problems
