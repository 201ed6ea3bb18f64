"""Criteria by hand, plans (determinism, protections, groups, set weights), NAEE against brute force."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import ALL_FAMILIES, random_ids

from moekit.arch.view import MoEModelView
from moekit.data import CalibrationSet
from moekit.edit.keep import PlanError
from moekit.plan import PlanRequest, make_prune_plan
from moekit.plan.naee import collect_block_inputs, search_layer
from moekit.profile import Profile, collect_profile
from moekit.profile.profile_file import FORMAT, FORMAT_VERSION, model_fingerprint
from moekit.profile.stats import CHUNK_SIZES, STATS
from moekit.registry import UnknownNameError
from moekit.score import CRITERIA, layer_stats, parse_set_weights
from moekit.tiny import build_tiny_model

# One layer, four experts, two sets; every statistic given by hand.
HAND = {
    "tokens": [10.0, 5.0],
    "count": [[4, 0, 10, 6], [2, 4, 4, 0]],
    "gate_sum": [[2.0, 0, 5.0, 3.0], [1.0, 2.0, 1.0, 0]],
    "router_prob_sum": [[2.5, 0.5, 4.0, 3.0], [1.0, 2.0, 1.5, 0.5]],
    "norm_sum": [[8.0, 0, 10.0, 30.0], [4.0, 4.0, 2.0, 0]],
    "gated_norm_sum": [[4.0, 0, 5.0, 12.0], [2.0, 6.0, 1.0, 0]],
    "easy_ep_sum": [[1.0, 0, 2.0, 0.5], [0.5, 0.5, 0.5, 0]],
    "act_max": [[1.0, 0, 2.0, 3.0], [1.0, 9.0, 1.0, 0]],
}


def hand_profile(view: MoEModelView | None = None) -> Profile:
    experts = 4
    stats = {name: torch.zeros((2, *(experts if d == "E" else len(CHUNK_SIZES) for d in dims)),
                               dtype=torch.float64 if reduce == "sum" else torch.float32)
             for name, (dims, reduce) in STATS.items()}
    for name, value in HAND.items():
        stats[name] = torch.tensor(value, dtype=stats[name].dtype)
    fingerprint = model_fingerprint(view) if view is not None else {
        "moe_layers": [0], "num_experts": [experts], "top_k": 1, "model_type": "x", "config_sha256": "",
        "num_parameters": 0}
    layers = {index: {k: v.clone() for k, v in stats.items()} for index in fingerprint["moe_layers"]}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "options": {"neuron_stats": False},
            "sets": [{"name": "code", "tokens": 10, "sequences": 1, "data": {"path": "code"}},
                     {"name": "prose", "tokens": 5, "sequences": 1, "data": {"path": "prose"}}],
            "model": {"source": "hand", "fingerprint": fingerprint}}
    return Profile(meta, layers)


def test_every_criterion_by_hand() -> None:
    stats = layer_stats(hand_profile(), 0, {"code": 1.0, "prose": 0.0})  # code alone: sums / 10 tokens
    per_token = {k: torch.tensor(v[0], dtype=torch.float64) / 10 for k, v in HAND.items() if k != "tokens"}
    expected = {
        "frequency": per_token["count"],
        "router_mass": per_token["router_prob_sum"],
        "ean_sum": per_token["norm_sum"],
        "ean_mean": torch.tensor([8 / 4, 0, 10 / 10, 30 / 6], dtype=torch.float64),
        "weighted_ean_sum": per_token["gated_norm_sum"],
        "reap": torch.tensor([4 / 4, 0, 5 / 10, 12 / 6], dtype=torch.float64),
        "easy_ep": per_token["easy_ep_sum"],
    }
    assert set(CRITERIA.names()) == {*expected, "random"}
    for name, value in expected.items():
        torch.testing.assert_close(CRITERIA.get(name)(stats), value, rtol=1e-12, atol=0, msg=name)
    first = CRITERIA.get("random")(stats)
    assert torch.equal(first, CRITERIA.get("random")(stats)) and first.unique().numel() == 4
    assert not torch.equal(first, CRITERIA.get("random")(layer_stats(hand_profile(), 0, seed=1)))


def test_set_weights_combine_per_token() -> None:
    stats = layer_stats(hand_profile(), 0, parse_set_weights("code=2,prose=1", ["code", "prose"]))
    count = 2 * torch.tensor(HAND["count"][0]) / 10 + torch.tensor(HAND["count"][1]) / 5
    gated = 2 * torch.tensor(HAND["gated_norm_sum"][0]) / 10 + torch.tensor(HAND["gated_norm_sum"][1]) / 5
    torch.testing.assert_close(CRITERIA.get("frequency")(stats), count.double())
    torch.testing.assert_close(CRITERIA.get("reap")(stats), (gated / count).double())
    assert parse_set_weights("prose=1", ["code", "prose"]) == {"code": 0.0, "prose": 1.0}
    for bad in ("code", "code=-1", "other=1", "code=0"):
        with pytest.raises(ValueError, match="set weights"):
            parse_set_weights(bad, ["code", "prose"])


def _profile(model, seed: int = 0) -> Profile:
    ids = random_ids(seed, 4, 48)
    return collect_profile(model, [CalibrationSet("data", ids, torch.ones_like(ids))], progress=False)


def test_plans_are_deterministic_and_follow_scores() -> None:
    model = build_tiny_model("qwen3_moe")
    view = MoEModelView.from_model(model)
    profile = _profile(model)
    request = PlanRequest("frequency", ratio=0.25, protect_super=False)
    first = json.dumps(make_prune_plan(view, profile, request), sort_keys=True)
    assert first == json.dumps(make_prune_plan(view, profile, request), sort_keys=True)
    plan = json.loads(first)
    for layer in view.layers:
        counts = profile.stat(layer.index, "count")
        kept = plan["layers"][str(layer.index)]["kept"]
        assert len(kept) == 6
        expected = sorted(sorted(range(8), key=lambda j: (-float(counts[j]), j))[:6])
        assert kept == expected
        entries = plan["layers"][str(layer.index)]["experts"]
        assert [e["decision"] == "keep" for e in entries] == [j in kept for j in range(8)]
        assert all("score rank" in e["reason"] for e in entries)


def test_protections_hold() -> None:
    model = build_tiny_model("mixtral")
    view = MoEModelView.from_model(model)
    profile = _profile(model)
    layer = view.layers[1].index
    counts = profile.stat(layer, "count")
    weakest = min(range(8), key=lambda j: (float(counts[j]), -j))
    plan = make_prune_plan(view, profile, PlanRequest("frequency", keep=2, protect=((layer, weakest),),
                                                      protect_super=False))
    assert weakest in plan["layers"][str(layer)]["kept"]
    assert plan["layers"][str(layer)]["experts"][weakest]["reason"] == "protected: named by the user"
    # make one expert a super expert by hand: it is kept although it is never the best by frequency
    profile.layers[0]["act_max"][:, weakest] = 1000.0
    plan = make_prune_plan(view, profile, PlanRequest("frequency", keep=2))
    assert weakest in plan["layers"]["0"]["kept"]
    assert plan["details"]["protections"]["super_experts"] == [[0, weakest]]
    unprotected = make_prune_plan(view, profile, PlanRequest("frequency", keep=2, protect_super=False))
    assert unprotected["details"]["protections"]["super_experts"] == []
    with pytest.raises(PlanError, match="protected experts"):
        make_prune_plan(view, profile, PlanRequest("frequency", keep=2,
                                                   protect=((0, 0), (0, 1), (0, 2)), protect_super=False))


def test_group_limited_routing_keeps_every_group_equal() -> None:
    model = build_tiny_model("deepseek_v3", n_group=2, topk_group=1)
    view = MoEModelView.from_model(model)
    plan = make_prune_plan(view, _profile(model), PlanRequest("reap", ratio=0.5, protect_super=False))
    for entry in plan["layers"].values():
        assert sum(e < 4 for e in entry["kept"]) == 2 and sum(e >= 4 for e in entry["kept"]) == 2
    with pytest.raises(PlanError, match="multiple of 2"):
        make_prune_plan(view, _profile(model), PlanRequest("reap", keep=5, protect_super=False))


@pytest.mark.parametrize(("request_", "message"), [
    (PlanRequest("reap", ratio=1.0), "strictly between 0 and 1"),
    (PlanRequest("reap", ratio=0.0), "strictly between 0 and 1"),
    (PlanRequest("reap", ratio=0.01), "removes no expert"),
    (PlanRequest("reap", keep=8), "below the 8 experts"),
    (PlanRequest("reap"), "exactly one of"),
    (PlanRequest("reap", ratio=0.5, keep=3), "exactly one of"),
    (PlanRequest("reap", keep=1), "keep at least 2"),
    (PlanRequest("reap", ratio=0.5, protect=((9, 0),)), "names no expert"),
])
def test_bad_plan_requests(request_: PlanRequest, message: str) -> None:
    model = build_tiny_model("qwen3_moe")
    with pytest.raises(PlanError, match=message):
        make_prune_plan(MoEModelView.from_model(model), _profile(model), request_)


def test_unknown_method_lists_the_valid_ones() -> None:
    model = build_tiny_model("qwen3_moe")
    with pytest.raises(UnknownNameError, match="valid: ean_mean, ean_sum, easy_ep, frequency"):
        make_prune_plan(MoEModelView.from_model(model), _profile(model), PlanRequest("magic", ratio=0.5))


def test_profile_of_another_model_is_refused() -> None:
    profile = _profile(build_tiny_model("qwen3_moe"))
    other = MoEModelView.from_model(build_tiny_model("qwen3_moe", num_experts=6))
    with pytest.raises(ValueError, match="collected on another model"):
        make_prune_plan(other, profile, PlanRequest("reap", ratio=0.5))


def _brute_force_loss(layer, inputs: torch.Tensor, dropped: tuple[int, ...]) -> float:
    """||F(X) - F_R(X)||_F computed by hand from the routing function and each expert's weights."""
    def routed(available: torch.Tensor | None) -> torch.Tensor:
        routing = layer.route(inputs, available)
        out = torch.zeros_like(inputs)
        for slot in range(routing.index.shape[1]):
            for expert in range(layer.num_experts):
                rows = routing.index[:, slot] == expert
                if rows.any():
                    w = layer.expert_weights(expert)
                    x = inputs[rows]
                    f = (torch.nn.functional.silu(x @ w.gate.T) * (x @ w.up.T)) @ w.down.T
                    out[rows] += routing.weights[rows, slot, None] * f
        return out
    mask = torch.ones(layer.num_experts, dtype=torch.bool)
    mask[list(dropped)] = False
    return float((routed(None) - routed(mask)).norm())


