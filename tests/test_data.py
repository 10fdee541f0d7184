"""Data formats, prompt masking against the tokenizer, truncation, packing, line-numbered errors."""

import json

import pytest

from conftest import make_tokenizer
from hybridtune.training.data import IGNORE_INDEX, DataError, collate, encode, pack, read_examples, render_prompt


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tokenizer, enc):
    return tokenizer.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])


def test_alpaca_masks_exactly_the_prompt_tokens():
    tok = make_tokenizer()
    messages = [{"role": "system", "content": "you are a bot"}, {"role": "user", "content": "what color is the sky?"},
                {"role": "assistant", "content": "blue"}]  # fmt: skip
    enc = encode(tok, messages, max_length=256)
    prompt_ids = tok(render_prompt(tok, messages[:-1]), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert enc.input_ids[:n] == prompt_ids  # what inference feeds the model is what training saw
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    assert enc.labels[n:] == enc.input_ids[n:]
    assert tok.decode(enc.input_ids[n:]) == "blue<|im_end|>\n"
    full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tok.decode(enc.input_ids) == tok.decode(full)


def test_sharegpt_multi_turn_trains_every_assistant_turn_only(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                           {"from": "human", "value": "say red"}, {"from": "gpt", "value": "red"}]},
        {"messages": [{"role": "user", "content": "say blue"}, {"role": "assistant", "content": "blue"}]},
    ])  # fmt: skip
    first, second = read_examples(path)
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant"]
    tok = make_tokenizer()
    enc = encode(tok, first.messages, 256)
    assert trained_text(tok, enc) == "hello<|im_end|>\nred<|im_end|>\n"
    assert trained_text(tok, encode(tok, second.messages, 256)) == "blue<|im_end|>\n"


def test_without_chat_template_uses_a_plain_prompt():
    tok = make_tokenizer(chat_template=False)
    messages = [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red"}]
    enc = encode(tok, messages, 256)
    assert tok.decode(enc.input_ids).startswith("### Instruction:\nsay red\n\n### Response:\n")
    assert trained_text(tok, enc) == "red<|im_end|>"


def test_alpaca_input_and_auto_detection(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "classify", "input": "good film", "output": "positive",
                                               "task": "sentiment"}])  # fmt: skip
    (example,) = read_examples(path)
    assert example.messages[0] == {"role": "user", "content": "classify\ngood film"}  # LLaMA-Factory: one newline
    assert example.task == "sentiment"
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    assert len(read_examples(array, "alpaca")) == 1


def test_truncation_is_counted_and_packing_keeps_labels():
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "what color is the grass?"}, {"role": "assistant", "content": "green"}]
    full = encode(tok, messages, 256)
    cut = encode(tok, messages, 8)
    assert cut.truncated and not full.truncated and cut.input_ids == full.input_ids[:8]
    blocks = pack([full, full, full], max_length=2 * len(full.input_ids))
    assert [len(b.input_ids) for b in blocks] == [2 * len(full.input_ids), len(full.input_ids)]
    assert blocks[0].labels == full.labels * 2
    batch = collate([full, cut], pad_id=0)
    assert batch["labels"][1, 8:].eq(IGNORE_INDEX).all() and batch["attention_mask"][1].sum() == 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n',
            r"bad.jsonl: line 2 is not valid JSON",
        ),
        ('{"instruction": "a"}\n', r"bad.jsonl, record 1: alpaca record needs a string 'output'"),
        ('{"text": "a"}\n', r"bad.jsonl, record 1: cannot tell the format"),
        (
            '{"conversations": [{"from": "robot", "value": "x"}]}\n',
            r"bad.jsonl, record 1: turn 0 \('from': 'robot'\) needs 'from' one of human, user, gpt",
        ),
        (
            '{"conversations": [{"from": "human", "value": "x"}]}\n',
            r"bad.jsonl, record 1: the conversation has no assistant",
        ),
        ("\n\n", r"bad.jsonl' is empty"),
    ],
)
def test_malformed_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_examples(path)


def test_wrong_declared_format(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="bad.jsonl, record 1: sharegpt record needs a non-empty 'conversations'"):
        read_examples(path, "sharegpt")
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl")
