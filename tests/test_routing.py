"""Routing kinds against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.arch.routing import RoutingSpec, select_experts


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def run(spec: RoutingSpec, logits: list[float], bias: list[float] | None = None,
        available: list[bool] | None = None) -> tuple[list[int], list[float]]:
    index, weights = select_experts(
        spec, torch.tensor([logits]), None if bias is None else torch.tensor(bias),
        None if available is None else torch.tensor(available))
    order = weights[0].argsort(descending=True)
    return index[0][order].tolist(), weights[0][order].tolist()


LOGITS = [1.0, 2.0, 3.0, 0.0]
Z = sum(math.exp(x) for x in LOGITS)


def test_softmax_topk_renormalised():
    idx, w = run(RoutingSpec("softmax_topk", 2, 4, renormalize="sum"), LOGITS)
    assert idx == [2, 1]
    assert w == pytest.approx([sig(1.0), 1 - sig(1.0)], abs=1e-6)


def test_softmax_topk_not_renormalised_keeps_full_softmax_mass():
    idx, w = run(RoutingSpec("softmax_topk", 2, 4), LOGITS)
    assert idx == [2, 1]
    assert w == pytest.approx([math.exp(3) / Z, math.exp(2) / Z], abs=1e-6)


def test_softmax_topk_masked_equals_softmax_over_kept_experts():
    idx, w = run(RoutingSpec("softmax_topk", 2, 4), LOGITS, available=[True, True, False, True])
    z_kept = math.exp(1) + math.exp(2) + math.exp(0)
    assert idx == [1, 0]
    assert w == pytest.approx([math.exp(2) / z_kept, math.exp(1) / z_kept], abs=1e-6)


def test_softmax_topk_scaling_and_lp_norm():
    idx, w = run(RoutingSpec("softmax_topk", 2, 4, renormalize="lp", lp_norm=2.0, scaling=3.0), LOGITS)
    a, b = math.exp(3) / Z, math.exp(2) / Z
    norm = math.hypot(a, b)
    assert idx == [2, 1]
    assert w == pytest.approx([3 * a / norm, 3 * b / norm], abs=1e-6)


def test_topk_softmax_softmax_over_selected_logits_only():
    idx, w = run(RoutingSpec("topk_softmax", 2, 4), LOGITS)
    assert idx == [2, 1]
    assert w == pytest.approx([sig(1.0), 1 - sig(1.0)], abs=1e-6)


def test_sigmoid_topk_bias_selects_but_does_not_weigh():
    spec = RoutingSpec("sigmoid_topk", 2, 4, renormalize="sum", scaling=2.5)
    idx, w = run(spec, [0.0, 0.0, 1.0, -1.0], bias=[1.0, 0.0, 0.0, 0.0])
    s0, s2 = 0.5, sig(1.0)
    assert idx == [2, 0]  # expert 0 is chosen through its bias, weighted by its unbiased score
    assert w == pytest.approx([2.5 * s2 / (s0 + s2), 2.5 * s0 / (s0 + s2)], abs=1e-6)


def test_sigmoid_topk_masked_expert_cannot_be_chosen_through_its_bias():
    spec = RoutingSpec("sigmoid_topk", 2, 4)
    idx, w = run(spec, [0.0, 0.0, 1.0, -1.0], bias=[5.0, 0.0, 0.0, 0.0], available=[False, True, True, True])
    assert idx == [2, 1]
    assert w == pytest.approx([sig(1.0), 0.5], abs=1e-6)


def test_sigmoid_topk_group_limited_routing_picks_the_best_group_by_top2_sum():
    # group 0 = experts 0-3 holds the single best expert, group 1 = experts 4-7 the best pair
    logits = [3.0, -3.0, -3.0, -3.0, 2.0, 2.0, -3.0, -3.0]
    spec = RoutingSpec("sigmoid_topk", 2, 8, n_group=2, topk_group=1)
    idx, _ = run(spec, logits)
    assert sorted(idx) == [4, 5]
    ungrouped, _ = run(RoutingSpec("sigmoid_topk", 2, 8), logits)
    assert 0 in ungrouped


def test_softmax_topk_group_limited_by_group_max():
    logits = [3.0, -3.0, -3.0, -3.0, 2.0, 2.0, -3.0, -3.0]
    idx, _ = run(RoutingSpec("softmax_topk", 2, 8, n_group=2, topk_group=1, group_score="max"), logits)
    assert idx[0] == 0 and idx[1] in (1, 2, 3)


def test_softmax_biased_topk_ernie():
    spec = RoutingSpec("softmax_biased_topk", 2, 4, norm_min=1e-12)
    idx, w = run(spec, LOGITS, bias=[0.0, 0.0, 0.0, 1.0])
    p3, p2 = math.exp(0) / Z, math.exp(3) / Z
    assert idx == [2, 3]
    assert w == pytest.approx([p2 / (p2 + p3), p3 / (p2 + p3)], abs=1e-6)


def test_sparsemixer_jitter_band():
    spec = RoutingSpec("sparsemixer", 2, 4, jitter_eps=0.01)
    idx, w = run(spec, [3.0, 2.9, 0.0, -1.0])
    # 2.9 lies outside the first band ((3-2.9)/3 > 0.02): expert 0 gets weight 1; so does expert 1 in step two
    assert idx[0] == 0 and idx[1] == 1 and w == pytest.approx([1.0, 1.0])
    spec = RoutingSpec("sparsemixer", 2, 4, jitter_eps=0.5)
    index, weights = select_experts(spec, torch.tensor([[3.0, 2.9, 0.0, -1.0]]))
    # wide band: step one drops only -1 ((3+1)/3 > 1); step two (max 2.9) drops -1 too ((2.9+1)/2.9 > 1)
    assert index[0].tolist() == [0, 1]
    assert weights[0].tolist() == pytest.approx(
        [math.exp(3) / (math.exp(3) + math.exp(2.9) + 1), math.exp(2.9) / (math.exp(2.9) + 1)], abs=1e-6)


def test_topk_sigmoid_llama4():
    idx, w = run(RoutingSpec("topk_sigmoid", 2, 4), LOGITS)
    assert idx == [2, 1] and w == pytest.approx([sig(3.0), sig(2.0)], abs=1e-6)


def test_mask_must_leave_top_k_experts():
    with pytest.raises(ValueError, match="top_k=2"):
        run(RoutingSpec("softmax_topk", 2, 4), LOGITS, available=[True, False, False, False])


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(KeyError, match="softmax_topk"):
        run(RoutingSpec("nope", 2, 4), LOGITS)


PER_ROW_SPECS = [RoutingSpec("softmax_topk", 2, 8), RoutingSpec("softmax_topk", 3, 8, renormalize="sum"),
                 RoutingSpec("softmax_topk", 2, 8, renormalize="lp", lp_norm=2.0, scaling=1.5),
                 RoutingSpec("softmax_topk", 2, 8, n_group=4, topk_group=2, group_score="max"),
                 RoutingSpec("topk_softmax", 2, 8), RoutingSpec("sigmoid_topk", 2, 8, renormalize="sum", scaling=2.5),
                 RoutingSpec("sigmoid_topk", 2, 8, renormalize="sum", n_group=4, topk_group=2, norm_eps=1e-20),
                 RoutingSpec("softmax_biased_topk", 2, 8, norm_min=1e-12),
                 RoutingSpec("sparsemixer", 2, 8, jitter_eps=0.01), RoutingSpec("topk_sigmoid", 1, 8)]


@pytest.mark.parametrize("spec", PER_ROW_SPECS, ids=lambda s: s.describe())
def test_one_mask_per_candidate_routes_each_as_its_own_mask(spec: RoutingSpec):
    """Logits [C, T, E] with masks [C, 1, E] (NAEE's batched candidates): candidate c's rows are routed as with
    its [E] mask alone."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 8, generator=gen)
    bias = torch.randn(8, generator=gen) * 0.5 if spec.kind in ("sigmoid_topk", "softmax_biased_topk") else None
    masks = torch.ones(4, 8, dtype=torch.bool)
    for c, dropped in enumerate([[], [0, 3], [7, 6, 5], [1, 2, 4, 6]]):
        masks[c, dropped] = False
    index, weights = select_experts(spec, logits.expand(4, 5, 8), bias, masks[:, None, :])
    assert index.shape == weights.shape == (4, 5, spec.top_k)
    for c in range(4):
        alone_index, alone_weights = select_experts(spec, logits, bias, masks[c])
        assert torch.equal(index[c], alone_index)
        torch.testing.assert_close(weights[c], alone_weights, rtol=1e-6, atol=1e-7)
        assert masks[c].gather(0, index[c].reshape(-1)).all()  # no masked expert chosen


def test_per_candidate_mask_must_broadcast_to_the_logits():
    spec = RoutingSpec("softmax_topk", 2, 4)
    with pytest.raises(ValueError, match="broadcasts"):
        select_experts(spec, torch.zeros(3, 2, 4), None, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcasts"):
        select_experts(spec, torch.zeros(3, 2, 4), None, torch.ones(2, 1, 4, dtype=torch.bool))
