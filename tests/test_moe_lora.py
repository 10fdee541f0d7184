"""LoRA on the fused expert tensors and the routers of MoE blocks (tiny Qwen3-MoE, Mixtral and
Qwen2-MoE): the function against the deltas folded into each expert's tensor (and router) by hand,
the deltas computed for the routed (token, expert) pairs only, rank/alpha patterns, dropout, peft's
`target_parameters` both ways against peft itself, refusals by name, and a YAML run through the
CLI. The contract suite (tests/test_method_contract.py) covers identity, save/load, merge,
gradients and per-row sets."""

import copy

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, OlmoeConfig

import hybridtune as ht
from conftest import MOE_CONFIGS, make_model, randomize, save_tiny_moe, write_config
from hybridtune.cli import main
from hybridtune.core.errors import TargetError
from hybridtune.interop.peft_format import export_peft, import_peft
from hybridtune.methods.lora import RouterLoRABranch
from hybridtune.methods.lora_experts import ExpertLoRABranch

TOL = dict(rtol=1e-5, atol=1e-5)
EXPERT_TENSORS = ["experts.gate_up_proj", "experts.down_proj"]


def experts_lora(**extra):
    return {"methods": {"lora": {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", *EXPERT_TENSORS], **extra}}}


def ids_and_mask(seed=1, rows=2, length=10):
    ids = torch.randint(0, 97, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def folded(base, model):
    """A copy of ``base`` with every branch's delta added to the tensor it adapts, by hand."""
    reference = copy.deepcopy(base)
    params = dict(reference.named_parameters())
    for _, target, _, branch in model.branches():
        if isinstance(branch, ExpertLoRABranch):
            for projection, f in branch.factors.items():
                delta = torch.einsum("eor,eri->eoi", f.lora_B, f.lora_A) * f.scale
                params[f"{target}.{projection}"].data += delta
        else:
            params[f"{target}.weight"].data += branch.B @ branch.A * branch.scale
    return reference


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_expert_lora_equals_its_deltas_folded_into_each_experts_tensor(arch):
    ids, mask = ids_and_mask()
    base = make_model(arch)
    config = experts_lora(rank_pattern={"layers.1.mlp.experts.down_proj": 2}, alpha_pattern={"gate_up_proj": 3.0},
                          targets=["q_proj", "mlp.gate", *EXPERT_TENSORS])  # fmt: skip
    model = randomize(ht.inject(copy.deepcopy(base), config), std=0.3)
    assert sum(isinstance(b, RouterLoRABranch) for _, _, _, b in model.branches()) == 2
    branches = [b for _, _, _, b in model.branches() if isinstance(b, ExpertLoRABranch)]
    assert len(branches) == 2 and all(list(b.factors) == ["gate_up_proj", "down_proj"] for b in branches)
    assert branches[1].factors["down_proj"].rank == 2 and branches[0].factors["down_proj"].rank == 4
    assert branches[0].factors["gate_up_proj"].scale == pytest.approx(3.0 / 4)
    experts = MOE_CONFIGS[arch]().num_local_experts if arch == "mixtral" else 4
    assert branches[0].factors["gate_up_proj"].lora_A.shape[0] == experts
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = folded(base, model)(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert (got - plain).abs().max() > 1e-2  # the deltas matter
    torch.testing.assert_close(got, want, **TOL)


def test_the_deltas_are_computed_for_the_routed_pairs_only(monkeypatch):
    """One low-rank product per (token, chosen expert) pair, never per (token, every expert); in a
    mixed batch, only for the rows of the branch's set."""
    seen = []
    original = ExpertLoRABranch.expert_delta

    def counting(self, projection, x, expert_ids, offsets):
        seen.append((self.set_name, projection, x.shape[0], int(offsets[-1])))
        return original(self, projection, x, expert_ids, offsets)

    monkeypatch.setattr(ExpertLoRABranch, "expert_delta", counting)
    model = randomize(ht.inject(make_model("qwen3_moe"), experts_lora()))
    model.add_set("other", ht.HybridConfig(**experts_lora()))
    ids, mask = ids_and_mask(rows=3, length=5)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    top_k = 2
    assert {s[2] for s in seen} == {3 * 5 * top_k} and all(s[2] == s[3] for s in seen)
    seen.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, adapter_sets=["other", None, "default"])
    assert sorted({(s[0], s[2]) for s in seen}) == [("default", 5 * top_k), ("other", 5 * top_k)]


def test_dropout_masks_the_expert_inputs_in_training_only():
    ids, mask = ids_and_mask()
    model = randomize(ht.inject(make_model("mixtral"), experts_lora(dropout=0.5, targets=EXPERT_TENSORS)))
    with torch.no_grad():
        evals = [model(input_ids=ids, attention_mask=mask).logits for _ in range(2)]
        model.train()
        trains = [model(input_ids=ids, attention_mask=mask).logits for _ in range(2)]
    assert torch.equal(*evals) and not torch.allclose(*trains)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_peft_target_parameters_adapters_import_and_export_exactly(arch, tmp_path):
    ids, mask = ids_and_mask()
    base = make_model(arch)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
                             rank_pattern={"layers.1.mlp.experts.down_proj": 2},
                             alpha_pattern={"layers.0.mlp.gate.weight": 2})  # fmt: skip
    theirs = get_peft_model(copy.deepcopy(base), peft_config).eval()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
    assert (want - base(input_ids=ids).logits).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "peft")

    ours = import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert any(t.endswith("mlp.experts") for t in ours.targets) and any(t.endswith("mlp.gate") for t in ours.targets)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, want, **TOL)

    export_peft(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert back.peft_config["default"].target_parameters
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, want, **TOL)


def test_an_export_peft_cannot_read_is_refused_by_name(tmp_path):
    model = ht.inject(make_model("qwen3_moe"), experts_lora(dropout=0.1))
    with pytest.raises(ValueError, match="peft refuses lora_dropout with target_parameters"):
        export_peft(model, tmp_path / "out")


@pytest.mark.parametrize(
    ("arch", "entry", "message"),
    [
        ("qwen3_moe", {"target_parameters": ["experts.nope"]},
         "target_parameters pattern 'experts.nope' names no expert tensor of this model "
         r"\(its expert tensors: experts.gate_up_proj, experts.down_proj\)"),
        ("llama", {"target_parameters": ["experts.down_proj"]}, "it has no fused MoE experts"),
        ("mixtral", {"targets": ["down_proj"]}, "names fused expert tensors"),
        ("qwen3_moe", {"targets": ["experts"]}, "to adapt them with LoRA, name the tensors: experts.gate_up_proj"),
        ("qwen3_moe", {"targets": ["experts.down_proj"], "r": {"start": 2, "max": 4, "grow_by": 1, "every_steps": 5}},
         "a growing rank .* is not supported on expert tensors"),
        ("qwen3_moe", {"type": "dora", "targets": ["experts.down_proj"]}, "which this method does not adapt"),
        ("qwen3_moe", {"type": "dora", "targets": ["mlp.gate"]}, r"mlp.gate \(Qwen3MoeTopKRouter\).* linear layers"),
        ("mixtral", {"targets": ["q_proj", "mlp.gate"], "dropout": 0.1},
         "dropout 0.1 cannot apply to the router model.layers.0.mlp.gate"),
    ],
)  # fmt: skip
def test_targets_that_cannot_adapt_expert_tensors_are_refused_by_name(arch, entry, message):
    config = {"methods": {"lora": {"type": "lora", "r": 2, **entry}}}
    with pytest.raises(TargetError, match=message):
        ht.inject(make_model(arch), config)


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_a_yaml_run_trains_expert_lora_with_an_adapter_and_the_router_loss(arch, project, tmp_path):
    save_tiny_moe(tmp_path / "moe", arch, output_router_logits=True, router_aux_loss_coef=0.01)
    path = write_config(project, tmp_path / "moe", max_steps=12)
    run = yaml.safe_load(path.read_text())
    lora = experts_lora(targets=["q_proj", "mlp.gate", *EXPERT_TENSORS])["methods"]
    run["methods"] = {**lora, "adapter": {"type": "adapter", "after": "mlp", "bottleneck_size": 8}}
    path.write_text(yaml.safe_dump(run))
    assert main(["train", str(path)]) == 0
    summary = yaml.safe_load((project / "runs" / "run" / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    trained = ht.load(AutoModelForCausalLM.from_pretrained(tmp_path / "moe"), project / "runs" / "run" / "adapters")
    factors = [b.factors["down_proj"].lora_B for _, _, _, b in trained.branches() if isinstance(b, ExpertLoRABranch)]
    routers = [b.lora_B for _, _, _, b in trained.branches() if isinstance(b, RouterLoRABranch)]
    assert factors and routers and all(f.abs().sum() > 0 for f in factors + routers)  # the deltas trained
    # `hybridtune merge --keep-adapters`: LoRA (experts, router, attention) folded into a saved base,
    # the Adapter kept; the result computes what the trained set computes
    adapters = project / "runs" / "run" / "adapters"
    assert main(["merge", "--adapters", str(adapters), "--out", str(tmp_path / "merged"), "--keep-adapters"]) == 0
    merged = ht.load(
        AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "base"), tmp_path / "merged" / "adapters"
    )
    assert set(merged.hybrid_config.methods) == {"adapter"}
    ids = ids_and_mask()[0]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, **TOL)


def test_set_merging_and_the_rank_search_refuse_expert_lora_by_name():
    from hybridtune.interop.set_merging import merge_sets
    from hybridtune.training.rank_search import spectra
    from hybridtune.training.run_config import ConfigError

    model = ht.inject(make_model("qwen3_moe"), experts_lora())
    model.add_set("other", ht.HybridConfig(**experts_lora()))
    with pytest.raises(ValueError, match="entry 'lora' adapts the MoE expert tensors of .*mlp.experts"):
        merge_sets(model, {"default": 0.5, "other": 0.5}, into="both")
    with pytest.raises(ConfigError, match="the rank search covers LoRA on linear layers only"):
        spectra(model)


def test_peft_style_configs_may_name_expert_tensors_only():
    entry = {"type": "lora", "r": 2, "target_modules": None, "target_parameters": ["mlp.experts.down_proj"]}
    model = ht.inject(make_model("qwen3_moe"), {"methods": {"lora": entry}})
    assert sorted(model.targets) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    (branch,) = {type(b) for _, _, _, b in model.branches()}
    assert branch is ExpertLoRABranch


_SIZES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2)  # fmt: skip
MORE_FAMILIES = {  # OLMoE; DeepSeek-V3 (grouped routing, bias-corrected router, shared experts); GPT-OSS
    # (experts stored transposed, with biases and a clamped gate; its router is mlp.router)
    "olmoe": (lambda: OlmoeConfig(**_SIZES, num_experts=4, intermediate_size=16), "mlp.gate"),
    "deepseek_v3": (lambda: DeepseekV3Config(**_SIZES, n_routed_experts=4, moe_intermediate_size=16,
                                             intermediate_size=64, n_shared_experts=1, first_k_dense_replace=0,
                                             n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                                             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8), "mlp.gate"),
    "gpt_oss": (lambda: GptOssConfig(**_SIZES, num_local_experts=4, intermediate_size=16, head_dim=8,
                                     layer_types=["full_attention"] * 2), "mlp.router"),
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(MORE_FAMILIES))
def test_more_families_compute_live_what_their_merged_tensors_compute(arch):
    """Live, the experts run hybridtune's own grouped computation; merged, transformers' own
    forward runs on the merged tensors: equal outputs check the first against the second."""
    make_config, router = MORE_FAMILIES[arch]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make_config()).eval()
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model = ht.inject(base, experts_lora(targets=[router, *EXPERT_TENSORS]))
    ids = ids_and_mask()[0]
    with torch.no_grad():
        plain = model(ids).logits
        randomize(model, std=0.3)
        live = model(ids).logits
        model.merge()
        merged = model(ids).logits
    assert (live - plain).abs().max() > 1e-1
    torch.testing.assert_close(merged, live, **TOL)


