"""Padding-free batches (``data.packing``) against padded ones: the padding fraction of every batch
and real (non-padding) tokens per second of training steps, on the repository's example sets.

python bench/packing.py [--steps 4] [--rounds 2]

For each example config (the quickstart and the multitask example, plus an alpaca-like set made
here: alpaca's format with a wide spread of lengths, see ``alpaca_like``) the training split is
prepared twice, padded (one example per row) and packed (examples concatenated into rows of up to
``data.max_length`` with per-example positions), batched as the run batches it (``batch_size`` rows
in its first epoch's shuffled order), and trained for ``--steps`` optimizer steps each on the
config's model, the two regimes interleaved in rounds. Writes bench/results/packing.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
CONFIGS = {"quickstart": HERE.parent / "examples" / "sentiment" / "config.yaml",
           "multitask": HERE.parent / "examples" / "multitask" / "config.yaml"}  # fmt: skip


WORDS = ["the", "film", "story", "light", "river", "city", "music", "night", "world", "people", "house", "water",
         "history", "garden", "question", "answer", "explain", "describe", "reason", "simple", "example"]  # fmt: skip


def alpaca_like(root: Path, records: int = 240, seed: int = 0) -> Path:
    """A config over synthetic alpaca records whose lengths spread as instruction data's do (a
    long-tailed output length: a median near 55 words, some past the row length), trained with
    the quickstart's methods. Their words are filler: a step's cost depends on token counts only."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    with (root / "train.jsonl").open("w") as out:
        for _ in range(records):
            output_words = min(300, max(3, round(rng.lognormvariate(4.0, 0.8))))
            out.write(json.dumps({"instruction": text(rng.randint(5, 25)), "output": text(output_words)}) + "\n")
    (root / "config.yaml").write_text(
        "model: smollm2-135m\n"
        "methods:\n"
        "  lora: {type: lora, r: 8, alpha: 16, targets: [q_proj, v_proj]}\n"
        "  adapter: {type: adapter, after: mlp, reduction_factor: 16, activation: gelu}\n"
        "data: {train: train.jsonl, format: alpaca, max_length: 256, eval_split: 0.05}\n"
        "training: {batch_size: 4}\n"
    )
    return root / "config.yaml"


def batches(config_path: Path, packing: bool):
    """(config, tokenizer, the split's collated batches) with data.packing set as asked."""
    import os

    from hybridtune.core.base_models import load_base
    from hybridtune.training.data import collate
    from hybridtune.training.data_prep import prepare_data
    from hybridtune.training.run_config import load_run_config
    from hybridtune.training.steps import EpochSampler

    os.chdir(config_path.parent)  # the configs name their data files relative to themselves
    config = load_run_config(config_path)
    config.data.packing = packing
    _, tokenizer = load_base(config.model)
    prepared = prepare_data(config, tokenizer)
    size = config.training.batch_size
    order = list(EpochSampler(len(prepared.train), EpochSampler.seed_for(config.training.seed, stage=0, epoch=0)))
    rows = [prepared.train[i] for i in order]
    return config, [collate(rows[i : i + size], tokenizer.pad_token_id) for i in range(0, len(rows), size)]


def padding_fraction(collated: list) -> tuple[float, int, int]:
    real = sum(int(b["attention_mask"].sum()) for b in collated)
    total = sum(b["input_ids"].numel() for b in collated)
    return 1 - real / total, real, len(collated)


def train_steps(config, collated: list, steps: int) -> float:
    """Real tokens per second over ``steps`` optimizer steps (after one warm-up step)."""
    import torch

    import hybridtune as ht
    from hybridtune.core.base_models import load_base
    from hybridtune.training.steps import model_inputs

    base, _ = load_base(config.model)
    model = ht.inject(base, {"methods": {k: v.model_dump() for k, v in config.methods.items()}})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters_to_train(), lr=1e-4)
    tokens, elapsed = 0, 0.0
    for index in range(steps + 1):
        batch = collated[index % len(collated)]
        start = time.perf_counter()
        model(**model_inputs(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if index:  # the first step warms up
            elapsed += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    made = Path(tempfile.mkdtemp(prefix="alpaca-like-"))
    configs = {**CONFIGS, "alpaca-like": alpaca_like(made)}
    for name, path in configs.items():
        regimes = {packing: batches(path, packing) for packing in (False, True)}
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for packing, (config, collated) in regimes.items():
                speeds[packing].append(train_steps(config, collated, args.steps))
                print(name, "packed" if packing else "padded", f"{speeds[packing][-1]:.0f} tokens/s", file=sys.stderr)
        for packing, (config, collated) in regimes.items():
            fraction, real, count = padding_fraction(collated)
            rows.append((name, config.model, "packed" if packing else "padded", fraction, real, count,
                         statistics.median(speeds[packing])))  # fmt: skip
    lines = [
        "# Padded and packed batches",
        "",
        f"`python bench/packing.py --steps {args.steps} --rounds {args.rounds}`: {platform.machine()} CPU; each "
        "example config's training split, batched as its run batches it (its first epoch's shuffled order), "
        "trained a few optimizer steps per regime with the config's methods, regimes interleaved; real tokens "
        "exclude padding (median over rounds).",
        "",
        "| set | model | regime | padding (of batch tokens) | real tokens in the split | batches | real tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model, regime, fraction, real, count, speed in rows:
        lines.append(f"| {name} | {model} | {regime} | {100 * fraction:.1f}% | {real:,} | {count} | {speed:,.0f} |")
    shutil.rmtree(made, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "packing.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
