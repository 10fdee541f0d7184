"""`hybridtune serve` as OpenAI's clients see it: the parameters OpenAI defines (implemented, or
refused by name), logprobs and echo, content parts and roles, limits that hold for any input,
broken sets, clients that hang up, and a short request served while a long one runs."""

import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import hybridtune_server, save_random_sets, save_tiny_lm, wait_for
from hybridtune.core.adapter_io import WEIGHTS_NAME
from hybridtune.core.base_models import load_base

openai = pytest.importorskip("openai")

LORA = {"lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}
HYBRID = {**LORA, "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8}}
QUESTION = [{"role": "user", "content": "what color is the sky?"}]


@pytest.fixture(scope="module")
def sets_dir(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("served")
    save_random_sets(root, tiny_lm_dir, {"alpha": LORA, "hybrid": HYBRID, "broken": LORA})
    weights = root / "broken" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-50])
    return root


@pytest.fixture(scope="module")
def url(sets_dir, tiny_lm_dir):
    with hybridtune_server(tiny_lm_dir, sets_dir, "--max-tokens", "230", "--max-request-bytes", "200000") as address:
        yield address


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def eos(tiny_lm_dir):
    return load_base(str(tiny_lm_dir))[1].eos_token_id


def post(url, path, body, timeout=60):
    return httpx.post(f"{url}{path}", json=body, timeout=timeout)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"presence_penalty": 99}, "presence_penalty", "less than or equal to 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "outside -100..100"),
        ({"logit_bias": {"999999": 1}}, "logit_bias", "outside the vocabulary"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"response_format": {"type": "json_object"}}, "response_format", "no constrained decoding"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", "cannot guarantee JSON"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "does not parse tool calls"),
        ({"frobnicate": 1}, "frobnicate", "unrecognized request argument supplied: frobnicate"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"seed": 2**70}, "seed", "less than or equal to"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias", "keys are token ids"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages",
         "part type 'image_url'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "needs tool_call_id"),
    ],
)  # fmt: skip
def test_parameters_out_of_range_or_unsupported_are_refused_by_name(url, body, param, message):
    response = post(url, "/v1/chat/completions", {"model": "alpha", "messages": QUESTION, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_completions_refuse_what_they_do_not_implement(url):
    cases = [({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"), ({"max_tokens": 0}, "only useful with echo"),
             ({"prompt": [[1, 2], [99999]]}, "vocabulary"), ({"prompt": ["a"] * 9, "n": 8}, "per request"),
             ({"prompt": "x " * 300}, "model context 256")]  # fmt: skip
    for body, message in cases:
        response = post(url, "/v1/completions", {"model": "alpha", "prompt": "hello", **body})
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_bookkeeping_parameters_are_accepted_as_openai_accepts_them(client):
    reply = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=2, temperature=0, user="u1",
                                           metadata={"k": "v"}, store=False, tool_choice="none")  # fmt: skip
    assert reply.choices[0].message.content is not None


def test_content_parts_and_developer_and_tool_roles(client):
    def ask(messages):
        return client.chat.completions.create(model="hybrid", messages=messages, max_tokens=6, temperature=0)

    plain = ask([{"role": "system", "content": "be brief"}, *QUESTION]).choices[0].message.content
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "what color is the sky?"}]}]  # fmt: skip
    assert ask(parts).choices[0].message.content == plain  # developer is the system role; parts are the text
    conversation = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "blue"}]  # fmt: skip
    assert ask(conversation).choices[0].message.content is not None


def test_chat_logprobs_match_the_reply_and_usage_is_streamed(client):
    reply = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)  # fmt: skip
    content = reply.choices[0].logprobs.content
    # each token's exact bytes make the reply (the random model emits partial UTF-8 characters too,
    # which the text shows as U+FFFD and a token as OpenAI does, bytes:\x..)
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        raw = bytes(token.bytes)
        try:
            assert raw.decode() == token.token
        except UnicodeDecodeError:
            assert token.token == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    chunks = list(client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == reply.choices[0].message.content


def test_completions_echo_scores_a_token_prompt_as_lm_eval_asks(url, tiny_lm_dir):
    _, tokenizer = load_base(str(tiny_lm_dir))
    ids = tokenizer("the sky is blue and the grass is green", add_special_tokens=False)["input_ids"]
    body = {"model": "hybrid", "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "seed": 1234}  # fmt: skip
    choice = post(url, "/v1/completions", body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    assert choice["text"].startswith(tokenizer.decode(ids))
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    last = logprobs["top_logprobs"][-1]  # greedy: the generated token is the most likely
    assert logprobs["token_logprobs"][-1] == pytest.approx(max(last.values()))
    scored = post(url, "/v1/completions", {**body, "max_tokens": 0}).json()["choices"][0]["logprobs"]
    assert scored["token_logprobs"] == logprobs["token_logprobs"][:-1]  # the prompt scored alone: the same


def test_streamed_echo_starts_with_the_prompt(client):
    whole = client.completions.create(model="alpha", prompt="the sky is", max_tokens=4, temperature=0, echo=True)
    chunks = client.completions.create(model="alpha", prompt="the sky is", max_tokens=4, temperature=0, echo=True,
                                       stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.choices[0].text.startswith("the sky is")


def test_a_tiny_temperature_and_top_p_zero_are_greedy(client):
    greedy = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=5, temperature=0)
    for options in ({"temperature": 1e-39}, {"temperature": 1.0, "top_p": 0}):
        reply = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=5, **options)
        assert reply.choices[0].message.content == greedy.choices[0].message.content, options


def test_several_prompts_and_choices_in_one_request(client):
    reply = client.completions.create(model="alpha", prompt=["red", "green"], max_tokens=4, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    alone = client.completions.create(model="alpha", prompt="green", max_tokens=4, temperature=0)
    assert reply.choices[1].text == alone.choices[0].text
    sampled = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=6, n=3, seed=7,
                                             temperature=1.5)  # fmt: skip
    again = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=6, n=3, seed=7,
                                           temperature=1.5)  # fmt: skip
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in sampled.choices}) > 1  # each choice its own draw


