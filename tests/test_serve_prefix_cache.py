"""Prompt prefixes reused across requests (serving/prefix_cache.py): keyed by adapter set and
tokens in whole blocks, bounded by bytes, and replies with a reused prefix equal to each set's
replies computed alone."""

import torch

from hybridtune.core.base_models import load_base
from hybridtune.serving import AdaptersDir, Engine
from hybridtune.serving.prefix_cache import BLOCK, PrefixCache
from test_serve_engine import job, prompt_of, sets_dir, solo  # noqa: F401  (fixtures used below)


def layers_for(ids, layers=2, heads=1, dim=2):
    """Stand-in keys/values whose values say which token they belong to."""
    t = torch.tensor(ids, dtype=torch.float32)[None, :, None].expand(heads, len(ids), dim).clone()
    return [(t + layer, -t - layer) for layer in range(layers)]


def test_prefixes_are_whole_blocks_per_set_and_never_the_last_token():
    cache = PrefixCache(budget_bytes=10**6)
    prompt = list(range(2 * BLOCK + 1))  # two whole blocks before the last token
    cache.store("a", prompt, layers_for(prompt))
    length, entry = cache.longest("a", [*prompt, 99, 98])
    assert length == 2 * BLOCK and torch.equal(entry.layers[1][0][0, :, 0], torch.arange(2 * BLOCK) + 1.0)
    assert cache.longest("a", prompt[: 2 * BLOCK])[0] == BLOCK  # the last token is never covered
    assert cache.longest("a", prompt[:BLOCK] + [500] * BLOCK)[0] == BLOCK  # diverges in the second block
    assert cache.longest("b", prompt)[0] == 0  # another set's keys and values differ
    assert cache.longest("a", [7, *prompt])[0] == 0
    cache.store("a", prompt[:BLOCK], layers_for(prompt[:BLOCK]))  # nothing whole to hold
    assert len(cache._entries) == 1


def test_the_budget_evicts_the_least_recently_used_and_shared_blocks_stay_reachable():
    one = PrefixCache(budget_bytes=10**6)
    prompt = list(range(BLOCK + 1))
    one.store("a", prompt, layers_for(prompt))
    per_entry = one.held
    cache = PrefixCache(budget_bytes=2 * per_entry * 2)  # room for two entries of two blocks
    shared = list(range(BLOCK))
    first, second, third = (shared + [100 + i] * BLOCK + [0] for i in range(3))
    cache.store("a", first, layers_for(first))
    cache.store("a", second, layers_for(second))
    assert cache.longest("a", first)[0] == 2 * BLOCK  # touch: first is now the most recent
    cache.store("a", third, layers_for(third))  # evicts second
    assert cache.longest("a", second)[0] == BLOCK  # its first block is still held by the others
    assert cache.longest("a", third)[0] == 2 * BLOCK and cache.held <= cache.budget
    cache.drop_set("a")
    assert cache.held == 0 and cache.longest("a", first) == (0, None)
    longer = first + [1] * BLOCK
    cache.store("a", first, layers_for(first))
    cache.store("a", longer, layers_for(longer))  # covers the shorter entry, which goes
    assert list(cache._entries) == [("a", tuple(longer[: 3 * BLOCK]))]
    assert PrefixCache(budget_bytes=0).longest("a", first) == (0, None)
    cache.budget = cache.held + 1  # an entry too large for the budget is not held, and costs nothing
    cache.store("a", longer + [2] * BLOCK, layers_for(longer + [2] * BLOCK))
    assert list(cache._entries) == [("a", tuple(longer[: 3 * BLOCK]))]


def test_replies_reusing_a_prefix_equal_each_set_alone(sets_dir, tiny_lm_dir, solo):  # noqa: F811
    base, tokenizer = load_base(str(tiny_lm_dir))
    base.generation_config.eos_token_id = None
    tokenizer.eos_token_id = None
    engine = Engine(base.eval(), tokenizer, AdaptersDir(sets_dir), max_batch=4, prefill_chunk=64)
    preamble = prompt_of(40, 2 * BLOCK + 3)
    try:
        first, events = job("hybrid", preamble + prompt_of(41, 5), 6)
        engine.submit(first)
        events.wait()
        assert engine.counters()["prefix_tokens_reused"] == 0
        # rows of one prefill start at one column: a row of the same set reuses the two held
        # blocks, a shorter one beside it what that column allows
        short = preamble[: 2 * BLOCK + 1] + prompt_of(44, 2)
        later = [job("hybrid", preamble + prompt_of(42, 9), 6), job("hybrid", short, 6)]
        for j, _ in later:
            engine.submit(j)
        for _, e in later:
            e.wait()
        width = len(later[0][0].prompt_ids)
        assert engine.counters()["prefix_tokens_reused"] == 2 * BLOCK + (2 * BLOCK - (width - len(short)))
        other = [job("alpha", preamble + prompt_of(43, 9), 6) for _ in range(2)]  # another set: its own
        for j, e in other:
            engine.submit(j)
            e.wait()
        reused = 4 * BLOCK - (width - len(short)) + PrefixCache.reusable(other[0][0].prompt_ids)
        assert engine.counters()["prefix_tokens_reused"] == reused
        for (j, _), name in zip([(first, events), *later, *other], ["hybrid"] * 3 + ["alpha"] * 2, strict=True):
            assert j.generated == solo(name, j.prompt_ids, 6)
    finally:
        engine.close()


def test_admission_orders_and_groups_prompts_by_what_they_leave_to_compute():
    from types import SimpleNamespace

    from hybridtune.serving.admission import choose_prefill

    jobs = [SimpleNamespace(prompt_ids=[0] * n, echo_logprobs=False, cancelled=False, skipped=0) for n in (40, 12, 60)]
    left = {id(jobs[0]): 8, id(jobs[1]): 12, id(jobs[2]): 60}
    assert choose_prefill(jobs, room=1, chunk=64, to_compute=lambda j: left[id(j)]) == [jobs[0]]
    assert choose_prefill(jobs, room=3, chunk=24, to_compute=lambda j: left[id(j)]) == [jobs[0], jobs[1]]
