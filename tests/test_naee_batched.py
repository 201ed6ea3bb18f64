"""NAEE's batched candidate scoring (``ExpertOutputCache.losses``) against one ``loss`` call per candidate, and
``search_layer`` with both, on tiny models of every family the cache serves."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import ALL_FAMILIES, random_ids

from moekit.arch.view import MoEModelView
from moekit.data import CalibrationSet
from moekit.plan.naee import ExpertOutputCache, block_outputs, collect_block_inputs, search_layer
from moekit.tiny import build_tiny_model

# a group-limited router with a correction bias and a shared expert, beside the families' default tiny configs
GROUPED = ("deepseek_v3", {"num_experts": 8, "top_k": 2, "n_group": 4, "topk_group": 2})
CASES = [(family, {}) for family in ALL_FAMILIES] + [GROUPED]


def _layer_cache(family: str, overrides: dict, tokens: int = 48):
    torch.manual_seed(0)
    model = build_tiny_model(family, **overrides)
    view = MoEModelView.from_model(model)
    ids = random_ids(4, 2, tokens // 2)
    layer = view.layers[-1]
    x = collect_block_inputs(model, view, [CalibrationSet("d", ids, torch.ones_like(ids))], tokens)[layer.index]
    unpruned = block_outputs(layer, x)
    return view, layer, x, unpruned, ExpertOutputCache.build(layer, x, unpruned)


def _candidates(layer, count: int = 40) -> list[tuple[int, ...]]:
    """Distinct dropped sets of 1 to E - top_k experts (in random order, so neighbours in a batch differ)."""
    experts, top_k = layer.num_experts, layer.top_k
    every = [d for r in range(1, experts - top_k + 1) for d in itertools.combinations(range(experts), r)]
    return random.Random(0).sample(every, min(count, len(every)))


@pytest.mark.parametrize(("family", "overrides"), CASES, ids=[f + ("-grouped" if o else "") for f, o in CASES])
def test_losses_equal_one_loss_per_candidate(family: str, overrides: dict) -> None:
    _, layer, _, unpruned, cache = _layer_cache(family, overrides)
    if cache is None:
        assert layer.call.kind == "llama4"  # the only family served by block forwards alone
        return
    if overrides:
        assert layer.routing.group_limited and layer.correction_bias is not None and layer.shared
    candidates = _candidates(layer)
    reference = unpruned + 0.01 * torch.randn_like(unpruned)  # not the unpruned output: progressive mode's case
    row = cache._row_bytes()
    # the default budget (one batch), then several candidate batches and loss chunks, then one candidate on
    # pieces of a chunk (the budget below one chunk's rows)
    for chunk, max_bytes in ((4096, None), (16, row * 16 * 3), (20, row * 7), (48, 1)):
        one = [cache.loss(d, reference, chunk=chunk) for d in candidates]
        kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
        many = cache.losses(candidates, reference, chunk=chunk, **kwargs)
        assert len(set(one)) > len(one) // 2  # the candidates' losses differ: a mask given to the wrong one shows
        assert many == pytest.approx(one, rel=1e-5, abs=1e-7), (chunk, max_bytes)
    assert cache.losses([], reference) == []


def test_losses_keep_each_batch_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    _, layer, _, unpruned, cache = _layer_cache("qwen3_moe", {"num_experts": 8, "top_k": 2}, tokens=64)
    shapes: list[tuple[int, int]] = []
    batch_norms = ExpertOutputCache._batch_norms

    def recording(self, available, start, stop, reference):
        shapes.append((available.shape[0], stop - start))
        return batch_norms(self, available, start, stop, reference)

    monkeypatch.setattr(ExpertOutputCache, "_batch_norms", recording)
    candidates = _candidates(layer, 30)
    reference = unpruned + 0.01 * torch.randn_like(unpruned)
    one = [cache.loss(d, reference, chunk=32) for d in candidates]
    for rows in (1, 5, 32, 100, 10_000):
        shapes.clear()
        many = cache.losses(candidates, reference, chunk=32, max_bytes=rows * cache._row_bytes())
        assert many == pytest.approx(one, rel=1e-5, abs=1e-7)
        assert all(c * t <= rows for c, t in shapes), (rows, shapes)
        assert sum(c * t for c, t in shapes) == len(candidates) * 64  # every candidate on every token, once
        assert max(c for c, _ in shapes) == min(len(candidates), max(1, rows // min(rows, 32)))


def test_losses_refuse_candidates_that_leave_fewer_than_top_k_experts() -> None:
    *_, unpruned, cache = _layer_cache("qwen3_moe", {"num_experts": 8, "top_k": 2})
    with pytest.raises(ValueError, match="top_k=2"):
        cache.loss(tuple(range(7)), unpruned)
    with pytest.raises(ValueError, match="top_k=2"):
        cache.losses([(0,), tuple(range(7))], unpruned)


SEARCH_CASES = [("qwen3_moe", {"num_experts": 8, "top_k": 2}), ("mixtral", {}), ("gpt_oss", {}),
                ("granitemoeshared", {}), ("dbrx", {}), GROUPED]


@pytest.mark.parametrize(("family", "overrides"), SEARCH_CASES, ids=[f for f, _ in SEARCH_CASES])
@pytest.mark.parametrize("search", ["exhaustive", "greedy", "beam"])
def test_search_layer_batched_keeps_what_one_by_one_keeps(family: str, overrides: dict, search: str) -> None:
    view, layer, x, unpruned, _ = _layer_cache(family, overrides)
    groups = layer.routing.n_group if layer.routing.group_limited else 1
    remove = layer.num_experts // 2 // groups * groups
    reference = unpruned + 0.01 * torch.randn_like(unpruned)
    kwargs = {"search": search, "groups": groups, "beam_width": 3, "reference": reference, "protected": [1]}
    batched = search_layer(view, layer, x, remove, **kwargs)
    single = search_layer(view, layer, x, remove, batched=False, **kwargs)
    assert batched.evaluation == single.evaluation == "cached expert outputs"
    assert batched.kept == single.kept and 1 in batched.kept
    assert batched.loss == pytest.approx(single.loss, rel=1e-5)
    assert batched.single_removal_loss == pytest.approx(single.single_removal_loss, rel=1e-5, abs=1e-7)
    assert (batched.evaluated, batched.search) == (single.evaluated, single.search)
    dropped = tuple(e for e in range(layer.num_experts) if e not in batched.kept)
    assert batched.loss == pytest.approx(ExpertOutputCache.build(layer, x, unpruned).loss(dropped, reference),
                                         rel=1e-5)


def test_exhaustive_search_over_several_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exhaustive search scores its subsets in slabs: the best over the slabs is the best over all."""
    import moekit.plan.naee as naee

    view, layer, x, unpruned, cache = _layer_cache("qwen3_moe", {"num_experts": 8, "top_k": 2})
    monkeypatch.setattr(naee, "EXHAUSTIVE_SLAB", 7)
    result = search_layer(view, layer, x, 4, search="exhaustive")
    scored = {d: cache.loss(d, unpruned) for d in itertools.combinations(range(8), 4)}
    best = min(scored, key=lambda d: (scored[d], d))
    assert result.kept == [e for e in range(8) if e not in best]
    assert result.evaluated == 70 + 8
