"""The chunked head + loss (core/chunked_loss.py) against transformers' own loss: the same value and
the same gradients to fp32 rounding (1e-6), with label masking, several chunks, padding; and the
plain loss wherever the model computes its logits itself or our branches sit on the head."""

import copy

import pytest
import torch

import hybridtune as ht
import hybridtune.core.chunked_loss as chunked
from conftest import make_model, randomize
from hybridtune.core.chunked_loss import ChunkedLinearCrossEntropy, supports_chunked_loss

TOL = dict(atol=1e-6, rtol=1e-5)
METHODS = {"lora": {"type": "lora", "r": 4, "targets": ["q_proj", "v_proj"]},
           "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8}}  # fmt: skip
GPT2_METHODS = {"lora": {"type": "lora", "r": 4, "targets": ["c_attn"]}}


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 8:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, **options):
    for p in model.parameters_to_train():
        p.grad = None
    out = model(**batch(), **options)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("arch", "methods"), [("llama", METHODS), ("gpt2", GPT2_METHODS)])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_chunked_loss_and_gradients_equal_transformers(arch, methods, rows, monkeypatch):
    monkeypatch.setattr(chunked, "_CHUNK_ELEMENTS", 97 * rows)  # rows per chunk: several chunks, a ragged last
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if arch == "gpt2" else {}
    model = randomize(ht.inject(make_model(arch, **no_dropout), {"methods": methods}))
    model.train()  # gradients on; nothing random
    assert supports_chunked_loss(model.base_model)
    plain, plain_grads = loss_and_grads(model)
    fused, fused_grads = loss_and_grads(model, chunked_loss=True)
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss, **TOL)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **TOL, msg=name)


def test_the_function_itself_against_cross_entropy_with_hidden_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (13,), generator=g)
    labels[[0, 5, 6]] = -100
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, labels)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, labels)
    (grad,) = torch.autograd.grad(got * 3.0, hidden)  # the incoming gradient is applied
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(grad, 3.0 * expected_grad, **TOL)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(ChunkedLinearCrossEntropy.apply(hidden, weight, labels), expected, **TOL)


def test_rows_without_a_label_never_reach_the_head(monkeypatch):
    """The prompt's and the padding's positions have no label: only the labelled rows are
    multiplied by the head, and the loss and gradients stay transformers' (the test above)."""
    seen = []
    original = ChunkedLinearCrossEntropy.forward

    def counted(ctx, hidden, *rest):
        seen.append(hidden.shape[0])
        return original(ctx, hidden, *rest)

    monkeypatch.setattr(ChunkedLinearCrossEntropy, "forward", staticmethod(counted))
    model = randomize(ht.inject(make_model("llama"), {"methods": METHODS}))
    labels = batch()["labels"][:, 1:]
    model(**batch(), chunked_loss=True).loss.backward()
    assert seen == [int((labels != -100).sum())] and seen[0] < labels.numel()


def test_bf16_autocast_matches_the_plain_loss_under_the_same_autocast():
    model = randomize(ht.inject(make_model("llama"), {"methods": METHODS}))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(model)
        fused, fused_grads = loss_and_grads(model, chunked_loss=True)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-3, rtol=1e-3)
    for name in plain_grads:  # both bf16 matmuls; the same logits, summed in another order
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=2e-3, rtol=3e-2, msg=name)


@pytest.mark.parametrize(
    "methods",
    [
        {"prompt": {"type": "prompt_tuning", "num_virtual_tokens": 2}},  # on the model's own forward
        {"head": {"type": "lora", "r": 2, "targets": ["lm_head"]}},  # on the head
    ],
    ids=["prompt_tuning", "lora_on_the_head"],
)
def test_models_that_need_their_own_logits_keep_the_plain_loss(methods):
    model = randomize(ht.inject(make_model("llama"), {"methods": methods}))
    assert not supports_chunked_loss(model.base_model)
    chunked.last_loss_kernel(forget=True)
    out = model(**batch(), chunked_loss=True)
    assert out.logits is not None  # the plain path, whose loss transformers computed
    assert chunked.last_loss_kernel() == "plain"  # what summary.json reports
    assert not supports_chunked_loss(make_model("llama", final_logit_softcapping=30.0))
    trained_head = copy.deepcopy(make_model("llama"))
    trained_head.lm_head.weight.requires_grad_(True)
    assert not supports_chunked_loss(trained_head)
