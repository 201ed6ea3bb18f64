"""Unstructured sparsity inside the routed experts: STUN's second stage (Wanda, with OWL's layer-wise ratios).

STUN (Lee et al. 2025) prunes experts first (``moekit.plan.stun``), then runs an unstructured pruner on the model
that is left; its published runs use OWL with Wanda scores (OWL's M = 5, lambda = 0.08). Here the second stage
zeroes weights of the kept routed experts only (gate, up and down projections; biases, routers, shared experts,
attention and everything else stay as they are):

- the criterion scores every weight (``moekit.score.weights``: ``wanda`` = |W| x its input's norm over the
  expert's calibration tokens, from ``moekit profile --input-norms``; ``magnitude`` = |W|);
- as Wanda does, the scores are compared within each output row of each projection: a row of C inputs loses its
  int(s C) lowest-scoring weights (``row_zero_mask``), or, with an N:M pattern, every group of M consecutive
  inputs loses its N lowest (2:4: half of every 4);
- the sparsity s is the same in every MoE layer (``uniform``) or OWL's: layer l's outlier fraction D_l is the share
  of its kept experts' scores above M times their mean, and its density is 1 - s + 2 lambda (D_l - min D) /
  (max D - min D) minus the mean of that term over the layers, so the layers with more outliers keep more weights
  and the mean sparsity over layers is s (OWL's allocation; its "layer" is a decoder layer, here the MoE layer's
  experts).

The weights are written as dense tensors with zeros: **the checkpoint is as large as one without the zeros and runs
no faster, unless a sparse format or kernel uses them** (the 2:4 pattern is the one NVIDIA's sparse tensor cores
and PyTorch's semi-structured sparse tensors accelerate). The card and the plan record the sparsity measured in
the written weights.

The plan (``SPARSITY_PLAN_FORMAT``) records each layer's sparsity, not the mask: the mask is computed when the plan
is applied, from the weights and the profile the plan names (its path and fingerprint are checked), one decoder
layer at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.arch.view import MoEModelView
from moekit.edit.card import SPARSITY_PLAN_FORMAT, card_tail, plan_envelope, shown_path, versions
from moekit.edit.keep import PlanError

ALLOCATIONS = ("uniform", "owl")
OWL_M = 5.0  # OWL's outlier threshold: a score above M times the layer's mean score is an outlier
OWL_LAMBDA = 0.08  # OWL's limit on how far a layer's sparsity moves from the target
UNSTRUCTURED = "unstructured"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", else (N, M) of an "N:M" pattern (N of every M consecutive inputs are zeroed)."""
    if pattern == UNSTRUCTURED:
        return None
    parts = pattern.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise PlanError(f"--sparsity-pattern {pattern!r}: give unstructured, or N:M with 0 < N < M (2:4 zeroes 2 of "
                    "every 4 consecutive weights of a row, the pattern sparse tensor cores run)")


