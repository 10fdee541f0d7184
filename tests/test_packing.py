"""Padding-free batches (data.packing): several examples in one row, each attending only to itself
(positions restart per example, so transformers builds a block-diagonal causal mask). The loss and
the logits equal the padded batch's, example by example, to fp32 rounding."""

import itertools

import pytest
import torch

from conftest import make_model, make_tokenizer
from hybridtune.training.data import IGNORE_INDEX, Encoded, collate, encode, pack
from hybridtune.training.steps import model_inputs

TOL = dict(atol=2e-5, rtol=2e-5)
QUESTIONS = [("what color is the sky?", "blue"), ("say one word: hello", "hello hello"), ("is coal black?", "yes")]


def encoded():
    tok = make_tokenizer()
    return [encode(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 256)
            for q, a in QUESTIONS]  # fmt: skip


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_trains_exactly_what_its_examples_padded_train(attention):
    model = make_model("llama", vocab_size=len(make_tokenizer()))
    model.config._attn_implementation = attention
    items = encoded()
    (row,) = pack(items, max_length=512)
    assert row.position_ids == [p for e in items for p in range(len(e.input_ids))]
    padded, packed = collate(items, pad_id=0), collate([row], pad_id=0)
    with torch.no_grad():
        padded_out = model(**padded, use_cache=False)
        packed_out = model(**model_inputs(packed), use_cache=False)  # as training calls it: no cache
    torch.testing.assert_close(packed_out.loss, padded_out.loss, **TOL)  # the same tokens, the same mean
    start = 0
    for i, item in enumerate(items):  # each example sees only itself
        n = len(item.input_ids)
        torch.testing.assert_close(packed_out.logits[0, start : start + n], padded_out.logits[i, :n], **TOL)
        start += n


def test_packed_rows_pad_as_one_more_example_and_keep_the_mask_for_counting():
    items = encoded()
    rows = pack(items, max_length=len(items[0].input_ids) + len(items[1].input_ids))
    assert len(rows) == 2
    batch = collate(rows, pad_id=0)
    width = batch["input_ids"].shape[1]
    tail = width - len(rows[1].input_ids)
    assert batch["position_ids"][1, -tail:].tolist() == list(range(tail))  # padding: its own segment
    assert batch["labels"][1, -tail:].eq(IGNORE_INDEX).all()
    assert int(batch["attention_mask"].sum()) == sum(len(e.input_ids) for e in items)  # real tokens
    assert "attention_mask" not in model_inputs(batch) and "attention_mask" in model_inputs(collate(items, 0))
    starts = [i for i, p in enumerate(rows[0].position_ids) if p == 0]
    assert len(starts) == 2 and all(rows[0].labels[s] == IGNORE_INDEX for s in starts)  # none predicts the next


def test_packing_is_refused_for_entries_that_add_tokens_per_row(project, tiny_lm_dir):
    import yaml

    from conftest import write_config
    from hybridtune.training.run_config import ConfigError, load_run_config

    path = write_config(project, tiny_lm_dir)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["packing"] = True
    raw["methods"]["prompt"] = {"type": "prompt_tuning", "num_virtual_tokens": 2}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match="data.packing: entry 'prompt' \\(prompt_tuning\\) cannot train on packed rows"
    ):
        load_run_config(path)


def test_a_run_near_the_machines_memory_is_told_what_lowers_it():
    import os

    from hybridtune.training.run_config import TrainingConfig
    from hybridtune.training.steps import memory_notes

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    cpu = torch.device("cpu")
    assert memory_notes(0.5 * total, cpu, TrainingConfig()) == []
    (note,) = memory_notes(0.9 * total, cpu, TrainingConfig())
    assert "is 90% of this machine's" in note and "training.gradient_checkpointing: true" in note
    (note,) = memory_notes(0.9 * total, cpu, TrainingConfig(gradient_checkpointing=True))
    assert "gradient_checkpointing" not in note and "grad_accum" in note


def test_rows_are_filled_best_fit_per_task_with_every_example_once():
    """Each row takes the longest remaining example that fits: lengths 6, 5, 4, 5 in rows of 10
    make two full rows (filling in reading order made three: 6 | 5 4 | 5)."""

    def item(n: int, first: int, task: int | None = None) -> Encoded:
        return Encoded(list(range(first, first + n)), list(range(first, first + n)), task_id=task)

    items = [item(6, 100), item(5, 200), item(4, 300), item(5, 400), item(3, 500, task=1), item(9, 600, task=1)]
    rows = pack(items, max_length=10)
    assert [[ids[0] for ids in _examples(r)] for r in rows] == [[100, 300], [200, 400], [600], [500]]
    assert [r.task_id for r in rows] == [None, None, 1, 1]  # tasks never share a row
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in items for t in e.input_ids)
    assert all(len(r.input_ids) <= 10 for r in rows)
    (alone,) = pack([item(12, 0)], max_length=10)  # longer than a row (not from encode): a row of its own
    assert alone.input_ids == list(range(12))


def _examples(row: Encoded) -> list[list[int]]:
    """A packed row's examples, split where positions restart."""
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
    return [row.input_ids[a:b] for a, b in itertools.pairwise(starts)]


def test_best_fit_holds_for_many_examples():
    """Every example once, unchanged, in rows within the limit; each row starts from the longest
    example left and is closed only when no example left fits; the same rows every time."""
    lengths = torch.randint(1, 200, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    items = [Encoded([i] * n, [i] * n) for i, n in enumerate(lengths)]
    rows = pack(items, max_length=256)
    assert [e.input_ids for e in items] == [[i] * n for i, n in enumerate(lengths)]  # inputs untouched
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in items for t in e.input_ids)
    sizes = [[len(x) for x in _examples(r)] for r in rows]
    assert all(sum(s) <= 256 for s in sizes)
    for i, size in enumerate(sizes[:-1]):
        left = [n for s in sizes[i + 1 :] for n in s]
        assert max(size) >= max(left) and 256 - sum(size) < min(left)
    for row in rows:  # no example predicts the next one's first token
        assert all(row.labels[j] == IGNORE_INDEX for j, p in enumerate(row.position_ids) if p == 0)
    assert [r.input_ids for r in pack(items, max_length=256)] == [r.input_ids for r in rows]
