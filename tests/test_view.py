"""The one view: every family's MoE layers, router, routing and experts, checked against the model itself."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_FAMILIES, random_ids

from moekit.arch import MoEModelView, UnsupportedModelError, routing_mismatch, routing_override
from moekit.arch.families import FAMILIES
from moekit.tiny import UNLISTED_TINY_FAMILIES, build_tiny_model


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def model_and_view(request):
    model = build_tiny_model(request.param)
    return request.param, model, MoEModelView.from_model(model)


def test_view_finds_exactly_the_layers_holding_experts(model_and_view):
    family, model, view = model_and_view
    with_experts = {int(m.group(1)) for name, _ in model.named_parameters()
                    if (m := re.search(r"(?:layers|blocks)\.(\d+)\..*experts\.", name)) and "shared" not in name}
    assert [layer.index for layer in view.layers] == sorted(with_experts)
    assert view.num_experts == 8 and view.top_k == 2
    assert view.config_fields.expert_count, "the config's expert-count key was not found"
    assert view.family_known == (family not in UNLISTED_TINY_FAMILIES)


def test_routing_function_reproduces_the_model_router(model_and_view):
    _, _, view = model_and_view
    hidden = torch.randn(300, view.layers[0].router_weight.shape[-1], generator=torch.Generator().manual_seed(3))
    for layer in view.layers:
        assert routing_mismatch(layer, hidden) <= 1e-6


def test_routing_check_can_fail(model_and_view):
    """A wrong routing spec is caught: the check above is not vacuous."""
    _, _, view = model_and_view
    layer = view.layers[0]
    hidden = torch.randn(300, layer.router_weight.shape[-1], generator=torch.Generator().manual_seed(3))
    right = layer.routing
    wrong_kind = "topk_softmax" if right.kind != "topk_softmax" else "softmax_topk"
    try:
        layer.routing = dataclasses.replace(right, kind=wrong_kind, renormalize="none", scaling=right.scaling * 1.5)
        assert routing_mismatch(layer, hidden) > 1e-4
    finally:
        layer.routing = right


def test_model_runs_identically_through_the_routing_override(model_and_view):
    _, model, view = model_and_view
    ids = random_ids(seed=5)
    with torch.no_grad():
        expected = model(ids).logits
        with routing_override(view, {}):
            got = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)  # the override is removed on exit


def test_masking_an_expert_changes_outputs(model_and_view):
    _, model, view = model_and_view
    ids = random_ids(seed=6)
    mask = torch.ones(view.num_experts, dtype=torch.bool)
    mask[:3] = False
    with torch.no_grad():
        expected = model(ids).logits
        with routing_override(view, {layer.index: mask for layer in view.layers}):
            got = model(ids).logits
    assert (got - expected).abs().max() > 1e-4


def _expert_output(layer, expert: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) computed from the view's per-expert weights only."""
    w = layer.expert_weights(expert)
    experts = layer.experts
    act = getattr(experts, "act_fn", None) or getattr(getattr(experts, "mlp", None), "activation_fn", None)
    up = F.linear(x, w.up, w.up_bias)
    if w.gate is None:
        inner = act(up)
    else:
        gate = F.linear(x, w.gate, w.gate_bias)
        if hasattr(experts, "alpha") and hasattr(experts, "limit"):  # GPT-OSS's clamped SwiGLU
            gate = gate.clamp(max=experts.limit)
            inner = (up.clamp(-experts.limit, experts.limit) + 1) * gate * torch.sigmoid(gate * experts.alpha)
        else:
            inner = act(gate) * up
    return F.linear(inner, w.down, w.down_bias)


def _module_expert_output(layer, expert: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) from the model's own experts module."""
    tokens = x.shape[0]
    if layer.call.kind == "llama4":  # input already scaled per expert; one block of tokens per expert
        return layer.experts(x.repeat(layer.num_experts, 1)).view(layer.num_experts, tokens, -1)[expert]
    index = torch.full((tokens, 1), expert, dtype=torch.long)
    return layer.experts(x, index, torch.ones(tokens, 1)).reshape(tokens, -1)


def test_per_expert_weights_reproduce_each_expert(model_and_view):
    _, _, view = model_and_view
    x = torch.randn(5, view.layers[0].router_weight.shape[-1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for layer in view.layers:
            for expert in range(layer.num_experts):
                torch.testing.assert_close(_expert_output(layer, expert, x), _module_expert_output(layer, expert, x),
                                           rtol=1e-5, atol=1e-6)


def test_shared_experts_found_where_the_family_has_them(model_and_view):
    family, _, view = model_and_view
    has_shared = family in {"qwen2_moe", "qwen3_next", "qwen3_5_moe_text", "deepseek_v2", "deepseek_v3", "glm4_moe",
                            "ernie4_5_moe", "hunyuan_v1_moe", "granitemoeshared", "llama4_text", "exaone_moe",
                            "laguna", "nemotron_h"}
    assert bool(view.layers[0].shared) == has_shared


def test_unlisted_family_is_recognised_by_probing(monkeypatch):
    model = build_tiny_model("deepseek_v3")
    monkeypatch.delitem(FAMILIES, "deepseek_v3")
    view = MoEModelView.from_model(model)
    assert not view.family_known
    assert view.layers[0].routing.kind == "sigmoid_topk"
    hidden = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    assert routing_mismatch(view.layers[0], hidden) <= 1e-6


def test_dense_model_is_refused_with_the_supported_list():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"no MoE layers.*supported model types:.*qwen3_moe"):
        MoEModelView.from_model(model)
