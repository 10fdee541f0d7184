"""lm-evaluation-harness drives `hybridtune serve` through its OpenAI models (`local-completions`:
log-likelihoods from logprobs + echo, and generation; `local-chat-completions`: chat generation)
and gets what lm-eval computes in this process with its `hf` model on the same hybrid set."""

import json
import os

import pytest

import hybridtune as ht
from conftest import hybridtune_server, save_random_sets
from hybridtune.core.base_models import load_base

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

HYBRID = {
    "lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8},
}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
          "ocean": "blue", "leaf": "green"}  # fmt: skip
CHOICES = ["red", "green", "blue", "white", "black", "yellow"]
LOGLIK_TOLERANCE = 1e-4  # fp32; the server batches rows with others, lm-eval's hf pads its own batches


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    data = tmp_path_factory.mktemp("lm-eval") / "colors.jsonl"
    rows = [{"question": f"what color is the {k}?", "choices": CHOICES, "label": CHOICES.index(v), "answer": v}
            for k, v in COLORS.items()]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "Q: {{question}}\nA:"}  # fmt: skip
    choice = {**common, "task": "colors_choice", "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
              "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}  # fmt: skip
    answer = {**common, "task": "colors_answer", "output_type": "generate_until", "doc_to_target": "{{answer}}",
              "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 6, "do_sample": False},
              "metric_list": [{"metric": "exact_match"}]}  # fmt: skip
    return choice, answer


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("sets")
    save_random_sets(root, tiny_lm_dir, {"hybrid": HYBRID})
    with hybridtune_server(tiny_lm_dir, root) as url:
        yield url, root / "hybrid"


def evaluate(model, tasks, **options):
    from lm_eval.tasks import TaskManager

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=TaskManager(include_defaults=False),
                                   log_samples=True, bootstrap_iters=0, **options)  # fmt: skip


def test_lm_eval_through_the_server_equals_lm_eval_in_process(served, tasks, tiny_lm_dir):
    from lm_eval.models.huggingface import HFLM

    url, set_dir = served
    base, tokenizer = load_base(str(tiny_lm_dir))
    in_process = HFLM(pretrained=ht.load(base, set_dir).eval(), tokenizer=tokenizer, batch_size=4, device="cpu")
    local = evaluate(in_process, tasks)
    remote = evaluate("local-completions", tasks, model_args={
        "model": "hybrid", "base_url": f"{url}/v1/completions", "tokenizer": str(tiny_lm_dir),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 2, "max_retries": 1,
        "batch_size": 4, "max_length": 256})  # fmt: skip
    pairs = list(zip(local["samples"]["colors_choice"], remote["samples"]["colors_choice"], strict=True))
    assert len(pairs) == len(COLORS)
    for mine, theirs in pairs:
        for (loglik, greedy), (served_loglik, served_greedy) in zip(mine["filtered_resps"], theirs["filtered_resps"],
                                                                    strict=True):  # fmt: skip
            assert served_loglik == pytest.approx(loglik, abs=LOGLIK_TOLERANCE)
            assert served_greedy == greedy
    assert remote["results"]["colors_choice"]["acc,none"] == local["results"]["colors_choice"]["acc,none"]
    generated = [s["resps"][0][0] for s in local["samples"]["colors_answer"]]
    assert [s["resps"][0][0] for s in remote["samples"]["colors_answer"]] == generated
    assert any(generated), "the generation task produced nothing to compare"


def test_lm_eval_chat_completions_equal_its_in_process_chat(served, tasks, tiny_lm_dir):
    from lm_eval.models.huggingface import HFLM

    url, set_dir = served
    answer = [tasks[1]]
    base, tokenizer = load_base(str(tiny_lm_dir))
    in_process = HFLM(pretrained=ht.load(base, set_dir).eval(), tokenizer=tokenizer, batch_size=4, device="cpu")
    local = evaluate(in_process, answer, apply_chat_template=True)
    chat_api = {"model": "hybrid", "base_url": f"{url}/v1/chat/completions", "num_concurrent": 2, "max_retries": 1}
    remote = evaluate("local-chat-completions", answer, apply_chat_template=True, model_args=chat_api)
    generated = [s["resps"][0][0] for s in local["samples"]["colors_answer"]]
    assert [s["resps"][0][0] for s in remote["samples"]["colors_answer"]] == generated
    assert any(generated)
