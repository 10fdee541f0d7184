import pytest

import hybridtune as ht
from conftest import make_model
from hybridtune.core.targeting import matches


def lora_targets(model, **kwargs):
    hybrid = ht.inject(model, ht.HybridConfig(methods={"lora": ht.LoRAConfig(**kwargs)}))
    return [name for _, name, _, _ in hybrid.branches()]


def test_plain_names_match_whole_components_only():
    assert matches("q_proj", "model.layers.0.self_attn.q_proj")
    assert matches("self_attn.q_proj", "model.layers.0.self_attn.q_proj")
    assert not matches("proj", "model.layers.0.self_attn.q_proj")
    assert matches(r".*\.0\..*q_proj", "model.layers.0.self_attn.q_proj")
    assert not matches(r"layers\.0\..*q_proj", "model.layers.0.self_attn.q_proj")  # regex must match whole name


def test_suffix_and_regex_targets(llama):
    assert lora_targets(llama, targets=["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert lora_targets(make_model(), targets=[r"model\.layers\.1\..*_proj"]) == [
        f"model.layers.1.{m}" for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    ]  # fmt: skip


def test_all_linear_skips_the_output_head(llama):
    names = lora_targets(llama, targets="all-linear")
    assert len(names) == 14 and not any("lm_head" in n for n in names)


def test_exclude(llama):
    names = lora_targets(llama, targets="all-linear", exclude=["mlp.down_proj", r".*\.1\..*"])
    assert len(names) == 6 and all(".0." in n and "down_proj" not in n for n in names)


def test_pattern_matching_nothing_lists_close_names(llama):
    with pytest.raises(ht.TargetError, match=r"entry 'lora': pattern 'q_prj' matched no module.*q_proj"):
        lora_targets(llama, targets=["q_proj", "q_prj"])


def test_pattern_matching_a_non_linear_module_says_what_is_needed(llama):
    with pytest.raises(
        ht.TargetError, match=r"'mlp' matched model.layers.0.mlp \(LlamaMLP\) and 1 more.*linear layers"
    ):
        lora_targets(llama, targets=["mlp"])


def test_rank_pattern_key_that_matches_no_target_is_an_error(llama):
    with pytest.raises(ValueError, match="rank_pattern key 'w_proj' matches none of the targeted modules"):
        lora_targets(llama, targets=["q_proj"], rank_pattern={"w_proj": 2})


def test_adapter_place_that_matches_nothing(llama):
    cfg = ht.HybridConfig(methods={"a": ht.AdapterConfig(after="ffn")})
    with pytest.raises(ht.TargetError, match="pattern 'ffn' matched no module"):
        ht.inject(llama, cfg)
