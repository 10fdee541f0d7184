"""Save/load round trips, the file layout, and every way a load must refuse."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridtune as ht
from conftest import make_model, randomize
from hybridtune.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME


def hybrid_config():
    return ht.HybridConfig(
        methods={
            "lora": ht.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
            "lora_ffn": ht.LoRAConfig(r=2, targets="down_proj"),
            "adapter": ht.AdapterConfig(after=["self_attn", "mlp"], reduction_factor=8),
        }
    )


@pytest.fixture
def saved(tmp_path, input_ids):
    hybrid = randomize(ht.inject(make_model("llama"), hybrid_config()))
    hybrid.save_adapters(tmp_path / "ckpt")
    return tmp_path / "ckpt", hybrid(input_ids).logits


def test_round_trip_gives_identical_logits(saved, input_ids):
    directory, logits = saved
    loaded = ht.load(make_model("llama"), directory)
    assert torch.equal(loaded(input_ids).logits, logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = ht.load(make_model("llama"), directory, trainable=True)
    counts = trainable.trainable_parameters()
    assert counts["trainable"] == sum(c["total"] for c in counts["entries"].values()) > 0


def test_files_are_small_namespaced_and_self_describing(saved):
    directory, _ = saved
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    tensors = load_file(directory / WEIGHTS_NAME)
    assert {k.split(".")[0] for k in tensors} == {"lora", "lora_ffn", "adapter"}
    assert "lora.model.layers.0.self_attn.v_proj.lora_A" in tensors
    assert tensors["lora.model.layers.0.self_attn.v_proj.lora_A"].shape == (2, 32)
    assert "adapter.model.layers.1.mlp.up.bias" in tensors
    meta = json.loads((directory / CONFIG_NAME).read_text())
    assert meta["methods"]["lora"]["rank_pattern"] == {"v_proj": 2}
    assert meta["base_model"]["model_type"] == "llama"
    assert meta["targets"]["model.layers.0.self_attn.q_proj"] == {"class": "Linear", "shape": [32, 32]}
    assert meta["hybridtune_version"] == ht.__version__ and len(meta["fingerprint"]) == 64
    assert sum(t.numel() for t in tensors.values()) == sum(
        c["total"] for c in ht.load(make_model("llama"), directory).trainable_parameters()["entries"].values()
    )


def _rewrite_weights(directory, change):
    tensors = load_file(directory / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, directory / WEIGHTS_NAME)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta["weights_sha256"] = None  # a hand-edited file: skip the checksum, so the key checks speak
    (directory / CONFIG_NAME).write_text(json.dumps(meta))


def test_missing_key(saved):
    directory, _ = saved
    _rewrite_weights(directory, lambda t: t.pop("lora.model.layers.1.self_attn.q_proj.lora_B"))
    with pytest.raises(ht.CheckpointError, match=r"missing keys: lora\.model\.layers\.1\.self_attn\.q_proj\.lora_B"):
        ht.load(make_model("llama"), directory)


def test_unexpected_key(saved):
    directory, _ = saved
    _rewrite_weights(directory, lambda t: t.update({"lora.model.layers.0.mlp.up_proj.lora_A": torch.zeros(4, 32)}))
    with pytest.raises(ht.CheckpointError, match=r"unexpected keys: lora\.model\.layers\.0\.mlp\.up_proj\.lora_A"):
        ht.load(make_model("llama"), directory)


def test_shape_mismatch_names_module_and_shapes(saved):
    directory, _ = saved
    key = "lora.model.layers.0.self_attn.v_proj.lora_A"
    _rewrite_weights(directory, lambda t: t.update({key: torch.zeros(3, 32)}))
    model = make_model("llama")
    with pytest.raises(
        ht.CheckpointError,
        match=r"entry 'lora' at module 'model.layers.0.self_attn.v_proj': 'lora_A' has shape \[3, 32\] in the "
        r"checkpoint but \[2, 32\] in the model",
    ):
        ht.load(model, directory)
    assert not any(hasattr(m, "hybridtune") for m in model.modules())  # a failed load leaves no branches


def test_truncated_or_corrupt_weights(saved):
    directory, _ = saved
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ht.CheckpointError, match="hybridtune_model.safetensors is corrupt or truncated: its sha256"):
        ht.load(make_model("llama"), directory)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta["weights_sha256"] = None
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ht.CheckpointError, match="hybridtune_model.safetensors is corrupt or truncated: "):
        ht.load(make_model("llama"), directory)


def test_corrupt_or_missing_config(saved, tmp_path):
    directory, _ = saved
    text = (directory / CONFIG_NAME).read_text()
    (directory / CONFIG_NAME).write_text(text[:40])
    with pytest.raises(ht.CheckpointError, match="hybridtune_config.json is corrupt or truncated"):
        ht.load(make_model("llama"), directory)
    with pytest.raises(ht.CheckpointError, match="no hybridtune_config.json in .*not a hybridtune adapter directory"):
        ht.load(make_model("llama"), tmp_path / "nowhere")


def test_different_base_model(saved):
    directory, _ = saved
    with pytest.raises(ht.CheckpointError, match="trained on a 'llama' model .* but the base model given is a 'gpt2'"):
        ht.load(make_model("gpt2"), directory)
    with pytest.raises(
        ht.CheckpointError,
        match=r"module 'model.layers.0.self_attn.q_proj' is Linear with weight shape \[32, 48\] in this base model, "
        r"but the adapters were trained on Linear with shape \[32, 32\]",
    ):
        ht.load(make_model("llama", hidden_size=48), directory)
    with pytest.raises(ht.CheckpointError, match="no module\\(s\\) model.layers.1.mlp, model.layers.1.mlp.down_proj"):
        ht.load(make_model("llama", num_hidden_layers=1), directory)


def test_the_base_is_recognised_by_its_weights_not_its_name(tmp_path):
    model = make_model("llama")
    model.config._name_or_path = "org/base-a"
    ht.inject(model, hybrid_config()).save_adapters(tmp_path)
    same = make_model("llama").to(torch.bfloat16)  # the same weights by another path, in another dtype
    same.config._name_or_path = "/models/base-a"
    ht.load(same, tmp_path)
    other = make_model("llama", seed=1)  # same architecture and shapes, other weights
    other.config._name_or_path = "org/base-b"
    with pytest.raises(ht.CheckpointError, match="trained on base model 'org/base-a', but .* 'org/base-b' "
                                                 "\\(different weights\\)"):  # fmt: skip
        ht.load(other, tmp_path)
    fine_tuned = make_model("llama")  # the same embedding, one layer changed (a merged fine-tune, say)
    with torch.no_grad():
        fine_tuned.model.layers[1].mlp.up_proj.weight.add_(0.05)
    with pytest.raises(ht.CheckpointError, match="different weights"):
        ht.load(fine_tuned, tmp_path)
    merged = ht.inject(make_model("llama"), hybrid_config())  # saved after a merge: still the same base
    randomize(merged).merge()
    merged.save_adapters(tmp_path / "merged")
    ht.load(make_model("llama"), tmp_path / "merged")
    other.config._name_or_path = "org/base-a"  # even under the same name
    with pytest.raises(ht.CheckpointError, match="different weights"):
        ht.load(other, tmp_path)
    ht.load(other, tmp_path, allow_base_mismatch=True)


def test_save_is_atomic(saved, monkeypatch):
    directory, _ = saved
    before = (directory / WEIGHTS_NAME).read_bytes()
    hybrid = randomize(ht.inject(make_model("llama"), hybrid_config()), seed=3)

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("hybridtune.core.adapter_io.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        hybrid.save_adapters(directory)
    assert (directory / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_never_pickles(saved):
    directory, _ = saved
    assert (directory / WEIGHTS_NAME).read_bytes()[8:9] == b"{"  # safetensors: u64 header size, then JSON
