"""Pruning every family to a standard checkpoint: reload, exactness, identity, groups, per-expert tensors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ALL_FAMILIES, capture_transformers_log, random_ids
from transformers import AutoModelForCausalLM

from moekit.arch import MoEModelView, routing_override
from moekit.edit import PlanError, prune_experts, prune_to_checkpoint
from moekit.tiny import build_tiny_model


def _random_keep(view: MoEModelView, count: int, seed: int = 1) -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {layer.index: sorted(torch.randperm(layer.num_experts, generator=gen)[:count].tolist())
            for layer in view.layers}


def _masks(keep: dict[int, list[int]], num_experts: int) -> dict[int, torch.Tensor]:
    return {i: torch.zeros(num_experts, dtype=torch.bool).index_fill_(0, torch.tensor(ids), True)
            for i, ids in keep.items()}


def _load(path):
    with capture_transformers_log() as log:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info, log.getvalue()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_pruned_checkpoint_reloads_and_equals_masked_original(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    view = MoEModelView.from_model(original)
    keep = _random_keep(view, 4)
    result = prune_to_checkpoint(source, keep, tmp_path / "pruned")

    pruned, info, log = _load(result.out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert log == "", f"transformers warned on reload: {log}"
    pruned_view = MoEModelView.from_model(pruned)
    assert pruned_view.num_experts == 4 and [x.index for x in pruned_view.layers] == [x.index for x in view.layers]

    ids = random_ids(seed=11)
    with torch.no_grad():
        with routing_override(view, _masks(keep, view.num_experts)):
            masked = original(ids).logits
        unmasked = original(ids).logits
        got = pruned(ids).logits
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    assert (got - unmasked).abs().max() > 1e-4, "pruning changed nothing: the test could not tell"

    # kept experts are the source's, bit for bit, in order
    for before, after in zip(view.layers, pruned_view.layers, strict=True):
        for new_id, old_id in enumerate(keep[before.index]):
            a, b = before.expert_weights(old_id), after.expert_weights(new_id)
            assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
            assert torch.equal(before.router_weight[old_id], after.router_weight[new_id])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_keeping_every_expert_reloads_bit_identical(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    view = MoEModelView.from_model(original)
    result = prune_to_checkpoint(source, {layer.index: list(range(8)) for layer in view.layers}, tmp_path / "same",
                                 allow_no_removal=True)
    reloaded, info, log = _load(result.out)
    assert log == "" and not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    a, b = original.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_config_writes_every_alias_of_the_expert_count(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen3_moe")
    view = MoEModelView.from_model(AutoModelForCausalLM.from_pretrained(source))
    out = prune_to_checkpoint(source, _random_keep(view, 6), tmp_path / "q").out
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 6 and config["num_local_experts"] == 6  # read by transformers 4.5x and 5.x


def test_plan_and_card_describe_the_removal(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    view = MoEModelView.from_model(AutoModelForCausalLM.from_pretrained(source))
    keep = _random_keep(view, 5)
    out = prune_to_checkpoint(source, keep, tmp_path / "m").out
    plan = json.loads((out / "moekit_plan.json").read_text())
    assert plan["num_experts"] == {"before": 8, "after": 5}
    for layer, ids in keep.items():
        entry = plan["layers"][str(layer)]
        assert entry["kept"] == ids and sorted(entry["removed"] + ids) == list(range(8))
    card = (out / "README.md").read_text()
    # the source far from the output: named by its folder, not by this machine's absolute path
    assert "3 of 8 routed experts" in card and f"`{source.name}`" in card and str(source.resolve()) not in card
    # the plan is itself a keep file: applying it again gives the same weights
    again = prune_to_checkpoint(source, {int(k): v["kept"] for k, v in plan["layers"].items()}, tmp_path / "m2").out
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_group_limited_routing_equal_removal_per_group_is_exact(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("deepseek_v3", n_group=2, topk_group=1)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    view = MoEModelView.from_model(original)
    assert view.layers[0].routing.n_group == 2
    keep = {layer.index: [0, 2, 5, 7] for layer in view.layers}  # two from each group of four
    out = prune_to_checkpoint(source, keep, tmp_path / "g").out
    pruned, _, _ = _load(out)
    assert json.loads((out / "config.json").read_text())["n_group"] == 2
    ids = random_ids(seed=12)
    with torch.no_grad(), routing_override(view, _masks(keep, 8)):
        masked = original(ids).logits
    torch.testing.assert_close(pruned(ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_group_limited_routing_unequal_removal_needs_allow_regroup(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("deepseek_v3", n_group=2, topk_group=1)
    keep = {1: [0, 1, 2, 4], 2: [0, 1, 2, 4]}  # three from group 0, one from group 1
    with pytest.raises(PlanError, match="per group"):
        prune_to_checkpoint(source, keep, tmp_path / "g")
    assert not (tmp_path / "g").exists()
    keep = {1: [0, 1, 4, 5, 6, 7], 2: [0, 1, 2, 4, 5, 6]}
    out = prune_to_checkpoint(source, keep, tmp_path / "g", allow_regroup=True).out
    _, info, _ = _load(out)
    assert not info["missing_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize(("keep", "message"), [
    ({1: [0, 1, 2, 3, 4], 2: [0, 1, 2, 3, 4]}, "divisible by n_group=2"),
    ({1: [0, 4], 2: [0, 4]}, "at least 2 per group"),
])
def test_group_constraints(keep, message, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("deepseek_v3", n_group=2, topk_group=1)
    with pytest.raises(PlanError, match=message):
        prune_to_checkpoint(source, keep, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_group_constraint_topk_group_times_group_size():
    model = build_tiny_model("deepseek_v3", top_k=6, n_group=2, topk_group=1)
    view = MoEModelView.from_model(model)
    with pytest.raises(PlanError, match="fewer than top_k=6"):
        prune_experts(view, {1: [0, 1, 2, 4, 5, 6], 2: [0, 1, 2, 4, 5, 6]})


def test_every_per_expert_tensor_is_sliced_fp8_scales_included():
    model = build_tiny_model("qwen3_moe")
    view = MoEModelView.from_model(model)
    experts = view.layers[0].experts
    scales = torch.arange(8 * 4 * 2, dtype=torch.float32).view(8, 4, 2)
    experts.register_buffer("gate_up_proj_scale_inv", scales.clone())
    keep = {layer.index: [1, 3, 4, 6] for layer in view.layers}
    prune_experts(view, keep)
    torch.testing.assert_close(experts.gate_up_proj_scale_inv, scales[[1, 3, 4, 6]])
    assert experts.num_experts == 4 and model.config.num_experts == 4