def test_naee_exhaustive_search_finds_the_true_optimum() -> None:
    model = build_tiny_model("qwen3_moe", num_experts=6)
    view = MoEModelView.from_model(model)
    ids = random_ids(2, 2, 32)
    inputs = collect_block_inputs(model, view, [CalibrationSet("d", ids, torch.ones_like(ids))], 64)
    layer = view.layers[1]
    with torch.no_grad():
        losses = {d: _brute_force_loss(layer, inputs[layer.index], d) for d in itertools.combinations(range(6), 3)}
    best = min(losses, key=losses.get)
    result = search_layer(view, layer, inputs[layer.index], 3, search="exhaustive")
    assert result.kept == [e for e in range(6) if e not in best]
    assert result.loss == pytest.approx(losses[best], rel=1e-4)
    assert result.evaluated == 20 + 6
    greedy = search_layer(view, layer, inputs[layer.index], 3, search="greedy")
    assert greedy.loss >= result.loss - 1e-6
    protected = search_layer(view, layer, inputs[layer.index], 3, search="exhaustive", protected=[best[0]])
    assert best[0] in protected.kept


def test_naee_token_budget_is_split_over_the_sets_by_weight() -> None:
    from moekit.plan.naee import token_budgets

    a = CalibrationSet("a", torch.zeros(4, 10, dtype=torch.long), torch.ones(4, 10, dtype=torch.long))
    b = CalibrationSet("b", torch.zeros(1, 10, dtype=torch.long), torch.ones(1, 10, dtype=torch.long))
    assert token_budgets([a, b], 20) == [10, 10]
    assert token_budgets([a, b], 21) == [11, 10]  # the remainder to the first of the heaviest
    assert token_budgets([a, b], 40, {"a": 3.0, "b": 1.0}) == [30, 10]
    assert token_budgets([a, b], 100, {"a": 1.0, "b": 1.0}) == [40, 10]  # never more than a set holds
    assert token_budgets([a, b], 20, {"a": 0.0, "b": 1.0}) == [0, 10]


