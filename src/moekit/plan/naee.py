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
from moekit.plan import PlanRequest, kept_count, layer_entries, plan_details, protections, routing_groups
from moekit.profile import collect_profile
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
    taken = 0
    try:
        with routing_override(view, masks or {}), torch.inference_mode():
            for cset in sets:
                for first in range(0, cset.num_sequences, batch_size):
                    if taken >= max_tokens:
                        break
                    mask = cset.attention_mask[first:first + batch_size]
                    model(input_ids=cset.input_ids[first:first + batch_size].to(device), use_cache=False)
                    valid.append(mask.reshape(-1).bool())
                    taken += int(mask.sum())
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
    kept = kept_count(view.num_experts, request)
    supers, protected = protections(view, profile, request)
    groups = routing_groups(view, kept, request.allow_regroup)
    inputs = {} if progressive else collect_block_inputs(model, view, sets, max_tokens, batch_size)
    decided: dict[int, torch.Tensor] = {}
    keep: KeepMap = {}
    details: dict[int, list[dict[str, Any]]] = {}
    searches = []
    for layer in tqdm(view.layers, desc="NAEE search", unit="layer", disable=not progress):
        if progressive:
            inputs = collect_block_inputs(model, view, sets, max_tokens, batch_size, decided, [layer.index])
        reasons = {e: why for (i, e), why in protected.items() if i == layer.index}
        result = search_layer(view, layer, inputs[layer.index], view.num_experts - kept, search=search,
                              protected=reasons, groups=groups, exhaustive_limit=exhaustive_limit,
                              beam_width=beam_width)
        keep[layer.index] = result.kept
        mask = torch.zeros(layer.num_experts, dtype=torch.bool, device=layer.router_weight.device)
        mask[result.kept] = True
        decided[layer.index] = mask
        how = f"NAEE {result.search} search ({result.evaluated} subsets), retained-set loss {result.loss:.6g}"
        details[layer.index] = layer_entries(result.single_removal_loss, set(result.kept), reasons,
                                             f"kept: in the retained set of lowest loss; {how}",
                                             f"dropped: outside the retained set of lowest loss; {how}")
        searches.append({"layer": layer.index, "search": result.search, "evaluated": result.evaluated,
                         "loss": result.loss, "tokens": int(inputs[layer.index].shape[0])})
    validate_keep(view, keep, allow_regroup=request.allow_regroup)
    record = plan_details(profile, request, kept, supers, None, __doc__.split("\n\n")[0])
    record["naee"] = {"search": search, "progressive": progressive, "max_tokens": max_tokens,
                      "exhaustive_limit": exhaustive_limit, "beam_width": beam_width, "layers": searches,
                      "score": "reconstruction loss when the expert alone is removed"}
    return prune_plan_record(source, summarize(view), keep, "naee", record, details, top_k=request.top_k)
