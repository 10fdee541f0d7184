"""Activation offload (``training.offload_activations``): under checkpointing, the layer inputs
autograd keeps go to host memory and come back for the recompute, and nothing else changes.

There is no accelerator here, so the tests use the hooks' ``copy_host_tensors`` switch: CPU
tensors are copied the way device tensors are sent to the host, and come back from that copy."""

from typing import ClassVar

import pytest
import torch
from torch import nn

import hybridtune as ht
from conftest import make_model, quiet, randomize, write_config
from hybridtune.core import activation_offload
from hybridtune.core.activation_offload import ActivationOffload, offloaded_activations
from hybridtune.training.recipe import train
from hybridtune.training.run_config import ConfigError, load_run_config
from hybridtune.training.tracking import read_metrics


class Recording(ActivationOffload):
    """The hooks with host tensors copied and no size floor; every tensor packed, by identity."""

    made: ClassVar[list["Recording"]] = []

    def __init__(self) -> None:
        super().__init__(min_bytes=0, copy_host_tensors=True)
        self.packed: list[torch.Tensor] = []
        Recording.made.append(self)

    def _pack(self, tensor):
        packed = super()._pack(tensor)
        if packed is not tensor:
            self.packed.append(tensor)
        return packed


@pytest.fixture
def recording(monkeypatch):
    Recording.made = []
    monkeypatch.setattr(activation_offload, "ActivationOffload", Recording)
    return Recording.made


def hybrid(checkpointing: bool, offload: bool):
    model = randomize(ht.inject(make_model("llama"), ht.HybridConfig(methods={
        "lora": ht.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
        "adapter": ht.AdapterConfig(bottleneck_size=8, after="mlp"),
    })))  # fmt: skip
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(offload_to_cpu=offload)
    return model


def loss_and_grads(model, input_ids):
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_layer_inputs_go_to_the_host_and_the_gradients_are_unchanged(recording, input_ids):
    reference_loss, reference = loss_and_grads(hybrid(checkpointing=True, offload=False), input_ids)
    assert recording == []  # without offload_to_cpu no hooks run
    model = hybrid(checkpointing=True, offload=True)
    layer_inputs = []
    for layer in model.base_model.model.layers:
        layer.register_forward_pre_hook(lambda _m, args, kwargs: layer_inputs.append(args[0] if args else kwargs[
            "hidden_states"]), with_kwargs=True)  # fmt: skip
    loss, grads = loss_and_grads(model, input_ids)
    [hooks] = recording
    offloaded = {id(t) for t in hooks.packed}
    assert len(layer_inputs) == 2 and all(id(x) in offloaded for x in layer_inputs)  # each layer's input went
    assert not any(isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) for t in hooks.packed)
    # what the checkpointed layers compute inside is not kept, so it is not offloaded either: only
    # tensors of the hidden size (layer inputs, the final norm) or the loss's, no [.., 64] MLP state
    assert all(t.dim() == 0 or t.shape[-1] != model.base_model.config.intermediate_size for t in hooks.packed)
    assert hooks.offloaded_bytes == sum(t.numel() * t.element_size() for t in hooks.packed) > 0
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], atol=0, rtol=0)


def test_no_offload_without_checkpointing_or_outside_training(recording, input_ids):
    model = hybrid(checkpointing=True, offload=True)
    model.eval()
    model(input_ids, labels=input_ids).loss.backward()  # eval mode: nothing to recompute later
    with torch.no_grad():
        model.train()
        model(input_ids)
    model.base_model.activation_checkpointing_disable()  # offload follows checkpointing off
    model(input_ids, labels=input_ids).loss.backward()
    assert recording == []


def test_only_large_activations_on_a_device_are_offloaded():
    hooks = ActivationOffload()
    large = torch.zeros(activation_offload.MIN_BYTES // 4)
    assert not hooks.offloads(large)  # already in host memory
    copying = ActivationOffload(copy_host_tensors=True)
    weight = nn.Parameter(torch.zeros(512, 512))
    assert copying.offloads(large) and not copying.offloads(large[:10])
    assert not copying.offloads(weight) and not copying.offloads(weight.t())
    assert isinstance(offloaded_activations(True), ActivationOffload)
    with torch.no_grad():
        assert not isinstance(offloaded_activations(True), ActivationOffload)
    assert not isinstance(offloaded_activations(False), ActivationOffload)


def test_a_run_with_offload_trains_as_one_without(recording, project, tiny_lm_dir):
    """``hybridtune train`` with the key: the hooks run at every step, the losses equal a run that
    keeps its activations (dropout included: the recompute draws the same masks)."""

    def losses(name, offload):
        path = write_config(project, tiny_lm_dir, name, max_steps=3, gradient_checkpointing=True,
                            offload_activations=offload)  # fmt: skip
        result = train(load_run_config(path), log=quiet)
        return [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "train"]

    kept = losses("kept.yaml", False)
    assert recording == []
    offloaded = losses("offloaded.yaml", True)
    assert len(recording) >= 3 and all(hooks.offloaded_bytes > 0 for hooks in recording[:3])
    assert offloaded == kept and len(kept) == 3


@pytest.mark.parametrize(("training", "expected"), [
    ({"offload_activations": True},
     "offload_activations: true moves the layer inputs that gradient checkpointing keeps to CPU memory; "
     "set gradient_checkpointing: true too"),
    ({"offload_activations": True, "gradient_checkpointing": True, "compile": True},
     "offload_activations: true cannot be combined with compile: true"),
])  # fmt: skip
def test_offload_without_checkpointing_or_with_compile_is_refused(project, tiny_lm_dir, training, expected):
    with pytest.raises(ConfigError) as info:
        load_run_config(write_config(project, tiny_lm_dir, **training))
    assert expected in "\n".join(info.value.problems)