def test_exclude_and_dense_patterns_keep_their_meaning_on_moe_models():
    config = experts_lora(targets=EXPERT_TENSORS, exclude=["model.layers.0.mlp.experts"])
    model = ht.inject(make_model("qwen3_moe"), config)
    assert sorted(model.targets) == ["model.layers.1.mlp.experts"]
    # a pattern that selects linear layers (Qwen2-MoE's shared expert) and expert tensors at once is
    # refused; target_parameters name tensors only
    both = r"pattern '\.\*expert\.\*' selects linear layers \(.*shared_expert.*\) and fused expert tensors"
    with pytest.raises(TargetError, match=both):
        ht.inject(make_model("qwen2_moe"), experts_lora(targets=[".*expert.*"]))
    model = ht.inject(make_model("qwen2_moe"), experts_lora(targets=["q_proj"], target_parameters=[".*down_proj"]))
    assert sorted(t for t in model.targets if "mlp" in t) == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]


def test_experts_modules_outside_transformers_experts_interface_are_refused_by_name():
    base = make_model("qwen3_moe")
    del base.model.layers[1].mlp.experts.has_gate  # as a custom experts class without the decorator
    with pytest.raises(TargetError, match=r"layers.1.mlp.experts \(Qwen3MoeExperts\) is not an experts module of"):
        ht.inject(base, experts_lora())


