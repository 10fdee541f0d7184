"""`hybridtune serve`: the real server in a subprocess on a free loopback port, driven by the
official openai client and raw HTTP."""

import concurrent.futures
import json
import os

import httpx
import pytest
import torch

import hybridtune as ht
from conftest import hybridtune_server, randomize, save_random_sets
from hybridtune.core.base_models import load_base
from hybridtune.training.data import render_prompt
from hybridtune.training.evaluation import generate_batch

openai = pytest.importorskip("openai")

KEY = "test-key"
SETS = {
    "alpha": {"lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}},
    "beta-2": {"lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "o_proj"]}},
    "hybrid.v1": {
        "lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8},
    },
}
QUESTION = [{"role": "user", "content": "what color is the sky?"}]


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("adapters")
    save_random_sets(root, tiny_lm_dir, SETS)
    outside = tmp_path_factory.mktemp("outside")
    base, _ = load_base(str(tiny_lm_dir))
    randomize(ht.inject(base, {"methods": SETS["alpha"]}), std=0.5).save_adapters(outside / "secret")
    (root / "escape").symlink_to(outside / "secret")  # a set that lives outside the directory
    (root / "notes").mkdir()  # not a set
    return root


@pytest.fixture(scope="module")
def server(adapters_dir, tiny_lm_dir):
    options = ["--max-loaded", "2", "--max-tokens", "32", "--max-prompt-tokens", "200"]
    with hybridtune_server(tiny_lm_dir, adapters_dir, *options, env={**os.environ, "HYBRIDTUNE_API_KEY": KEY},
                           key=KEY) as url:  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)


@pytest.fixture(scope="module")
def offline(adapters_dir, tiny_lm_dir):
    """Greedy generate, in this process, of a set (None: base) — what the server must return."""
    cache = {}

    def run(name, prompt, max_tokens=8):
        if name not in cache:
            base, tokenizer = load_base(str(tiny_lm_dir))
            cache[name] = (ht.load(base, adapters_dir / name) if name else base).eval(), tokenizer
        model, tokenizer = cache[name]
        with torch.inference_mode():
            return generate_batch(model, tokenizer, [prompt], max_tokens)[0]

    return run


def chat_prompt(tiny_lm_dir):
    _, tokenizer = load_base(str(tiny_lm_dir))
    return render_prompt(tokenizer, QUESTION)


def test_chat_per_set_equals_offline_generate(client, offline, tiny_lm_dir):
    prompt = chat_prompt(tiny_lm_dir)
    outputs = {}
    for name in [tiny_lm_dir.name, "alpha", "beta-2", "hybrid.v1"]:
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=8, temperature=0)
        outputs[name] = reply.choices[0].message.content
        expected = offline(None if name == tiny_lm_dir.name else name, prompt)
        assert outputs[name] == expected, name
        assert reply.choices[0].finish_reason in {"stop", "length"} and reply.usage.completion_tokens <= 8
    assert len(set(outputs.values())) == 4  # every set answers differently from the others and the base


def test_completions_and_streaming(client, offline):
    prompt = "the sky is"
    plain = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0)
    assert plain.choices[0].text == offline("alpha", prompt)
    pieces = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == plain.choices[0].text
    chunks = list(client.chat.completions.create(model="beta-2", messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True))  # fmt: skip
    whole = client.chat.completions.create(model="beta-2", messages=QUESTION, max_tokens=8, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_concurrent_requests_for_different_sets_are_each_right(client, server, offline, tiny_lm_dir):
    prompt = chat_prompt(tiny_lm_dir)
    names = ["alpha", "beta-2", "alpha", "beta-2", "alpha", "beta-2"]

    def ask(name):
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=8, temperature=0)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, names))
    assert answers == [offline(name, prompt) for name in names]
    health = httpx.get(f"{server}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["largest_batch"] > 1  # rows of different sets shared forward passes


def test_lru_unloads_and_reloads(client, server, offline, tiny_lm_dir):
    headers = {"Authorization": f"Bearer {KEY}"}
    prompt = chat_prompt(tiny_lm_dir)
    for name in ["alpha", "beta-2", "hybrid.v1", "alpha"]:  # room for two
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == offline(name, prompt)
    assert httpx.get(f"{server}/health", headers=headers).json()["loaded"] == ["hybrid.v1", "alpha"]


def test_loading_sets_while_a_stream_runs_leaves_it_intact(client, offline, tiny_lm_dir):
    """A long stream of one set while other sets load and unload (room for two): the stream's
    text is still exactly that set's offline answer."""
    prompt = chat_prompt(tiny_lm_dir)
    stream = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=32, temperature=0,
                                            stream=True)  # fmt: skip
    first = next(iter(stream))  # the stream is running
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        others = list(pool.map(
            lambda name: client.chat.completions.create(model=name, messages=QUESTION, max_tokens=4, temperature=0),
            ["beta-2", "hybrid.v1", "beta-2"],
        ))  # fmt: skip
    text = (first.choices[0].delta.content or "") + "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == offline("alpha", prompt, max_tokens=32)
    assert [o.choices[0].message.content for o in others] == [
        offline(n, prompt, 4) for n in ["beta-2", "hybrid.v1", "beta-2"]
    ]


def test_models_lists_base_and_sets_only_inside_the_directory(client, tiny_lm_dir):
    ids = [m.id for m in client.models.list().data]
    assert ids == [tiny_lm_dir.name, "alpha", "beta-2", "hybrid.v1"]  # no symlinked-out set, no plain folder


@pytest.mark.parametrize("name", ["../adapters", "/etc", "alpha/../beta-2", "escape", "notes", "..", "nope"])
def test_names_outside_the_directory_or_unknown_are_404(server, name):
    response = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": name, "messages": QUESTION, "max_tokens": 4})  # fmt: skip
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_api_key_is_checked_on_every_request(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in [("get", "/health"), ("get", "/v1/models"), ("post", "/v1/completions")]:
            response = httpx.request(method, f"{server}{path}", headers=headers, json={})
            assert response.status_code == 401, path
            assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong").models.list()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": "alpha", "messages": QUESTION, "max_tokens": -1}), 400, "max_tokens"),
        (json.dumps({"model": "alpha", "messages": QUESTION, "max_tokens": 100}), 400, "server's limit of 32"),
        (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "sky " * 300}]}), 400, "at most 200"),
        (json.dumps({"model": "alpha", "messages": QUESTION, "n": 9}), 400, "n"),
        (json.dumps({"model": "alpha"}), 400, "messages"),
        (json.dumps({"model": "alpha", "messages": QUESTION, "x": "y" * 1_100_000}), 413, "over 1000000 bytes"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, message):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server}/v1/chat/completions", headers=headers, content=body)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    reply = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=2, temperature=0)
    assert reply.choices[0].message.content is not None


def test_binds_to_loopback_by_default():
    from typer.main import get_command

    from hybridtune.cli import app

    serve = get_command(app).commands["serve"]
    assert next(p for p in serve.params if p.name == "host").default == "127.0.0.1"
