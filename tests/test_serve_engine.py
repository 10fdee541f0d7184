"""The serving engine in this process: continuous batching (rows join and leave between decoding
steps, chunked prefill, cancellation), per-row sampling against hand-written references, logprobs
against the model's own forward pass, and broken adapter sets."""

import re
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridtune as ht
from conftest import randomize, save_random_sets, save_tiny_lm, wait_for
from hybridtune.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from hybridtune.core.base_models import load_base
from hybridtune.serving import AdaptersDir, Engine
from hybridtune.serving import engine as engine_module
from hybridtune.serving.adapters_dir import BrokenAdapter
from hybridtune.serving.engine import Job
from hybridtune.serving.sampling import Sampling

SETS = {
    "alpha": {"lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}},
    "hybrid": {
        "lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8},
    },
}
GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def sets_dir(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("sets")
    save_random_sets(root, tiny_lm_dir, SETS)
    return root


@pytest.fixture(scope="module")
def solo(sets_dir, tiny_lm_dir):
    """The reference: each set alone, greedy, the whole sequence through the model at every step."""
    models = {}

    def run(name, prompt, steps, **options):
        if name not in models:
            base, _ = load_base(str(tiny_lm_dir))
            models[name] = (ht.load(base, sets_dir / name) if name else base).eval()
        return reference_tokens(models[name], prompt, steps, **options)

    return run


def reference_tokens(model, prompt, steps, bias=None, presence=0.0, frequency=0.0):
    """Greedy decoding written out by hand, with OpenAI's logit_bias and penalties."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for token in set(out):
                logits[token] -= frequency * out.count(token) + presence
            for token, value in (bias or {}).items():
                logits[token] += value
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


@pytest.fixture(scope="module")
def engine(sets_dir, tiny_lm_dir):
    base, tokenizer = load_base(str(tiny_lm_dir))
    base.generation_config.eos_token_id = None  # never stop early: every row runs its full length
    tokenizer.eos_token_id = None
    server = Engine(base.eval(), tokenizer, AdaptersDir(sets_dir), max_batch=4, prefill_chunk=8)
    yield server
    server.close()


class Events:
    """A job's events as the engine sends them."""

    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, kind, *data):
        self.items.append((time.monotonic(), kind, *data))
        if kind in ("end", "error"):
            self.done.set()

    def wait(self, timeout=60):
        assert self.done.wait(timeout), "the job did not finish"
        return self

    def of(self, kind):
        return [item[2:] for item in self.items if item[1] == kind]


def job(adapter, prompt, max_tokens, sampling=GREEDY, **options):
    events = Events()
    return Job(adapter, list(prompt), max_tokens, sampling, [], events, **options), events


def prompt_of(seed, length):
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_rows_join_a_running_batch_and_each_equals_its_set_alone(engine, solo):
    long_job, long_events = job("hybrid", prompt_of(0, 7), 40)
    engine.submit(long_job)
    wait_for(lambda: len(long_job.generated) >= 5, timeout=60, every=0.001)
    late = [job(name, prompt_of(i + 1, 3 + 2 * i), 6) for i, name in enumerate(["alpha", None, "hybrid"])]
    for j, _ in late:
        engine.submit(j)
    long_events.wait()
    finished = long_events.items[-1][0]
    for (j, events), name in zip(late, ["alpha", None, "hybrid"], strict=True):
        assert events.wait().items[-1][0] < finished, "a late short request waited for the long one"
        assert j.generated == solo(name, j.prompt_ids, 6)
    assert long_job.generated == solo("hybrid", long_job.prompt_ids, 40)
    assert engine.stats["largest_batch"] >= 2
    assert engine._cache is None and not engine._live  # every row left the batch


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(engine, solo):
    running, running_events = job("alpha", prompt_of(5, 4), 30)
    engine.submit(running)
    wait_for(lambda: len(running.generated) >= 2, timeout=60, every=0.001)
    long_prompt, long_events = job(None, prompt_of(6, 60), 3)  # 60 tokens: 8 chunks of 8
    steps_at = {}

    def send(kind, *data):  # the engine's decoding steps when the prefill starts and ends
        steps_at.setdefault(kind if kind == "ready" else "first", engine.stats["steps"])
        long_events(kind, *data)

    long_prompt.send = send
    engine.submit(long_prompt)
    long_events.wait()
    assert steps_at["first"] - steps_at["ready"] >= 7, f"decoding stalled during the long prefill: {steps_at}"
    running_events.wait()
    assert long_prompt.generated == solo(None, long_prompt.prompt_ids, 3)
    assert running.generated == solo("alpha", running.prompt_ids, 30)


def test_a_cancelled_row_leaves_at_the_next_step(engine, solo):
    gone, gone_events = job("alpha", prompt_of(7, 5), 400)
    engine.submit(gone)
    wait_for(lambda: len(gone.generated) >= 3, timeout=60, every=0.001)
    engine.cancel(gone)
    wait_for(lambda: not engine._live, timeout=10, every=0.001)
    assert len(gone.generated) < 400 and not gone_events.done.is_set()
    short, events = job(None, prompt_of(8, 5), 4)
    engine.submit(short)
    assert events.wait().of("end") == [("length", 4)]
    assert short.generated == solo(None, short.prompt_ids, 4)


def test_mixed_sampling_settings_share_a_batch_and_seeds_reproduce(engine, solo):
    seeded = Sampling(temperature=1.3, top_p=0.9, seed=1234)
    prompt = prompt_of(9, 6)
    alone, alone_events = job("alpha", prompt, 12, seeded)
    engine.submit(alone)
    alone_events.wait()
    batch = [job("alpha", prompt, 12, seeded), job(None, prompt_of(10, 4), 12), job("hybrid", prompt, 12,
             Sampling(temperature=0.7, seed=5))]  # fmt: skip
    for j, _ in batch:
        engine.submit(j)
    for _, events in batch:
        events.wait()
    assert batch[0][0].generated == alone.generated  # same seed, other rows around it: same draw
    assert batch[1][0].generated == solo(None, batch[1][0].prompt_ids, 12)  # greedy beside sampled rows
    other, other_events = job("alpha", prompt, 12, Sampling(temperature=1.3, top_p=0.9, seed=99))
    engine.submit(other)
    other_events.wait()
    assert other.generated != alone.generated
    narrow, narrow_events = job("alpha", prompt, 8, Sampling(temperature=1.0, top_p=1e-6, seed=3))
    engine.submit(narrow)
    narrow_events.wait()
    assert narrow.generated == solo("alpha", prompt, 8)  # top_p keeps only the most likely token


def test_penalties_and_logit_bias_equal_the_hand_written_reference(engine, solo):
    prompt = prompt_of(11, 5)
    for options in ({"presence": 1.5}, {"frequency": 0.8}, {"bias": {17: 5.0, 30: -100.0}},
                    {"presence": -0.5, "frequency": 1.0, "bias": {40: 2.0}}):  # fmt: skip
        sampling = Sampling(
            temperature=0,
            presence_penalty=options.get("presence", 0.0),
            frequency_penalty=options.get("frequency", 0.0),
            logit_bias=options.get("bias", {}),
        )
        j, events = job("hybrid", prompt, 16, sampling)
        engine.submit(j)
        events.wait()
        assert j.generated == solo("hybrid", prompt, 16, **options), options
    forced, events = job(None, prompt, 5, Sampling(temperature=0, logit_bias={42: 100.0}))
    engine.submit(forced)
    events.wait()
    assert forced.generated == [42] * 5


def test_logprobs_are_the_models_own_and_echo_scores_the_prompt(engine, sets_dir, tiny_lm_dir):
    base, _ = load_base(str(tiny_lm_dir))
    model = ht.load(base, sets_dir / "hybrid").eval()
    prompt = prompt_of(12, 9)
    j, events = job("hybrid", prompt, 5, Sampling(temperature=0, logprobs=3), echo_logprobs=True)
    engine.submit(j)
    events.wait()
    with torch.inference_mode():
        full = torch.log_softmax(model(input_ids=torch.tensor([prompt + j.generated])).logits[0].float(), -1)
    (scored,) = events.of("prompt")
    reports = list(scored[0]) + [r for _, items in events.of("text") for r in items]
    assert [r.token for r in reports] == prompt + j.generated
    assert reports[0].logprob is None  # nothing predicts the first token
    for position, report in enumerate(reports[1:], start=1):
        expected = full[position - 1]
        assert report.logprob == pytest.approx(float(expected[report.token]), abs=1e-4)
        assert [t for t, _ in report.top] == expected.topk(3).indices.tolist()
    for position in range(len(prompt), len(reports)):  # greedy: the chosen token is the most likely
        assert reports[position].token == reports[position].top[0][0]
    scored_only, events = job(None, prompt, 0, Sampling(temperature=0, logprobs=0), echo_logprobs=True)
    engine.submit(scored_only)
    assert events.wait().of("end") == [("length", 0)]
    assert len(events.of("prompt")[0][0]) == len(prompt)


@pytest.mark.parametrize("damage", ["truncated weights", "invalid config", "wrong shape", "other base", "prefix"])
def test_a_broken_set_fails_its_requests_once_named_and_is_not_retried(tmp_path, tiny_lm_dir, damage, monkeypatch):
    base, tokenizer = load_base(str(tiny_lm_dir))
    good = randomize(ht.inject(base, {"methods": SETS["alpha"]}), std=0.5)
    good.save_adapters(tmp_path / "good")
    good.save_adapters(tmp_path / "bad")
    weights, config = tmp_path / "bad" / WEIGHTS_NAME, tmp_path / "bad" / CONFIG_NAME
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "invalid config":
        config.write_text(config.read_text().replace('"r": 4', '"r": -4'))
    elif damage == "wrong shape":
        state = load_file(weights)
        name = next(k for k in state if "lora_A" in k)
        state[name] = torch.zeros(3, 3)
        save_file(state, weights)
    elif damage == "other base":
        other, _ = load_base(str(save_tiny_lm(tmp_path / "other-lm", seed=5)))
        randomize(ht.inject(other, {"methods": SETS["alpha"]}), std=0.5).save_adapters(tmp_path / "bad")
    else:
        fresh, _ = load_base(str(tiny_lm_dir))
        ht.inject(fresh, {"methods": {"p": {"type": "prefix_tuning", "num_virtual_tokens": 2}}}).save_adapters(
            tmp_path / "bad"
        )
    assert config.exists() and weights.exists()
    loads = []
    original = engine_module.saved_config
    monkeypatch.setattr(engine_module, "saved_config", lambda *a: loads.append(a) or original(*a))
    fresh_base, _ = load_base(str(tiny_lm_dir))
    server = Engine(fresh_base.eval(), tokenizer, AdaptersDir(tmp_path))
    try:
        for _ in range(2):
            bad, events = job("bad", prompt_of(1, 4), 3)
            server.submit(bad)
            (error,) = events.wait().of("error")
            assert isinstance(error[0], BrokenAdapter)
            message = str(error[0])
            assert message.startswith("adapter set 'bad' cannot be served: ") and str(tmp_path) not in message
            assert not re.search(r"(^|\s)/", message), message  # no server path
            assert events.of("ready") == []  # refused before any reply
        assert len(loads) == 1  # not reloaded while its files are unchanged
        assert "bad" not in server.adapters.names() and "good" in server.adapters.names()
        ok, events = job("good", prompt_of(1, 4), 3)
        server.submit(ok)
        assert events.wait().of("end")
        good.save_adapters(tmp_path / "bad")  # repaired: served again
        time.sleep(0.01)
        repaired, events = job("bad", prompt_of(1, 4), 3)
        server.submit(repaired)
        assert events.wait().of("end") and "bad" in server.adapters.names()
    finally:
        server.close()


def test_models_whose_cache_cannot_be_spliced_still_batch_correctly(sets_dir, tiny_lm_dir, solo, monkeypatch):
    monkeypatch.setattr(engine_module, "splicable", lambda cache: False)
    base, tokenizer = load_base(str(tiny_lm_dir))
    base.generation_config.eos_token_id = None
    tokenizer.eos_token_id = None
    server = Engine(base.eval(), tokenizer, AdaptersDir(sets_dir), max_batch=4)
    try:
        jobs = [job(name, prompt_of(20 + i, 3 + i), 4 + 3 * i) for i, name in enumerate(["alpha", None, "hybrid"])]
        for j, _ in jobs:
            server.submit(j)
        for (j, events), name in zip(jobs, ["alpha", None, "hybrid"], strict=True):
            events.wait()
            assert j.generated == solo(name, j.prompt_ids, len(j.generated))
            assert len(j.generated) == j.max_tokens
    finally:
        server.close()


def test_stop_strings_cut_the_text_and_its_logprobs(engine):
    free, events = job(None, prompt_of(30, 5), 12, Sampling(temperature=0, logprobs=0))
    engine.submit(free)
    text = "".join(delta for delta, _ in events.wait().of("text"))
    for stop in (text[len(text) // 2 : len(text) // 2 + 2], text[-3:-1]):
        assert stop.strip(), text
        cut, events = job(None, prompt_of(30, 5), 12, Sampling(temperature=0, logprobs=0))
        cut.stop = [stop]
        engine.submit(cut)
        sent = events.wait().of("text")
        shown = "".join(d for d, _ in sent)
        assert shown == text[: text.find(stop)]
        assert events.of("end")[0][0] == "stop"
        reported = [r.token for _, items in sent for r in items]
        assert reported == cut.generated[: len(reported)]  # in order, none skipped
        decoded = engine.tokenizer.decode(reported, skip_special_tokens=True)
        assert decoded.startswith(shown)  # every shown character has its token's logprob
        assert len(engine.tokenizer.decode(reported[:-1], skip_special_tokens=True)) < len(shown) or not shown


def test_a_failed_step_fails_the_rows_it_touched_and_the_engine_keeps_serving(engine, solo, monkeypatch):
    running, running_events = job("alpha", prompt_of(40, 4), 200)
    engine.submit(running)
    wait_for(lambda: len(running.generated) >= 2, timeout=60, every=0.001)
    forward = engine._forward
    calls = []

    def broken(*args, **kwargs):
        if not calls and args[1].shape[1] > 1:  # the newcomer's prefill, in a step that also decodes the other
            calls.append(1)
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", broken)
    newcomer, newcomer_events = job("hybrid", prompt_of(41, 6), 4)
    engine.submit(newcomer)
    for events in (running_events, newcomer_events):
        (error,) = events.wait().of("error")
        assert "simulated" in str(error[0])
    after, events = job("alpha", prompt_of(42, 5), 4)
    engine.submit(after)
    assert events.wait().of("end") == [("length", 4)]
    assert after.generated == solo("alpha", after.prompt_ids, 4)


def test_an_extreme_seed_or_a_tiny_temperature_is_served(engine, solo):
    prompt = prompt_of(43, 5)
    tiny, events = job("alpha", prompt, 4, Sampling(temperature=1e-39))
    engine.submit(tiny)
    events.wait()
    assert tiny.generated == solo("alpha", prompt, 4)  # treated as greedy, as vLLM does
    for seed in (2**63 - 1, -(2**63)):
        seeded, events = job("alpha", prompt, 4, Sampling(temperature=1.0, seed=seed))
        engine.submit(seeded)
        assert events.wait().of("end") == [("length", 4)]


def test_short_prompts_waiting_beside_long_ones_are_prefilled_first(engine, solo):
    """Grouped with a 64-token prompt, a 4-token one would wait for the long prefill (the budget is
    spent on its padding); grouped by length, the short ones answer first and the long ones after."""
    jobs = [job(None, prompt_of(9, 64), 2), job(None, prompt_of(8, 40), 2)]
    jobs += [job("alpha", prompt_of(10 + i, 4), 2) for i in range(2)]
    with engine._wake:  # all four wait together
        for j, _ in jobs:
            engine._waiting.append(j)
        engine._wake.notify()
    for (j, events), name in zip(jobs, [None, None, "alpha", "alpha"], strict=True):
        events.wait()
        assert j.generated == solo(name, j.prompt_ids, 2)
    long_ready = jobs[0][1].items[0][0]
    assert all(events.items[-1][0] < long_ready for _, events in jobs[2:]), "a short prompt waited for a long one"


def test_prefill_groups_are_of_similar_lengths_and_nothing_starves():
    from types import SimpleNamespace

    from hybridtune.serving.admission import MAX_SKIPS, choose_prefill

    def waiting(*lengths):
        return [SimpleNamespace(prompt_ids=[0] * n, echo_logprobs=False, cancelled=False, skipped=0) for n in lengths]

    queue = waiting(300, 5, 6, 200)
    assert [len(j.prompt_ids) for j in choose_prefill(queue, room=4, chunk=64)] == [5, 6]
    assert [j.skipped for j in queue] == [1, 0, 0, 1]
    assert [len(j.prompt_ids) for j in choose_prefill(queue[:1] + queue[3:], room=4, chunk=64)] == [200, 300]
    queue = waiting(300) + waiting(*[5] * 8)  # a stream of short prompts passes a long one MAX_SKIPS times at most
    for _ in range(MAX_SKIPS):
        taken = choose_prefill(queue, room=2, chunk=64)
        assert all(len(j.prompt_ids) == 5 for j in taken)
        queue = [j for j in queue if j not in taken]
    assert len(choose_prefill(queue, room=2, chunk=64)[0].prompt_ids) == 300
    echo = waiting(5, 5)
    echo[0].echo_logprobs = True
    assert choose_prefill(echo, room=4, chunk=64) == [echo[0]]  # prompt logprobs: prefilled alone
    small = waiting(3, 9, 14)  # within one prefill step, padding costs nothing
    assert len(choose_prefill(small, room=4, chunk=64)) == 3