def row_zero_mask(scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Which weights of ``scores`` ([rows, inputs]) are zeroed (True): in each row its int(sparsity x inputs)
    lowest-scoring ones (Wanda's per-output comparison), or, with ``pattern`` (N, M), the N lowest of every M
    consecutive inputs. Ties: the lower input index is zeroed first."""
    rows, inputs = scores.shape
    mask = torch.zeros(rows, inputs, dtype=torch.bool, device=scores.device)
    if pattern is None:
        count = int(inputs * sparsity)
        if count:
            mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :count], True)
        return mask
    n, m = pattern
    if inputs % m:
        raise PlanError(f"the {n}:{m} pattern needs rows whose length is a multiple of {m}; a projection has "
                        f"{inputs} inputs")
    groups = scores.reshape(rows, inputs // m, m)
    lowest = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    mask.view(rows, inputs // m, m).scatter_(-1, lowest, True)
    return mask


def outlier_fraction(scores: list[torch.Tensor], m: float = OWL_M) -> float:
    """OWL's layer outlier ratio: the share of the scores (every projection of the layer's kept experts, pooled)
    that exceed ``m`` times their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / max(total, 1)
    return sum(int((s > m * mean).sum()) for s in scores) / max(total, 1)


def owl_sparsities(outliers: dict[int, float], target: float, lam: float = OWL_LAMBDA) -> dict[int, float]:
    """Each layer's sparsity from its outlier fraction (OWL): density_l = 1 - target + 2 lam (D_l - min D) /
    (max D - min D) - mean_l(2 lam (D_l - min D) / (max D - min D)); every layer gets ``target`` when all D are
    equal. Refused when a layer's sparsity would leave [0, 1)."""
    layers = sorted(outliers)
    values = torch.tensor([outliers[i] for i in layers], dtype=torch.float64)
    spread = float(values.max() - values.min()) if len(layers) else 0.0
    if spread == 0:
        return {i: target for i in layers}
    shift = (values - values.min()) / spread * 2 * lam
    density = shift - shift.mean() + (1 - target)
    out = {i: float(1 - d) for i, d in zip(layers, density, strict=True)}
    low, high = min(out.values()), max(out.values())
    if low < 0 or high >= 1:
        raise PlanError(f"OWL's layer sparsities for --sparsity {target:g} with --owl-lambda {lam:g} range from "
                        f"{low:.3f} to {high:.3f}, outside [0, 1): lower --owl-lambda")
    return out


def _check_request(sparsity: float, allocation: str, pattern: str) -> tuple[int, int] | None:
    if not 0 < sparsity < 1:
        raise PlanError(f"--sparsity {sparsity:g} is the fraction of each kept expert's weights set to zero: give a "
                        "value between 0 and 1 (e.g. 0.5)")
    if allocation not in ALLOCATIONS:
        raise PlanError(f"--sparsity-allocation {allocation!r}: choose uniform (the same sparsity in every MoE layer) "
                        "or owl (OWL's outlier-weighted layer sparsities, as STUN runs it)")
    parsed = parse_pattern(pattern)
    if parsed is not None:
        n, m = parsed
        if abs(sparsity - n / m) > 1e-9:
            raise PlanError(f"the {n}:{m} pattern zeroes exactly {n}/{m} = {n / m:g} of the weights: give --sparsity "
                            f"{n / m:g} with it")
        if allocation != "uniform":
            raise PlanError(f"the {n}:{m} pattern has the same sparsity in every layer: use --sparsity-allocation "
                            "uniform with it")
    return parsed


def make_sparsity_plan(source: str | Path, view: MoEModelView, profile: Any, criterion: str, sparsity: float, *,
                       allocation: str | None = None, pattern: str = UNSTRUCTURED,
                       set_weights: dict[str, float] | None = None, profile_path: str | None = None,
                       source_name: str | None = None, progress: bool = False,
                       experts_plan: dict[str, Any] | None = None, owl_m: float = OWL_M,
                       owl_lambda: float = OWL_LAMBDA) -> dict[str, Any]:
    """The sparsity plan record (``moekit_plan.json``, format ``SPARSITY_PLAN_FORMAT``) of ``criterion`` (a key of
    ``moekit.score.weights.WEIGHT_CRITERIA``) at ``sparsity`` of the kept experts' weights. With ``experts_plan`` (a
    pruning plan record of the same model: STUN's first stage) those experts are removed first, in the same plan.
    ``allocation``: "owl" (OWL reads the experts' weights one decoder layer at a time from ``source`` to find each
    layer's outliers) or "uniform"; None: owl, or uniform with an N:M ``pattern``."""
    from tqdm.auto import tqdm

    from moekit.edit.neurons import check_profile_holds
    from moekit.layerwise import layers_with_expert_weights
    from moekit.score.weights import WEIGHT_CRITERIA
    from moekit.summary import summarize

    if allocation is None:
        allocation = "owl" if pattern == UNSTRUCTURED else "uniform"
    parsed = _check_request(sparsity, allocation, pattern)
    method = WEIGHT_CRITERIA.get(criterion)  # an unknown name lists the valid ones
    if owl_lambda <= 0 or owl_m <= 0:
        raise PlanError(f"--owl-lambda ({owl_lambda:g}) and --owl-m ({owl_m:g}) must be positive")
    profile.check_model(view)
    check_profile_holds(profile, view, criterion, method.reads)
    if parsed is not None:
        layer = view.layers[0]
        width, hidden = layer.intermediate_size, int(layer.router_weight.shape[-1])
        if width % parsed[1] or hidden % parsed[1]:
            raise PlanError(f"the {pattern} pattern needs the experts' input sizes (hidden {hidden}, width {width}) to "
                            f"be multiples of {parsed[1]}")
    if experts_plan is not None:
        from moekit.plan import plan_keep_map

        expert_keep = plan_keep_map(experts_plan)
    else:
        expert_keep = {layer.index: list(range(layer.num_experts)) for layer in view.layers}
    outliers: dict[int, float] = {}
    if allocation == "owl":
        for layer, weights in tqdm(layers_with_expert_weights(source, view), total=len(view.layers),
                                   desc=f"OWL outliers ({criterion})", unit="layer", disable=not progress):
            stats = expert_input_stats(profile, layer.index, set_weights, method.reads, expert_keep[layer.index])
            scores = [s for row, e in enumerate(expert_keep[layer.index])
                      for s in method.score(weights(e), {k: v[row] for k, v in stats.items()}).values()]
            outliers[layer.index] = outlier_fraction(scores, owl_m)
        per_layer = owl_sparsities(outliers, sparsity, owl_lambda)
    else:
        per_layer = {layer.index: sparsity for layer in view.layers}
    layers: dict[str, Any] = {}
    for layer in view.layers:
        entry = dict(experts_plan["layers"][str(layer.index)]) if experts_plan is not None else \
            {"kept": expert_keep[layer.index], "removed": []}
        entry["sparsity"] = per_layer[layer.index]
        if allocation == "owl":
            entry["outlier_fraction"] = outliers[layer.index]
        layers[str(layer.index)] = entry
    sets = [{"name": x["name"], "tokens": x["tokens"], "data": x["data"]} for x in profile.meta["sets"]]
    details: dict[str, Any] = {
        "weight_criterion": criterion, "sparsity": sparsity, "allocation": allocation, "pattern": pattern,
        "set_weights": set_weights, "criterion_doc": method.doc,
        "profile": {"path": profile_path, "sets": sets, "fingerprint": profile.fingerprint},
        "compared": "within each output row of each projection (Wanda)" if parsed is None else
        f"{parsed[0]} of every {parsed[1]} consecutive inputs of each row",
        "zeroed": "gate, up and down weights of the kept routed experts (no bias, router, shared expert or other "
                  "weight)"}
    if allocation == "owl":
        details["owl"] = {"m": owl_m, "lambda": owl_lambda}
    top_k = None
    kept_experts = len(expert_keep[view.layers[0].index])
    if experts_plan is not None:  # STUN's first stage, as its own plan recorded it
        details["experts"] = {"method": experts_plan["method"], "details": experts_plan.get("details", {})}
        details["allow_regroup"] = experts_plan.get("details", {}).get("allow_regroup", False)
        top_k = (experts_plan.get("top_k") or {}).get("after")
    return plan_envelope(SPARSITY_PLAN_FORMAT, source_name or profile.meta["model"].get("source", ""),
                         summarize(view), kept_experts, criterion, details, top_k, layers)


def expert_input_stats(profile: Any, layer: int, set_weights: dict[str, float] | None, reads: tuple[str, ...],
                       kept: list[int]) -> dict[str, torch.Tensor]:
    """The statistics ``reads`` of the ``kept`` experts of ``layer`` (rows in that order), sets combined."""
    from moekit.score.neurons import neuron_layer_stats

    return {k: v[kept] for k, v in neuron_layer_stats(profile, layer, set_weights, reads).items()} if reads else {}


def plan_layer_sparsity(plan: dict[str, Any], view: MoEModelView, origin: str = "plan") -> dict[int, float]:
    """A sparsity plan's sparsity of every MoE layer of ``view``, checked."""
    if plan.get("format") != SPARSITY_PLAN_FORMAT:
        raise PlanError(f"{origin} is not a sparsity plan (format {SPARSITY_PLAN_FORMAT!r})")
    details = plan.get("details") or {}
    _check_request(float(details.get("sparsity", -1)), str(details.get("allocation")), str(details.get("pattern")))
    layers = plan["layers"]
    out = {}
    for layer in view.layers:
        value = (layers.get(str(layer.index)) or {}).get("sparsity")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise PlanError(f"{origin}: layer {layer.index} needs a 'sparsity' between 0 and 1, got {value!r}")
        out[layer.index] = float(value)
    return out


def plan_profile(plan: dict[str, Any], profile: Any | None = None) -> Any:
    """The profile a sparsity plan's masks are computed from: ``profile`` or the one at the path the plan records,
    checked to be the one the plan was made from (same model fingerprint and sets)."""
    from moekit.profile.profile_file import Profile

    recorded = (plan.get("details") or {}).get("profile") or {}
    if profile is None:
        path = recorded.get("path")
        if not path or not Path(path).is_dir():
            raise PlanError(f"the sparsity plan computes its masks from the profile it was made from, {path!r}, "
                            "which is not there: give it with --profile PROFILE")
        profile = Profile.load(path)
    sets = [{"name": x["name"], "tokens": x["tokens"], "data": x["data"]} for x in profile.meta["sets"]]
    if recorded.get("fingerprint") != profile.fingerprint or recorded.get("sets") != sets:
        raise PlanError("the profile is not the one the sparsity plan was made from (its model fingerprint or sets "
                        "differ): give the plan's profile with --profile, or make the plan again")
    return profile


def sparsify_layer(layer: Any, kept: list[int], sparsity: float, criterion: str, stats: dict[str, torch.Tensor],
                   pattern: tuple[int, int] | None) -> tuple[int, int]:
    """Zero the lowest-scoring weights of every expert of ``layer`` (already cut to the ``kept`` experts; ``stats``
    rows in that order), in place; (weights now zero, weights) over the layer's expert projections."""
    from dataclasses import replace

    from moekit.arch.experts import write_expert_weights
    from moekit.score.weights import WEIGHT_CRITERIA, projections

    method = WEIGHT_CRITERIA.get(criterion)
    zeros = total = 0
    for expert in range(len(kept)):
        weights = layer.layout.expert_weights(layer.experts, expert)
        scores = method.score(weights, {k: v[expert] for k, v in stats.items()})
        new = {}
        for name, w in projections(weights).items():
            value = w.detach().clone()
            value[row_zero_mask(scores[name], sparsity, pattern).to(value.device)] = 0
            zeros += int((value == 0).sum())
            total += value.numel()
            new[name] = value
        write_expert_weights(layer.layout, layer.experts, expert, replace(weights, **new))
    return zeros, total


def sparsity_to_checkpoint(source: str | Path, plan: dict[str, Any], out: str | Path, overwrite: bool = False,
                           dtype: str = "auto", reproduce: str | None = None, profile: Any | None = None) -> Any:
    """Write ``source`` with ``plan``'s experts removed (STUN's first stage, if the plan has one) and the kept
    experts' lowest-scoring weights zeroed to ``out`` (streamed one decoder layer at a time for a local safetensors
    checkpoint), with the plan, which gains the measured sparsity, and a card."""
    from moekit.edit.keep import plan_record_keep
    from moekit.edit.neurons import check_profile_holds
    from moekit.edit.rewrite import ExpertEdit, expert_edit_to_checkpoint
    from moekit.model_io import load_structure
    from moekit.score.weights import WEIGHT_CRITERIA

    details = plan.get("details") or {}
    criterion = str(details.get("weight_criterion"))
    method = WEIGHT_CRITERIA.get(criterion)
    pattern = parse_pattern(str(details.get("pattern")))
    profile = plan_profile(plan, profile)
    source_view = MoEModelView.from_model(load_structure(source))
    profile.check_model(source_view)
    check_profile_holds(profile, source_view, criterion, method.reads)
    expert_keep = plan_record_keep(plan)
    written = dict(plan)
    measured: dict[int, tuple[int, int]] = {}

    def prepare(structure: MoEModelView) -> ExpertEdit:  # the structure after the plan's expert pruning
        per_layer = plan_layer_sparsity(plan, structure)

        def edit(layer: Any) -> None:
            kept = expert_keep[layer.index]
            stats = expert_input_stats(profile, layer.index, details.get("set_weights"), method.reads, kept)
            measured[layer.index] = sparsify_layer(layer, kept, per_layer[layer.index], criterion, stats, pattern)
            zeros, total = (sum(v[i] for v in measured.values()) for i in (0, 1))
            written["measured_sparsity"] = {
                "routed_expert_weights": round(zeros / max(total, 1), 6),
                "per_layer": {str(i): round(z / max(t, 1), 6) for i, (z, t) in sorted(measured.items())}}
        return ExpertEdit(edit)

    def card(name: str, described: str, before: Any, after: Any, base: Path, command: str) -> str:
        return render_sparsity_card(name, described, before, after, written, command, base)

    return expert_edit_to_checkpoint(source, written, out, prepare, card, "sparsified", overwrite=overwrite,
                                     dtype=dtype, reproduce=reproduce)


def render_sparsity_card(name: str, source: str, before: Any, after: Any, plan: dict[str, Any], reproduce: str,
                         base: Path | None = None) -> str:
    """The checkpoint's README.md after STUN's second stage (and its first, when the plan removes experts)."""
    reproduce = reproduce.replace(source, shown_path(source, base))
    source = shown_path(source, base)
    v = versions()
    details = plan.get("details") or {}
    measured = plan.get("measured_sparsity") or {}
    layers = [entry["sparsity"] for entry in plan["layers"].values()]
    allocation = (f"OWL's layer sparsities, {min(layers):.3f} to {max(layers):.3f} (M = {details['owl']['m']:g}, "
                  f"lambda = {details['owl']['lambda']:g})" if details.get("allocation") == "owl" else
                  "the same sparsity in every MoE layer")
    experts = details.get("experts")
    first = (f"{plan['num_experts']['before'] - plan['num_experts']['after']} of the {plan['num_experts']['before']} "
             f"experts of every MoE layer are removed first (`{experts['method']}`), then " if experts else "")
    share = measured.get("routed_expert_weights")
    return f"""---
library_name: transformers
tags:
- moekit
- mixture-of-experts
- sparsity
---

# {name}

Sparsified from `{source}` ({before.model_type}, {before.architecture}) with moekit {v['moekit']}: {first}the
lowest-scoring weights of every kept routed expert are set to zero (criterion `{plan['method']}`, target sparsity
{details.get('sparsity')}, pattern {details.get('pattern')}, {allocation}; {details.get('compared')}).
**Measured: {100 * share:.2f}% of the routed-expert weights are zero.** Biases, routers, shared experts and every
other weight are the source's. No weights were retrained.

**The zeros are stored densely: this checkpoint is as large as one without them and runs no faster, unless a
sparse format or kernel uses them** (2:4 is the pattern sparse tensor cores accelerate).

{card_tail(before, after, reproduce, "(Parameter counts include the zeros.) ")}
The plan (`moekit_plan.json`) lists every layer's sparsity, as planned and as measured.
"""


__all__ = ["ALLOCATIONS", "OWL_LAMBDA", "OWL_M", "make_sparsity_plan", "outlier_fraction", "owl_sparsities",
           "parse_pattern", "plan_layer_sparsity", "plan_profile", "render_sparsity_card", "row_zero_mask",
           "sparsify_layer", "sparsity_to_checkpoint"]
