"""A tour of what goes beyond one adapter, on a tiny model built from a config (runs in seconds).

python examples/beyond_one_adapter.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hybridtune as ht
from hybridtune.interop.set_merging import Ensemble, RuleRouter, merge_sets


def tiny_base():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=128)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def pretend_trained(model):
    with torch.no_grad():
        for p in model.parameters_to_train():
            p.normal_(0, 0.05)


ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(1))

# 1. Several named adapter sets on one base: switching copies no weights.
model = ht.inject(tiny_base(), {"methods": {"lora": {"type": "lora", "r": 8, "targets": ["q_proj", "v_proj"]}}},
                  set_name="medical")  # fmt: skip
pretend_trained(model)
model.add_set("legal", {"methods": {"lora": {"type": "lora", "r": 4, "targets": "all-linear"},
                                    "adapter": {"type": "adapter", "after": "mlp"}}})  # fmt: skip
with model.using("legal"):
    pretend_trained(model)
print("sets:", model.list_sets(), "active:", model.active_set)
with model.using("legal"):
    legal_logits = model(ids).logits

# 2. One forward pass, a different set per row (None = the base model); generate too.
mixed = model(ids, adapter_sets=["medical", "legal", None, "legal"]).logits
assert torch.allclose(mixed[1], legal_logits[1], atol=1e-5)
tokens = model.generate(ids, adapter_sets=["medical", "legal", None, "legal"], max_new_tokens=5, do_sample=False,
                        pad_token_id=0)  # fmt: skip
print("mixed-batch generate:", tokens.shape)

# Pick the set per request by a metadata field.
router = RuleRouter("domain", {"med": "medical", "law": "legal"})
print("routed:", router.route([{"domain": "law"}, {"domain": "med"}, {"domain": "other"}]))

# 3. Save and load sets independently.
with tempfile.TemporaryDirectory() as tmp:
    model.save_set("legal", f"{tmp}/legal")
    other = ht.load(tiny_base(), f"{tmp}/legal", set_name="legal")
    assert torch.allclose(other(ids).logits, legal_logits, atol=1e-6)

# 4. Ensemble: weighted average of several sets' logits, in one batched pass.
ensemble = Ensemble(model, {"medical": 0.5, "legal": 0.5})
print(
    "ensemble logits:", tuple(ensemble(ids).shape), "generate:", tuple(ensemble.generate(ids, max_new_tokens=3).shape)
)

# 5. Merge LoRA sets into one (exact: ranks add up; or svd to a rank), then deploy it merged.
model.add_set("general", {"methods": {"lora": {"type": "lora", "r": 8, "targets": ["q_proj", "v_proj"]}}})
with model.using("general"):
    pretend_trained(model)
merge_sets(model, {"medical": 0.7, "general": 0.3}, into="blend")
merge_sets(model, {"medical": 0.7, "general": 0.3}, into="blend_r4", method="svd", rank=4)
print("sets after merging:", model.list_sets())

# 6. A rank that grows during training (the optimizer keeps its state; the function is unchanged).
schedule = {"start": 2, "max": 8, "grow_by": 2, "every_steps": 10}
grow = ht.inject(tiny_base(), {"methods": {"lora": {"type": "lora", "alpha": 8, "targets": ["q_proj"], "r": schedule}}})
print("rank at step 25:", grow.update_rank_schedules(step=25, epoch=0.0))

# 7. Multi-task LoRA mixture: hard routing by task id per row.
mixture = {"type": "lora_mixture", "tasks": ["sentiment", "flip"], "r": 4, "targets": ["q_proj", "v_proj"]}
mix = ht.inject(tiny_base(), {"methods": {"mix": mixture}})
pretend_trained(mix)
print("mixture logits:", tuple(mix(ids, task_ids=[0, 1, 1, 0]).logits.shape))