def test_naee_inputs_come_from_every_set_in_its_share() -> None:
    """Two sets, 40 tokens: the first 20 real tokens of each (today's bug took all 40 from the first set)."""
    model = build_tiny_model("qwen3_moe", num_experts=6)
    view = MoEModelView.from_model(model)
    a_ids, b_ids = random_ids(5, 2, 32), random_ids(6, 2, 32)
    a = CalibrationSet("a", a_ids, torch.ones_like(a_ids))
    b_mask = torch.ones_like(b_ids)
    b_mask[0, 12:] = 0  # padding does not count
    b = CalibrationSet("b", b_ids, b_mask)
    both = collect_block_inputs(model, view, [a, b], 40)
    alone_a = collect_block_inputs(model, view, [a], 20)
    alone_b = collect_block_inputs(model, view, [b], 20)
    for layer in view.layers:
        assert both[layer.index].shape[0] == 40
        torch.testing.assert_close(both[layer.index][:20], alone_a[layer.index])
        torch.testing.assert_close(both[layer.index][20:], alone_b[layer.index])
    # b weighs 3: a budget of 30 tokens, but b holds 12 + 32 = 44 real ones, so all 30 come from it
    weighted = collect_block_inputs(model, view, [a, b], 40, weights={"a": 1.0, "b": 3.0})
    assert weighted[view.layers[0].index].shape[0] == 10 + 30


