"""NAEE expert pruning (Lu et al. 2024, "Not All Experts are Equal"): per layer, keep the experts whose
block output best reconstructs the original.

For MoE layer l with inputs X (hidden states entering the block on calibration tokens), choose the
retained set R, |R| = E - r, minimising  sum over chunks of ||F(X) - F_R(X)||_F,  where F_R is the
block with the dropped experts' router logits set to -inf before the model's own selection and
normalisation (``moekit.arch.routing_override``), shared experts included as the model has them.

Search (as in the paper, plus the usual relaxations for large E):

- ``exhaustive``: every subset of the allowed size (C(E, r) block evaluations; the paper's method,
  feasible for E up to about 16);
- ``greedy``: backward elimination, removing one expert at a time, the one whose removal raises
  the loss least (``beam`` keeps the ``beam_width`` best partial removals instead of one);
- ``auto``: exhaustive when C(E, r) <= ``exhaustive_limit``, else beam.

Progressive mode (the paper's option) re-collects each layer's inputs after the earlier layers
were pruned (their experts masked), so later layers adapt to earlier decisions. Protected experts
are never removed; group-limited routers remove the same number from every group unless regrouping
is allowed.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moekit.arch.view import MoELayer, MoEModelView, routing_override
from moekit.data import CalibrationSet
from moekit.edit.card import prune_plan_record
from moekit.edit.keep import KeepMap, PlanError, validate_keep
from moekit.layerwise import LayerwiseModel
from moekit.plan import PlanRequest, kept_count, layer_entries, plan_details, protections, routing_groups
from moekit.profile import collect_profile
from moekit.profile.collect import collect_profile_layerwise
from moekit.summary import summarize

SEARCHES = ("auto", "exhaustive", "greedy", "beam")


@dataclass(frozen=True)
class LayerSearchResult:
    layer: int
    kept: list[int]
    loss: float  # reconstruction loss of the retained set
    single_removal_loss: list[float]  # loss when each expert alone is removed (its importance)
    search: str
    evaluated: int  # subsets evaluated


def collect_block_inputs(model: nn.Module, view: MoEModelView, sets: Sequence[CalibrationSet], max_tokens: int,
                         batch_size: int = 8, masks: dict[int, torch.Tensor] | None = None,
                         layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
    """Hidden states entering each MoE block on up to ``max_tokens`` real calibration tokens: ``{layer: [T, H]}``.

    ``masks`` routes earlier layers with experts masked (progressive mode)."""
    wanted = set(layers) if layers is not None else {layer.index for layer in view.layers}
    device = model.get_input_embeddings().weight.device
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    valid: list[torch.Tensor] = []
    handles = []
    for layer in view.layers:
        if layer.index in wanted:
            def hook(_module: nn.Module, args: tuple, index: int = layer.index) -> None:
                hidden = args[0]
                inputs[index].append(hidden.reshape(-1, hidden.shape[-1]).detach())
            handles.append(layer.block.register_forward_pre_hook(hook))
    try:
        with routing_override(view, masks or {}), torch.inference_mode():
            for ids, mask in _naee_batches(sets, max_tokens, batch_size):
                model(input_ids=ids.to(device), use_cache=False)
                valid.append(mask.reshape(-1).bool())
    finally:
        for handle in handles:
            handle.remove()
    keep = torch.cat(valid)
    return {i: torch.cat(chunks)[keep.to(chunks[0].device)][:max_tokens] for i, chunks in inputs.items()}


def _block_output(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden[None])
    return (out[0] if isinstance(out, tuple) else out).reshape(hidden.shape)


def reconstruction_loss(view: MoEModelView, layer: MoELayer, inputs: torch.Tensor, reference: torch.Tensor,
                        dropped: Sequence[int], chunk: int = 4096) -> float:
    """sum over chunks of ||F(X) - F_R(X)||_F with ``dropped`` experts masked out of routing."""
    mask = torch.ones(layer.num_experts, dtype=torch.bool, device=inputs.device)
    mask[list(dropped)] = False
    total = 0.0
    with routing_override(view, {layer.index: mask}), torch.inference_mode():
        for start in range(0, inputs.shape[0], chunk):
            out = _block_output(layer.block, inputs[start:start + chunk])
            total += float((out.float() - reference[start:start + chunk].float()).norm())
    return total


def _allowed(dropped: tuple[int, ...], groups: int, size: int, quota: int) -> bool:
    if groups <= 1:
        return True
    per = [0] * groups
    for expert in dropped:
        per[expert // size] += 1
    return all(count <= quota for count in per)


def search_layer(view: MoEModelView, layer: MoELayer, inputs: torch.Tensor, remove: int, *, search: str = "auto",
                 protected: Iterable[int] = (), groups: int = 1, exhaustive_limit: int = 5000,
                 beam_width: int = 4) -> LayerSearchResult:
    """Choose ``remove`` experts of ``layer`` to drop, minimising the reconstruction loss on ``inputs``."""
    if search not in SEARCHES:
        raise ValueError(f"unknown NAEE search {search!r}; valid: {', '.join(SEARCHES)}")
    num_experts = layer.num_experts
    with torch.inference_mode():
        reference = torch.cat([_block_output(layer.block, inputs[s:s + 4096]) for s in range(0, len(inputs), 4096)])
    candidates = [e for e in range(num_experts) if e not in set(protected)]
    size, quota = num_experts // groups, remove // groups
    evaluated = 0

    def loss(dropped: tuple[int, ...]) -> float:
        nonlocal evaluated
        evaluated += 1
        return reconstruction_loss(view, layer, inputs, reference, dropped)

    single = [loss((e,)) for e in range(num_experts)]
    if search == "auto":
        search = "exhaustive" if math.comb(len(candidates), remove) <= exhaustive_limit else "beam"
    if search == "exhaustive":
        best = min((loss(d), d) for d in itertools.combinations(candidates, remove) if _allowed(d, groups, size, quota))
    else:
        width = 1 if search == "greedy" else beam_width
        beam: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
        for _ in range(remove):
            grown = {tuple(sorted((*d, e))) for _, d in beam for e in candidates if e not in d}
            scored = sorted((loss(d), d) for d in grown if _allowed(d, groups, size, quota))
            beam = scored[:width]
        best = beam[0]
    dropped = set(best[1])
    return LayerSearchResult(layer.index, [e for e in range(num_experts) if e not in dropped], best[0], single,
                             search, evaluated)


def check_search_options(search: str, max_tokens: int, batch_size: int, beam_width: int = 4) -> None:
    """The search settings, checked before a model runs: a budget below one token collects no block inputs
    (and would fail deep inside the search), a zero batch or beam runs nothing."""
    if search not in SEARCHES:
        raise PlanError(f"unknown NAEE search {search!r}; valid: {', '.join(SEARCHES)}")
    for what, value in (("--naee-tokens", max_tokens), ("the NAEE batch size", batch_size),
                        ("the NAEE beam width", beam_width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{what} {value} must be at least 1"
                            + (" (calibration tokens per layer in NAEE's loss)" if what == "--naee-tokens" else ""))


def _naee_batches(sets: Sequence[CalibrationSet], max_tokens: int,
                  batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of the batches whose block inputs NAEE uses: in order, until ``max_tokens`` real
    tokens are taken (the last batch may go past; the surplus is cut)."""
    chosen, taken = [], 0
    for cset in sets:
        for first in range(0, cset.num_sequences, batch_size):
            if taken >= max_tokens:
                break
            mask = cset.attention_mask[first:first + batch_size]
            chosen.append((cset.input_ids[first:first + batch_size], mask))
            taken += int(mask.sum())
    return chosen


