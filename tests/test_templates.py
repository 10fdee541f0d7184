"""data.template (a Jinja file, or none for plain text) from training to generation and serving, and
`hybridtune data preview`: rendered examples with the trained tokens marked, lengths, truncation."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import make_tokenizer, quiet, write_config
from hybridtune.cli import app
from hybridtune.serving import AdaptersDir
from hybridtune.serving.api import chat_prompt_ids
from hybridtune.training.data import TEMPLATE_FILE, render_prompt
from hybridtune.training.data_prep import prepare_data
from hybridtune.training.data_preview import marked
from hybridtune.training.recipe import train
from hybridtune.training.run_config import ConfigError, load_run_config
from hybridtune.training.trained_sets import load_trained

MINE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def with_data(path, **data):
    raw = yaml.safe_load(path.read_text())
    raw["data"].update(data)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_template_file_trains_and_travels_with_the_adapters(project, tiny_lm_dir):
    (project / "mine.jinja").write_text(MINE)
    config = load_run_config(with_data(write_config(project, tiny_lm_dir, max_steps=3, save_every=2),
                                       template="mine.jinja"))  # fmt: skip
    tokenizer = make_tokenizer()
    data = prepare_data(config, tokenizer)
    assert tokenizer.chat_template == MINE
    assert marked(tokenizer, data.train[0]) == "[USER] what color is the sky?<|im_end|>[ASSISTANT] «blue<|im_end|>»"

    result = train(config, log=quiet)
    assert (result.adapters_dir / TEMPLATE_FILE).read_text() == MINE
    checkpoints = sorted((result.run_dir / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000002", "step-0000003"]
    for checkpoint in checkpoints:  # mid-stage and final checkpoints carry it too
        assert (checkpoint / "adapters" / TEMPLATE_FILE).read_text() == MINE
    weights = [d / "hybridtune_model.safetensors" for d in (checkpoints[-1] / "adapters", result.adapters_dir)]
    assert weights[0].stat().st_ino == weights[1].stat().st_ino  # the final adapters are stored once
    _, loaded = load_trained(result.adapters_dir)  # generate, eval, export: prompts as in training
    messages = [{"role": "user", "content": "hi"}]
    assert render_prompt(loaded, messages) == "[USER] hi<|im_end|>[ASSISTANT] "
    served = AdaptersDir(result.adapters_dir.parent).template(result.adapters_dir.name)
    ids = chat_prompt_ids(loaded, messages, served)  # the server asks the set in its template
    assert loaded.decode(ids) == "[USER] hi<|im_end|>[ASSISTANT] "
    assert loaded.decode(chat_prompt_ids(make_tokenizer(), messages, None)).startswith("<|im_start|>user")


def test_template_none_is_plain_text_and_a_name_is_refused_with_what_to_do(project, tiny_lm_dir):
    config = load_run_config(with_data(write_config(project, tiny_lm_dir), template="none"))
    tokenizer = make_tokenizer()
    data = prepare_data(config, tokenizer)
    assert tokenizer.chat_template is None
    assert marked(tokenizer, data.train[0]).startswith("### Instruction:\nwhat color is the sky?")
    with pytest.raises(ConfigError, match="template 'qwen' is not a file \\(LLaMA-Factory's named templates"):
        load_run_config(with_data(write_config(project, tiny_lm_dir), template="qwen"))


def test_data_preview_shows_examples_lengths_and_truncation(project, tiny_lm_dir):
    rows = [{"conversations": [{"from": "human", "value": "hi " * 80}, {"from": "gpt", "value": "hello"}]}]
    (project / "long.json").write_text(json.dumps(rows))
    path = with_data(write_config(project, tiny_lm_dir), train=["train.jsonl", "long.json"], max_length=48)
    result = CliRunner().invoke(app, ["data", "preview", str(path), "--count", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "template: the tokenizer's chat template" in out
    assert "<|im_start|>user\nwhat color is the sky?<|im_end|>\n<|im_start|>assistant\n«blue<|im_end|>\n»" in out
    assert "train: 34 examples, tokens min" in out and "eval: 6 examples" in out
    assert "cut by max_length=48: 1 example(s)" in out


def test_named_chat_templates_and_templates_that_refuse_a_role():
    from hybridtune.training.data import DataError, encode

    tok = make_tokenizer()
    plain = tok.chat_template
    tok.chat_template = {"default": plain, "tool_use": MINE}  # as Command-R and Hermes ship them
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_prompt(tok, messages[:1]).startswith("<|im_start|>user")
    assert render_prompt(tok, messages[:1], tools=[{"name": "f"}]).startswith("[SYSTEM] You can call")
    assert encode(tok, messages, 64).labels.count(-100) < len(encode(tok, messages, 64).labels)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}" \
                        "{% endif %}{{ m['content'] }}{% endfor %}"  # fmt: skip
    with pytest.raises(DataError, match="the chat template cannot render this conversation .*no tool role"):
        encode(tok, [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"},
                     {"role": "assistant", "content": "c"}], 64)  # fmt: skip


def test_the_chunked_loss_only_for_architectures_it_knows():
    from conftest import make_model
    from hybridtune.core.chunked_loss import supports_chunked_loss

    model = make_model("llama").requires_grad_(False)  # a frozen base, as PEFT trains it
    assert supports_chunked_loss(model)
    model.config.model_type = "some_new_arch"  # its forward may change the logits: the plain loss
    assert not supports_chunked_loss(model)
    model.config.model_type, model.config.lm_head_multiplier = "llama", 0.5
    assert not supports_chunked_loss(model)
