"""LLaMA-Factory's data layer, read as its users write it (files written here in its formats): a
dataset_info.json with several datasets, column and tag mappings, alpaca history, a tool-calling
sharegpt set, CSV and parquet files, num_samples / max_samples; masking checked token by token."""

import csv
import json

import pytest
import yaml

from conftest import make_tokenizer, write_config
from hybridtune.training.data import IGNORE_INDEX, TOOLS_PREAMBLE, encode, render_prompt
from hybridtune.training.dataset_info import read_datasets
from hybridtune.training.records import DataError, read_examples
from hybridtune.training.run_config import ConfigError, load_run_config

TOOL = {"name": "get_weather", "description": "weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}}}  # fmt: skip
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
GLAIVE = {
    "conversations": [
        {"from": "human", "value": "weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": '{"temp": 20}'},
        {"from": "gpt", "value": "It is 20 degrees."},
    ],
    "tools": json.dumps([TOOL]),
}
# a template that reads tools and tool_calls (as Qwen's and Llama 3.1's do)
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}{% else %}{{ m['content'] }}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "alpaca.json").write_text(json.dumps([
        {"instruction": "say red", "input": "", "output": "red"},
        {"instruction": "classify", "input": "good film", "output": "positive", "id": 7},
    ]))  # fmt: skip
    (d / "identity.json").write_text(json.dumps([
        {"q": "who are you?", "a": "a bot", "sys": "be brief", "hist": [["hi", "hello"]], "fns": json.dumps([TOOL])},
    ] * 3))  # fmt: skip
    (d / "glaive.json").write_text(json.dumps([GLAIVE] * 2))
    (d / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "system", "content": "you are a bot"}, {"role": "user", "content": "say blue"},
        {"role": "assistant", "content": "blue"}]}) + "\n")  # fmt: skip
    with (d / "rows.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows([{"instruction": f"count {i}", "input": "", "output": str(i)} for i in range(4)])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["1", "2"]}), d / "rows.parquet")
    info = {
        "alpaca_demo": {"file_name": "alpaca.json"},
        "identity": {"file_name": "identity.json",
                     "columns": {"prompt": "q", "response": "a", "system": "sys", "history": "hist", "tools": "fns"}},
        "glaive_toolcall": {"file_name": "glaive.json", "formatting": "sharegpt",
                            "columns": {"messages": "conversations", "tools": "tools"}},
        "openai_chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant", "system_tag": "system"}},
        "csv_rows": {"file_name": "rows.csv"},
        "parquet_rows": {"file_name": "rows.parquet", "num_samples": 5},
    }  # fmt: skip
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def test_dataset_info_reads_every_format_and_mapping(data_dir):
    notes = []
    names = ["alpaca_demo", "identity", "glaive_toolcall", "openai_chat", "csv_rows", "parquet_rows"]
    examples = read_datasets(names, data_dir, max_samples=None, seed=0, notes=notes)
    assert len(examples) == 2 + 3 + 2 + 1 + 4 + 5  # parquet_rows: 2 records sampled up to 5
    alpaca, identity, glaive, chat, csv_row = examples[1], examples[2], examples[5], examples[7], examples[8]
    assert alpaca.messages == [{"role": "user", "content": "classify\ngood film"}, {"role": "assistant",
                                                                                   "content": "positive"}]  # fmt: skip
    assert [m["role"] for m in identity.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert identity.messages[1:3] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert identity.tools == [TOOL]  # an alpaca tools column, as LLaMA-Factory reads it
    assert [m["role"] for m in glaive.messages] == ["user", "assistant", "tool", "assistant"]
    assert glaive.messages[1]["tool_calls"] == [{"type": "function", "function": CALL}]
    assert glaive.tools == [TOOL]
    assert chat.messages[0] == {"role": "system", "content": "you are a bot"}
    assert csv_row.messages[-1] == {"role": "assistant", "content": "0"}
    sampled = [e.messages[-1]["content"] for e in examples[-5:]]
    assert len(sampled) == 5 and set(sampled) == {"1", "2"}  # every record once, then repeats
    assert notes == [f"{data_dir / 'alpaca.json'}: field(s) id are not read (no column names them)"]
    # max_samples: the first N of each dataset
    firsts = read_datasets(["csv_rows", "identity"], data_dir, max_samples=2, seed=0)
    assert [e.messages[-1]["content"] for e in firsts] == ["0", "1", "a bot", "a bot"]


def test_tool_turns_are_masked_token_by_token_with_and_without_a_tool_template(data_dir):
    (example,) = read_examples(data_dir / "glaive.json", "auto")[:1]
    for template in (None, TOOL_TEMPLATE):
        tok = make_tokenizer()
        if template:
            tok.chat_template = template
        enc = encode(tok, example.messages, 512, example.tools)
        pieces, current, trained = [], [], None
        for token, label in zip(enc.input_ids, enc.labels, strict=True):
            if (label != IGNORE_INDEX) != trained and current:
                pieces.append((trained, tok.decode(current)))
                current = []
            trained = label != IGNORE_INDEX
            current.append(token)
        pieces.append((trained, tok.decode(current)))
        targets = [text for is_target, text in pieces if is_target]
        prompts = "".join(text for is_target, text in pieces if not is_target)
        if template:  # structured: the template renders the call and the tool list itself
            assert targets == [
                '<call>get_weather {"city": "Paris"}</call><|im_end|>\n',
                "It is 20 degrees.<|im_end|>\n",
            ]
            assert prompts.startswith("<|im_start|>system\ntools: [{")
        else:  # the call stays its JSON text, the tools go into the system message
            assert targets == [json.dumps(CALL) + "<|im_end|>\n", "It is 20 degrees.<|im_end|>\n"]
            assert prompts.startswith(f"<|im_start|>system\n{TOOLS_PREAMBLE}[{{")
        assert '<|im_start|>tool\n{"temp": 20}<|im_end|>' in prompts  # the observation is context, not a target
        assert "weather in Paris?" in prompts
        prompt = render_prompt(tok, example.messages[:-1], example.tools)
        assert tok.decode(enc.input_ids).startswith(prompt)  # inference sees what training saw


def test_history_answers_are_trained(data_dir):
    (example,) = read_datasets(["identity"], data_dir, max_samples=1, seed=0)
    enc = encode(make_tokenizer(), example.messages, 512)
    tok = make_tokenizer()
    trained = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == "hello<|im_end|>\na bot<|im_end|>\n"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"hf_hub_url": "org/set"}, "hf_hub_url downloads it, and hybridtune reads local files only"),
        ({"file_name": "alpaca.json", "ranking": True}, "ranking \\(preference\\) data trains DPO/RM stages"),
        ({"file_name": "alpaca.json", "columns": {"prompt": "instruction", "chosen": "c"}}, "column 'chosen' holds"),
        ({"file_name": "alpaca.json", "columns": {"promt": "instruction"}}, "unknown alpaca column 'promt'"),
        ({"file_name": "alpaca.json", "split": "test"}, "split 'test': a local file has only the 'train' split"),
        ({"file_name": "glaive.json", "formatting": "sharegpt", "tags": {"role": "from"}}, "unknown tag\\(s\\) role"),
        ({"file_name": "missing.json"}, "dataset file .*missing.json' does not exist"),
        ({"file_name": "alpaca.json", "formating": "alpaca"}, "unknown key 'formating'.*did you mean 'formatting'"),
    ],
)
def test_what_hybridtune_does_not_do_is_refused_by_name(data_dir, entry, message):
    (data_dir / "dataset_info.json").write_text(json.dumps({"mine": entry}))
    with pytest.raises(DataError, match=message):
        read_datasets(["mine"], data_dir, None, 0)


def test_a_run_trains_on_named_datasets_and_validate_reports_unknown_ones(project, tiny_lm_dir, data_dir):
    from hybridtune.training.recipe import train

    path = write_config(project, tiny_lm_dir, max_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {"dataset": "alpaca_demo, glaive_toolcall,identity", "dataset_dir": "data", "val_size": 0.2,
                   "cutoff_len": 128, "max_samples": 50}  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    config = load_run_config(path)
    assert config.data.dataset == ["alpaca_demo", "glaive_toolcall", "identity"] and config.data.max_length == 128
    logged = []
    result = train(config, log=lambda *a, **k: logged.append(" ".join(map(str, a))))
    assert result.summary["after"]["eval_loss"] > 0
    assert any("field(s) id are not read" in line for line in logged)

    raw["data"]["dataset"] = "alpaca_demo,glaive"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="dataset 'glaive' is not in .*dataset_info.json \\(it has: alpaca_demo"):
        load_run_config(path)
    del raw["data"]["dataset"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="give data.train \\(files\\) or data.dataset"):
        load_run_config(path)