class _Search:
    """NAEE's per-layer decisions and what the plan records of them (shared by the whole-model and the
    layer-by-layer runs)."""

    def __init__(self, view: MoEModelView, profile: Any, request: PlanRequest, search: str, exhaustive_limit: int,
                 beam_width: int) -> None:
        self.view, self.profile, self.request = view, profile, request
        self.search, self.exhaustive_limit, self.beam_width = search, exhaustive_limit, beam_width
        self.kept = kept_count(view.num_experts, request)
        self.supers, self.protected = protections(view, profile, request)
        self.groups = routing_groups(view, self.kept, request.allow_regroup)
        self.decided: dict[int, torch.Tensor] = {}
        self.keep: KeepMap = {}
        self.details: dict[int, list[dict[str, Any]]] = {}
        self.searches: list[dict[str, Any]] = []

    def decide(self, layer: MoELayer, inputs: torch.Tensor) -> None:
        reasons = {e: why for (i, e), why in self.protected.items() if i == layer.index}
        result = search_layer(self.view, layer, inputs, self.view.num_experts - self.kept, search=self.search,
                              protected=reasons, groups=self.groups, exhaustive_limit=self.exhaustive_limit,
                              beam_width=self.beam_width)
        self.keep[layer.index] = result.kept
        mask = torch.zeros(layer.num_experts, dtype=torch.bool, device=layer.router_weight.device)
        mask[result.kept] = True
        self.decided[layer.index] = mask
        how = f"NAEE {result.search} search ({result.evaluated} subsets), retained-set loss {result.loss:.6g}"
        self.details[layer.index] = layer_entries(result.single_removal_loss, set(result.kept), reasons,
                                                  f"kept: in the retained set of lowest loss; {how}",
                                                  f"dropped: outside the retained set of lowest loss; {how}")
        self.searches.append({"layer": layer.index, "search": result.search, "evaluated": result.evaluated,
                              "loss": result.loss, "tokens": int(inputs.shape[0])})

    def record(self, progressive: bool, max_tokens: int, source: str, **extra: Any) -> dict[str, Any]:
        validate_keep(self.view, self.keep, allow_regroup=self.request.allow_regroup)
        record = plan_details(self.profile, self.request, self.kept, self.supers, None, __doc__.split("\n\n")[0])
        record["naee"] = {"search": self.search, "progressive": progressive, "max_tokens": max_tokens,
                          "exhaustive_limit": self.exhaustive_limit, "beam_width": self.beam_width,
                          "layers": self.searches, "score": "reconstruction loss when the expert alone is removed",
                          **extra}
        return prune_plan_record(source, summarize(self.view), self.keep, "naee", record, self.details,
                                 top_k=self.request.top_k)


