"""Neuron removal inside routed experts (``moekit.edit.neurons``): exact, stock-loadable, refused where unsafe."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ALL_FAMILIES, capture_transformers_log, random_ids
from transformers import AutoModelForCausalLM

from moekit.arch import MoEModelView
from moekit.edit import PlanError
from moekit.edit.neurons import prune_neurons
from moekit.tiny import build_tiny_model

# Families whose config key for the routed experts' width also sizes other tensors (found structurally by
# tensors_following_width; listed here from their modeling code: shared experts of width
# moe_intermediate_size x n_shared_experts, or shared experts / dense layers reading intermediate_size).
WIDTH_SHARED = {"deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "jamba", "llama4_text",
                "exaone_moe"}


def _random_keep(view: MoEModelView, fraction: float = 0.75, seed: int = 1) -> dict[int, torch.Tensor]:
    width = view.layers[0].intermediate_size
    kept = max(1, int(width * fraction))
    gen = torch.Generator().manual_seed(seed)
    return {layer.index: torch.stack([torch.randperm(width, generator=gen)[:kept].sort().values
                                      for _ in range(layer.num_experts)]) for layer in view.layers}


def _detached(w):
    """A copy of an expert's weights (views into the model otherwise)."""
    from dataclasses import fields, replace

    return replace(w, **{f.name: None if getattr(w, f.name) is None else getattr(w, f.name).detach().clone()
                         for f in fields(w)})


def _masked(model, keep: dict[int, torch.Tensor]):
    """A copy of ``model`` whose removed neurons' down-projection columns are 0 (their activations never reach the
    output): what removing them must compute."""
    clone = copy.deepcopy(model)
    view = MoEModelView.from_model(clone)
    with torch.no_grad():
        for layer in view.layers:
            width = layer.intermediate_size
            for expert in range(layer.num_experts):
                drop = torch.ones(width, dtype=torch.bool)
                drop[keep[layer.index][expert]] = False
                layer.layout.expert_weights(layer.experts, expert).down[:, drop] = 0
    return clone


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_removing_neurons_equals_masking_them_and_reloads_stock(family, tmp_path) -> None:
    model = build_tiny_model(family).eval()
    view = MoEModelView.from_model(model)
    keep = _random_keep(view)
    if family in WIDTH_SHARED:
        with pytest.raises(PlanError, match="also sizes"):
            prune_neurons(view, keep)
        return
    width = view.layers[0].intermediate_size
    with torch.no_grad():
        before = {layer.index: [_detached(layer.layout.expert_weights(layer.experts, e))
                                for e in range(layer.num_experts)] for layer in view.layers}
    masked = _masked(model, keep)
    ids = random_ids()
    with torch.no_grad():
        expected = masked(input_ids=ids).logits
        new_width = prune_neurons(view, keep)
        got = model(input_ids=ids).logits
    assert new_width == keep[view.layers[0].index].shape[1] < width
    # not bit for bit: the down projection's reduction over fewer neurons is blocked differently
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), float((got - expected).abs().max())
    for layer in view.layers:  # each expert holds exactly its kept neurons, in order, in every projection
        assert layer.intermediate_size == new_width
        for expert in range(layer.num_experts):
            old, new = before[layer.index][expert], layer.layout.expert_weights(layer.experts, expert)
            idx = keep[layer.index][expert]
            assert torch.equal(new.up, old.up[idx]) and torch.equal(new.down, old.down[:, idx])
            if old.gate is not None:
                assert torch.equal(new.gate, old.gate[idx])
            for name in ("gate_bias", "up_bias"):
                if getattr(old, name) is not None:
                    assert torch.equal(getattr(new, name), getattr(old, name)[idx])
            if old.down_bias is not None:
                assert torch.equal(new.down_bias, old.down_bias)
    model.save_pretrained(tmp_path / "pruned")
    with capture_transformers_log() as log:
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert log.getvalue() == ""
    assert MoEModelView.from_model(reloaded).layers[0].intermediate_size == new_width
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, got)


def test_keeping_every_neuron_changes_nothing() -> None:
    model = build_tiny_model("qwen3_moe").eval()
    view = MoEModelView.from_model(model)
    ids = random_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        width = view.layers[0].intermediate_size
        prune_neurons(view, {layer.index: torch.arange(width).repeat(layer.num_experts, 1) for layer in view.layers})
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_routed_expert_parameters_shrink_by_the_removed_fraction() -> None:
    model = build_tiny_model("mixtral")
    view = MoEModelView.from_model(model)
    before = sum(p.numel() for layer in view.layers for p in layer.experts.parameters())
    prune_neurons(view, _random_keep(view, fraction=0.5))
    after = sum(p.numel() for layer in view.layers for p in layer.experts.parameters())
    assert after * 2 == before
    assert model.config.intermediate_size == view.layers[0].intermediate_size


def test_bad_neuron_selections_are_refused_before_anything_changes() -> None:
    model = build_tiny_model("qwen3_moe")
    view = MoEModelView.from_model(model)
    good = _random_keep(view)
    first = view.layers[0].index
    width = view.layers[0].intermediate_size
    uneven = dict(good)
    uneven[first] = good[first][:, :-1]
    repeated = {i: k.clone() for i, k in good.items()}
    repeated[first][0, 1] = repeated[first][0, 0]
    outside = {i: k.clone() for i, k in good.items()}
    outside[first][0, -1] = width
    cases = {"different widths": (uneven, "one expert width"), "a missing layer": ({first: good[first]}, "missing"),
             "a repeated neuron": (repeated, "distinct and ascending"), "out of range": (outside, "0..")}
    weights = [p.clone() for p in model.parameters()]
    for label, (keep, message) in cases.items():
        with pytest.raises(PlanError, match=message):
            prune_neurons(view, keep)
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True)), label