def test_entries_of_one_set_act_together_in_a_routed_batch():
    two = {"methods": {n: {"type": "lora", "r": 2, "targets": ["mlp.gate", "experts.down_proj"]} for n in "ab"}}
    model = randomize(ht.inject(make_model("mixtral"), two), std=0.5)
    ids = ids_and_mask(rows=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_sets=["default", "default"]).logits, model(ids).logits, **TOL)


def test_bf16_identity_at_init_is_bit_exact():
    base = make_model("qwen3_moe").to(torch.bfloat16)
    ids = ids_and_mask()[0]
    with torch.no_grad():
        expected = base(ids).logits
        got = ht.inject(base, experts_lora(targets=["mlp.gate", *EXPERT_TENSORS]))(ids).logits
    assert torch.equal(got, expected)


def test_accelerate_hooks_on_the_experts_keep_running():
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    base = make_model("qwen3_moe")
    add_hook_to_module(base.model.layers[0].mlp.experts, Counting())
    model = randomize(ht.inject(base, experts_lora()))
    ids = ids_and_mask()[0]
    with torch.no_grad():
        live = model(ids).logits
        assert Counting.calls == 1 and (live - make_model("qwen3_moe")(ids).logits).abs().max() > 1e-2
        model.delete_entry("lora")
        torch.testing.assert_close(model(ids).logits, make_model("qwen3_moe")(ids).logits, **TOL)
    assert Counting.calls == 2


def test_gpt_oss_transposed_experts_and_two_entries_on_one_module_export_to_peft(tmp_path):
    make_config, router = MORE_FAMILIES["gpt_oss"]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make_config()).eval()
    methods = {"up": {"type": "lora", "r": 4, "alpha": 8, "targets": [router, "experts.gate_up_proj"]},
               "down": {"type": "lora", "r": 2, "alpha": 2, "targets": ["experts.down_proj"]}}  # fmt: skip
    ours = randomize(ht.inject(copy.deepcopy(base), {"methods": methods}), std=0.3)
    ids = ids_and_mask()[0]
    export_peft(ours, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        want = ours(ids).logits
        assert (want - base(ids).logits).abs().max() > 1e-1
        torch.testing.assert_close(theirs(ids).logits, want, **TOL)
        torch.testing.assert_close(import_peft(copy.deepcopy(base), tmp_path / "peft")(ids).logits, want, **TOL)