def make_naee_plan(model: nn.Module, sets: Sequence[CalibrationSet], request: PlanRequest, *,
                   search: str = "auto", progressive: bool = False, max_tokens: int = 4096, batch_size: int = 8,
                   exhaustive_limit: int = 5000, beam_width: int = 4, source: str = "",
                   progress: bool = True) -> dict[str, Any]:
    """A complete plan record (``moekit_plan.json``) chosen by NAEE's reconstruction-loss search.

    The calibration sets are also profiled (one forward pass) to find super experts to protect and to
    record the data in the plan. An expert's ``score`` is the loss when it alone is removed."""
    check_search_options(search, max_tokens, batch_size, beam_width)
    view = MoEModelView.from_model(model)
    profile = collect_profile(model, sets, batch_size, progress=progress)
    searcher = _Search(view, profile, request, search, exhaustive_limit, beam_width)
    inputs = {} if progressive else collect_block_inputs(model, view, sets, max_tokens, batch_size)
    for layer in tqdm(view.layers, desc="NAEE search", unit="layer", disable=not progress):
        if progressive:
            inputs = collect_block_inputs(model, view, sets, max_tokens, batch_size, searcher.decided, [layer.index])
        searcher.decide(layer, inputs[layer.index])
    return searcher.record(progressive, max_tokens, source)


class _BlockReached(Exception):
    """Raised by the hook that recorded a block's input: the rest of the layer need not run."""


def _layer_block_inputs(run: LayerwiseModel, index: int, layer: MoELayer, batches: int) -> torch.Tensor:
    """``[T, H]``: what enters the MoE block of loaded decoder layer ``index``, every batch in turn (each stops at
    the block)."""
    chunks: list[torch.Tensor] = []

    def record(_module: nn.Module, args: tuple) -> None:
        chunks.append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())
        raise _BlockReached

    handle = layer.block.register_forward_pre_hook(record)
    try:
        for b in range(batches):
            with contextlib.suppress(_BlockReached):
                run.forward(index, b, keep=False)
    finally:
        handle.remove()
    return torch.cat(chunks)


def make_naee_plan_layerwise(run: LayerwiseModel, sets: Sequence[CalibrationSet], request: PlanRequest, *,
                             search: str = "auto", progressive: bool = False, max_tokens: int = 4096,
                             batch_size: int = 8, exhaustive_limit: int = 5000, beam_width: int = 4,
                             source: str = "", progress: bool = True) -> dict[str, Any]:
    """:func:`make_naee_plan` with the model run one decoder layer at a time (``moekit.layerwise``): the same plan.

    Two passes over the layers: the profile (``collect_profile_layerwise``), then, per decoder layer, NAEE's
    batches through it -- an MoE layer first runs up to its block to record the block's inputs, is searched
    while its weights are loaded, then runs whole (with its experts masked in progressive mode) to give the next
    layer its inputs."""
    check_search_options(search, max_tokens, batch_size, beam_width)
    view = run.view
    profile = collect_profile_layerwise(run, sets, batch_size, progress=progress, source=source)
    searcher = _Search(view, profile, request, search, exhaustive_limit, beam_width)
    batches = _naee_batches(sets, max_tokens, batch_size)
    valid = torch.cat([mask.reshape(-1).bool() for _, mask in batches])
    moe_layers = {layer.index: layer for layer in view.layers}
    run.embed([ids for ids, _ in batches])
    with torch.inference_mode():
        for index in tqdm(run.layer_indices, desc="NAEE search", unit="layer", disable=not progress):
            with run.loaded(index):
                layer = moe_layers.get(index)
                if layer is not None:
                    with routing_override(view, searcher.decided if progressive else {}):
                        inputs = _layer_block_inputs(run, index, layer, len(batches))
                    searcher.decide(layer, inputs[valid.to(inputs.device)][:max_tokens])
                    del inputs
                # the next layer's inputs: with this layer's experts masked too in progressive mode
                with routing_override(view, searcher.decided if progressive else {}):
                    for b in range(len(batches)):
                        run.forward(index, b)
    return searcher.record(progressive, max_tokens, source, layer_by_layer=True)