def test_a_broken_set_is_a_json_error_before_any_byte_and_not_listed(url, client, sets_dir):
    for stream in (False, True):
        response = post(url, "/v1/chat/completions", {"model": "broken", "messages": QUESTION, "stream": stream})
        assert response.status_code == 503 and response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert "adapter set 'broken' cannot be served" in error["message"] and error["param"] == "model"
        assert str(sets_dir) not in error["message"]
    assert "broken" not in [m.id for m in client.models.list()]
    assert "alpha" in [m.id for m in client.models.list()]


def test_no_client_input_gets_a_500(url):
    headers = {"Content-Type": "application/json"}
    for body in [b"[" * 2000, b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"[]", b'"text"', b"\xff\xfe",
                 json.dumps({"model": "alpha", "messages": [{"role": "user", "content": [[[["x"]]]]}]}).encode(),
                 json.dumps({"model": "alpha", "prompt": {"a": 1}}).encode()]:  # fmt: skip
        for path in ("/v1/chat/completions", "/v1/completions"):
            response = httpx.post(f"{url}{path}", content=body, headers=headers, timeout=30)
            assert 400 <= response.status_code < 500 and "error" in response.json(), (body[:40], response.text)


def test_the_body_limit_holds_for_a_chunked_upload(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        piece = b"x" * 65536
        sent = 0
        try:
            for _ in range(200):  # 13 MB offered; the server stops reading after 200 kB
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except OSError:
            pass
        answer = sock.recv(4096)
    assert b" 413 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_short_request_is_served_while_a_long_one_runs(url, client, eos):
    def short():
        start = time.monotonic()
        client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=4, temperature=0)
        return time.monotonic() - start

    alone = statistics.median(short() for _ in range(5))
    started = threading.Event()

    def long_one():
        stream = client.chat.completions.create(model="hybrid", messages=QUESTION, max_tokens=220, temperature=0,
                                                stream=True, logit_bias={str(eos): -100})  # fmt: skip
        for count, _ in enumerate(stream):
            if count == 3:
                started.set()

    runner = threading.Thread(target=long_one)
    runner.start()
    assert started.wait(30)
    during = short()
    still_running = runner.is_alive()
    runner.join()
    assert still_running, "the long request ended before the short one was measured"
    assert during <= 3 * alone + 0.05, f"alone {alone:.3f}s, beside a long request {during:.3f}s"


@pytest.fixture(scope="module")
def long_url(tmp_path_factory):
    """A server whose tiny model takes 4,000-token replies: a row that is not dropped runs for
    seconds, far longer than noticing a client that left takes, on any machine."""
    root = tmp_path_factory.mktemp("long")
    base = save_tiny_lm(root / "base", max_position_embeddings=4096)
    save_random_sets(root / "sets", base, {"alpha": LORA})
    with hybridtune_server(base, root / "sets", "--max-tokens", "4000") as address:
        yield address, load_base(str(base))[1].eos_token_id


def test_clients_that_hang_up_are_dropped_at_the_next_step(long_url):
    url, eos = long_url
    tokens = 4000
    body = {"model": "alpha", "messages": QUESTION, "max_tokens": tokens, "logit_bias": {str(eos): -100}}

    def hang_up():
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as response:
            for count, _ in enumerate(response.iter_lines()):
                if count == 5:
                    return

    def health():
        return httpx.get(f"{url}/health").json()

    wait_for(lambda: health()["live"] == 0, timeout=30, every=0.02)
    before = health()
    threads = [threading.Thread(target=hang_up) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: health()["live"] == 0, timeout=5, every=0.02)
    after = health()
    assert after["cancelled"] - before["cancelled"] == 4, "the hung-up rows were not dropped"
    assert after["row_steps"] - before["row_steps"] < 4 * tokens / 4, "the hung-up rows ran on"
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        post(url, "/v1/chat/completions", body, timeout=0.1)
    wait_for(lambda: health()["live"] == 0, timeout=5, every=0.02)
    end = health()
    assert end["cancelled"] - after["cancelled"] == 1, "the row of the client that gave up was not dropped"
    assert end["row_steps"] - after["row_steps"] < tokens / 4, "the row of the client that gave up ran on"
    start = time.monotonic()
    post(url, "/v1/chat/completions", {**body, "max_tokens": 4, "temperature": 0})
    assert time.monotonic() - start < 2


def test_serve_without_the_extra_says_how_to_install_it(tmp_path):
    code = "import sys; sys.modules['uvicorn'] = None; from hybridtune.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", code, "serve", "--adapters-dir", str(tmp_path)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "pip install 'hybridtune[serve]'" in result.stderr and "Traceback" not in result.stderr