def test_naee_progressive_compares_with_the_original_block_on_the_original_inputs() -> None:
    """Lu et al.'s progressive objective: the pruned block on the drifted inputs against the original model's
    block output on its own inputs (not the unpruned block on the drifted inputs)."""
    from moekit.plan import PlanRequest
    from moekit.plan.naee import block_outputs, make_naee_plan, reconstruction_loss

    model = build_tiny_model("qwen3_moe", num_experts=6)
    view = MoEModelView.from_model(model)
    ids = random_ids(3, 2, 32)
    sets = [CalibrationSet("d", ids, torch.ones_like(ids))]
    plan = make_naee_plan(model, sets, PlanRequest("naee", keep=4, protect_super=False), search="exhaustive",
                          progressive=True, max_tokens=64, batch_size=2, progress=False)
    first, second = view.layers[0], view.layers[1]
    kept_first = plan["layers"][str(first.index)]["kept"]
    mask = torch.zeros(6, dtype=torch.bool)
    mask[kept_first] = True
    original = collect_block_inputs(model, view, sets, 64, batch_size=2)[second.index]
    drifted = collect_block_inputs(model, view, sets, 64, batch_size=2, masks={first.index: mask},
                                   layers=[second.index])[second.index]
    assert not torch.allclose(original, drifted)  # the first layer's pruning moved the second's inputs
    reference = block_outputs(second, original)
    dropped = plan["layers"][str(second.index)]["removed"]
    expected = reconstruction_loss(view, second, drifted, reference, dropped)
    recorded = plan["details"]["naee"]["layers"][1]["loss"]
    assert recorded == pytest.approx(expected, rel=1e-6)
    stale = reconstruction_loss(view, second, drifted, block_outputs(second, drifted), dropped)
    assert stale != pytest.approx(expected, rel=1e-3)  # the two objectives differ here


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_naee_cached_expert_outputs_give_the_block_forward_loss(family: str) -> None:
    """The fast path (every expert's output cached once, candidates as masked routing + gather) scores every
    candidate as running the block does, in every family; the search then keeps the same experts."""
    from moekit.plan.naee import ExpertOutputCache, block_outputs, reconstruction_loss

    torch.manual_seed(0)
    model = build_tiny_model(family)
    view = MoEModelView.from_model(model)
    ids = random_ids(4, 2, 24)
    inputs = collect_block_inputs(model, view, [CalibrationSet("d", ids, torch.ones_like(ids))], 48)
    layer = view.layers[-1]
    x = inputs[layer.index]
    unpruned = block_outputs(layer, x)
    cache = ExpertOutputCache.build(layer, x, unpruned)
    if layer.call.kind == "llama4":
        assert cache is None  # input-gated experts: the block runs per candidate
        return
    assert cache is not None
    assert cache.loss((), unpruned) == pytest.approx(0.0, abs=1e-4 * float(unpruned.norm()))
    spec = layer.routing
    groups = spec.n_group if spec.group_limited else 1
    quota = layer.num_experts // groups
    for dropped in [(0,), (1, quota + 1) if groups > 1 else (1, 2), tuple(range(0, layer.num_experts, 2))]:
        slow = reconstruction_loss(view, layer, x, unpruned, dropped)
        assert cache.loss(dropped, unpruned) == pytest.approx(slow, rel=1e-4, abs=1e-6), dropped
    assert ExpertOutputCache.build(layer, x, unpruned, max_bytes=16) is None  # too large: no cache
    remove = layer.num_experts // 2 // groups * groups
    fast = search_layer(view, layer, x, remove, search="greedy", groups=groups)
    slow = search_layer(view, layer, x, remove, search="greedy", groups=groups, cache_bytes=0)
    assert (fast.evaluation, slow.evaluation) == ("cached expert outputs", "block forward")
    assert fast.kept == slow.kept
    assert fast.loss == pytest.approx(slow.loss, rel=1e-4, abs=1e-6)
