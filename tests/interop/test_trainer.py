"""transformers.Trainer and TRL's SFTTrainer as training loops for a HybridModel, with their
default checkpointing on: checkpoints hold the adapters only, hybridtune.load reads them, and a
resumed run ends with the same weights as an uninterrupted one."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import hybridtune as ht
from conftest import make_model

WEIGHTS = "hybridtune_model.safetensors"


def hybrid():
    base = make_model("llama", initializer_range=0.2)
    return ht.inject(base, {"methods": {
        "lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8},
    }})  # fmt: skip


def rows():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": row, "labels": row} for row in torch.randint(0, 97, (16, 12), generator=g)]


def args(tmp_path, **overrides):
    return TrainingArguments(**{
        "output_dir": str(tmp_path), "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4,
        "learning_rate": 2e-2, "logging_steps": 1, "report_to": [], "use_cpu": True, "disable_tqdm": True,
        "seed": 3, "data_seed": 3, **overrides,
    })  # fmt: skip


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / WEIGHTS)


def test_plain_trainer_checkpoints_without_crashing(tmp_path):
    """A plain Trainer saves a state dict of the whole model (lora_B is stored transposed in memory:
    it used to stop the first checkpoint with 'non contiguous tensor')."""
    trainer = Trainer(model=hybrid(), args=args(tmp_path), train_dataset=rows())
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()


def test_hybrid_trainer_checkpoints_adapters_that_load_and_resume_exactly(tmp_path):
    model = hybrid()
    trainer = ht.HybridTrainer(model=model, args=args(tmp_path / "full"), train_dataset=rows())
    trainer.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"hybridtune_config.json", WEIGHTS, "optimizer.pt", "scheduler.pt"} <= files
    assert "model.safetensors" not in files  # no copy of the frozen base
    assert sum(p.stat().st_size for p in checkpoint.iterdir() if p.name == WEIGHTS) < 100_000

    loaded = ht.load(make_model("llama", initializer_range=0.2), tmp_path / "full" / "checkpoint-4")
    x = rows()[0]["input_ids"][None]
    model.eval()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)

    # a fresh process's view: a new model and trainer, resumed from the run's checkpoint at step 2
    resumed = ht.HybridTrainer(model=hybrid(), args=args(tmp_path / "resumed"), train_dataset=rows())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    ours = adapter_weights(tmp_path / "resumed" / "checkpoint-4")
    uninterrupted = adapter_weights(tmp_path / "full" / "checkpoint-4")
    assert ours.keys() == uninterrupted.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], uninterrupted[key], rtol=1e-6, atol=1e-7)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    trainer = ht.HybridTrainer(model=hybrid(), args=args(tmp_path / "a", max_steps=2), train_dataset=rows())
    trainer.train()
    other = ht.inject(make_model("llama"), {"methods": {"lora": {"type": "lora", "r": 2, "targets": ["q_proj"]}}})
    again = ht.HybridTrainer(model=other, args=args(tmp_path / "b"), train_dataset=rows())
    with pytest.raises(ht.CheckpointError, match="different weights"):
        again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_trl_sft_trainer_trains_checkpoints_and_resumes(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from conftest import make_tokenizer

    tokenizer = make_tokenizer()

    def sft_model():
        base = make_model("llama", initializer_range=0.2, vocab_size=len(tokenizer))
        return ht.inject(base, {"methods": {
            "lora": {"type": "lora", "r": 4, "targets": ["q_proj", "v_proj"]},
            "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8},
        }})  # fmt: skip

    texts = [f"what color is the {w}? {c}" for w, c in [("sky", "blue"), ("grass", "green"), ("snow", "white")]] * 4
    data = Dataset.from_dict({"text": texts})
    SFT = ht.hybrid_trainer(trl.SFTTrainer)

    def sft(model, output):
        config = trl.SFTConfig(**{**args(output).to_dict(), "output_dir": str(output), "max_length": 32,
                                  "dataset_text_field": "text", "packing": False})  # fmt: skip
        return SFT(model=model, args=config, train_dataset=data, processing_class=tokenizer)

    model = sft_model()
    trainer = sft(model, tmp_path / "full")
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < losses[0]
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / WEIGHTS).is_file() and not (checkpoint / "model.safetensors").exists()
    loaded = ht.load(make_model("llama", initializer_range=0.2, vocab_size=len(tokenizer)), checkpoint)
    x = torch.tensor([tokenizer("what color is the sky?")["input_ids"]])
    model.eval()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)

    sft(sft_model(), tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    ours, uninterrupted = adapter_weights(tmp_path / "resumed" / "checkpoint-4"), adapter_weights(checkpoint)
    for key in uninterrupted:
        torch.testing.assert_close(ours[key], uninterrupted[key], rtol=1e-6, atol=1e-7)
