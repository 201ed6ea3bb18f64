"""Checking a saved pruning plan completely, against the model, before it is applied.

A plan file (``moekit prune --plan-only``, or the ``moekit_plan.json`` beside a pruned checkpoint)
is JSON that people edit. ``checked_plan`` refuses a plan whose fields are missing, mistyped, or
disagree with each other or with the model, before any weight loads, and returns the plan that is
applied and saved beside the checkpoint: the same record with its layers in canonical form (string
keys in ascending order, sorted id lists).

The per-layer ``kept`` lists are what a plan means; everything else moekit derives from them and
from the request (``removed``, the expert counts, each expert's decision and rank, the budget and
the protections recorded in ``details``). Derived fields are checked, never recomputed: if they
disagree, it is not clear which one the editor meant, so the plan is refused with what to change.
Fields moekit does not read are kept as they are.
"""

from __future__ import annotations

import json
import math
from typing import Any

from moekit.arch.view import MoEModelView
from moekit.edit.card import MERGE_PLAN_FORMAT
from moekit.edit.keep import KeepMap, PlanError, plan_record_keep, validate_keep
from moekit.edit.prune import validate_top_k
from moekit.profile.profile_file import ProfileError
from moekit.score.criteria import check_set_weights
from moekit.summary import summarize

HAND_EDIT_HINT = ("if you changed which experts are kept, give them as a plain keep map "
                  '{"<layer>": [expert ids to keep], ...} or make a new plan with moekit prune --plan-only')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def checked_plan(plan: dict[str, Any], view: MoEModelView, origin: str = "plan") -> dict[str, Any]:
    """``plan`` checked against ``view``'s model (structure only; see the module docstring), in canonical form."""
    keep = plan_record_keep(plan, origin)
    details = plan.get("details", {})
    if not isinstance(details, dict):
        raise PlanError(f"{origin}: 'details' must be an object, got {details!r}")
    if not isinstance(details.get("allow_regroup", False), bool):
        raise PlanError(f"{origin}: details 'allow_regroup' must be true or false, got {details['allow_regroup']!r}")
    kept = validate_keep(view, keep, allow_regroup=details.get("allow_regroup", False))
    first = _entry(plan, view.layers[0].index)
    described = len(first["kept"]) + len(first["removed"])  # the same in every layer (plan_record_keep)
    if described != view.num_experts:
        raise PlanError(f"{origin}: its layers split {described} experts into kept and removed, but this model has "
                        f"{view.num_experts} per MoE layer; the plan was made for another model")
    method = plan.get("method")
    if not isinstance(method, str) or not method:
        raise PlanError(f"{origin}: 'method' must name how the plan was made (e.g. \"reap\"), got {method!r}")
    _check_source(plan.get("source"), view, origin)
    _check_counts(plan.get("num_experts"), view.num_experts, kept, origin)
    _check_top_k(plan.get("top_k"), view, kept, origin)
    if "criterion" in details:
        _check_planner_details(details, method, keep, view.num_experts, origin)
    groups = plan_groups(plan, keep, origin)
    if groups is not None:
        from moekit.merge.groups import check_groups, check_neuron_maps

        check_groups(view, groups, allow_regroup=details.get("allow_regroup", False))
        check_neuron_maps(groups, view.layers[0].intermediate_size, origin)
    for layer in view.layers:
        entries = _entry(plan, layer.index).get("experts")
        if entries is not None:
            merged = {e for g in groups[layer.index] for e in g.experts} if groups is not None else set()
            _check_expert_entries(entries, set(keep[layer.index]), layer.num_experts, f"{origin}: layer {layer.index}",
                                  merged)
    return _canonical(plan, keep)


def plan_groups(plan: dict[str, Any], keep: KeepMap | None = None, origin: str = "plan") -> Any:
    """A merge plan's groups (``moekit.merge.groups.GroupMap``), checked against its kept lists; None for a pruning
    plan. The one place that tells the two kinds apart: a merge plan is never applied as the pruning of its kept
    experts."""
    if plan.get("format") != MERGE_PLAN_FORMAT:
        return None
    from moekit.merge.groups import parse_groups

    return parse_groups(plan, keep if keep is not None else plan_record_keep(plan, origin), origin)


def _entry(plan: dict[str, Any], layer: int) -> dict[str, Any]:
    """The plan's record of MoE layer ``layer`` (its key may be written "01" or " 1"; it is unique)."""
    return next(entry for key, entry in plan["layers"].items() if int(key) == layer)


def _canonical(plan: dict[str, Any], keep: KeepMap) -> dict[str, Any]:
    """A deep copy of ``plan`` with string layer keys in ascending order and sorted kept/removed lists."""
    copy = json.loads(json.dumps(plan))
    layers = {}
    for layer in sorted(keep):
        entry = _entry(copy, layer)
        layers[str(layer)] = {**entry, "kept": keep[layer], "removed": sorted(entry["removed"])}
    copy["layers"] = layers
    return copy


def _check_source(source: Any, view: MoEModelView, origin: str) -> None:
    """The model the plan records (where given) must be of this model's type and size."""
    if source is None:
        return
    if not isinstance(source, dict):
        raise PlanError(f"{origin}: 'source' must be an object describing the model, got {source!r}")
    summary = summarize(view)
    mine = {"model_type": summary.model_type, "architecture": summary.architecture,
            "total_parameters": summary.total_parameters}
    differ = [f"{key} {source[key]!r} (this model: {value!r})" for key, value in mine.items()
              if key in source and source[key] != value]
    if differ:
        raise PlanError(f"{origin} was made for another model ({source.get('model')}): {'; '.join(differ)}. Make a "
                        "plan for this model from its own profile, or give the experts to keep as a plain keep map")


def _check_counts(counts: Any, num_experts: int, kept: int, origin: str) -> None:
    if not isinstance(counts, dict) or not _is_int(counts.get("before")) or not _is_int(counts.get("after")):
        raise PlanError(f"{origin}: 'num_experts' must be {{\"before\": experts per layer, \"after\": experts kept}}, "
                        f"got {counts!r}")
    if counts["before"] != num_experts:
        raise PlanError(f"{origin}: num_experts before is {counts['before']}, but this model has {num_experts} "
                        "experts per MoE layer; the plan was made for another model")
    if counts["after"] != kept:
        raise PlanError(f"{origin}: num_experts after is {counts['after']}, but its layers keep {kept} experts each; "
                        f"make them agree ({HAND_EDIT_HINT})")


def _check_top_k(top_k: Any, view: MoEModelView, kept: int, origin: str) -> None:
    """Absent or null: the model's top-k is kept. Else ``{"before": the model's, "after": 1..kept}``
    (``after`` = ``before`` is at most ``kept``: ``validate_keep`` refuses keeping fewer than top-k)."""
    if top_k is None:
        return
    if not isinstance(top_k, dict) or not _is_int(top_k.get("before")) or not _is_int(top_k.get("after")):
        raise PlanError(f"{origin}: 'top_k' must be {{\"before\": int, \"after\": int}} (experts per token), got "
                        f"{top_k!r}")
    if top_k["before"] != view.top_k:
        raise PlanError(f"{origin}: top_k before is {top_k['before']}, but this model routes each token to "
                        f"{view.top_k} experts; the plan was made for another model")
    if top_k["after"] != top_k["before"]:
        validate_top_k(view, top_k["after"], kept)  # 1 <= after <= kept, below the model's, routing constraints


def _check_planner_details(details: dict[str, Any], method: str, keep: KeepMap, num_experts: int,
                           origin: str) -> None:
    """The fields of a scored plan's details that the card reads, and the budget and protections they record."""
    kept = len(next(iter(keep.values())))
    if details["criterion"] != method:
        raise PlanError(f"{origin}: details criterion {details['criterion']!r} differs from method {method!r}")
    _check_budget(details, kept, num_experts, origin)
    if "kept_per_layer" in details and details["kept_per_layer"] != kept:
        raise PlanError(f"{origin}: details kept_per_layer is {details['kept_per_layer']!r}, but its layers keep "
                        f"{kept} experts each ({HAND_EDIT_HINT})")
    profile = details.get("profile", {})
    sets = profile.get("sets", []) if isinstance(profile, dict) else None
    if not isinstance(sets, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                             and _is_int(s.get("tokens")) and isinstance(s.get("data"), (dict, list))
                                             for s in sets):
        raise PlanError(f"{origin}: details profile sets must be a list of {{name, tokens, data}}, got {profile!r}")
    weights = details.get("set_weights", {})
    if not isinstance(weights, dict):
        raise PlanError(f"{origin}: details set_weights must be an object, got {weights!r}")
    if weights:
        try:
            check_set_weights(weights, [s["name"] for s in sets] or list(weights))
        except ProfileError as err:
            raise PlanError(f"{origin}: details {err}") from None
    _check_protections(details.get("protections", {}), keep, origin)


def _check_budget(details: dict[str, Any], kept: int, num_experts: int, origin: str) -> None:
    """Exactly one of ratio (fraction removed) and keep, and the kept count it gives (as ``kept_count``)."""
    ratio, keep = details.get("ratio"), details.get("keep")
    if (ratio is None) == (keep is None):
        raise PlanError(f"{origin}: details must give exactly one of ratio and keep (the budget), got ratio "
                        f"{ratio!r} and keep {keep!r}")
    if ratio is not None:
        if not _is_number(ratio) or not 0 < ratio < 1:
            raise PlanError(f"{origin}: details ratio must be a number strictly between 0 and 1, got {ratio!r}")
        expected = num_experts - math.floor(num_experts * ratio + 0.5)
        budget = f"ratio {ratio} of {num_experts} experts keeps {expected}"
    else:
        if not _is_int(keep):
            raise PlanError(f"{origin}: details keep must be an integer, got {keep!r}")
        expected, budget = keep, f"keep is {keep}"
    if expected != kept:
        raise PlanError(f"{origin}: details {budget} per layer, but its layers keep {kept} each ({HAND_EDIT_HINT})")


def _check_protections(protections: Any, keep: KeepMap, origin: str) -> None:
    """Every expert recorded as protected must be kept: the record would lie otherwise."""
    if not isinstance(protections, dict) or not isinstance(protections.get("protect_super", True), bool):
        raise PlanError(f"{origin}: details protections must be an object, got {protections!r}")
    for kind in ("super_experts", "user", "contrast"):
        pairs = protections.get(kind, [])
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(map(_is_int, p))
                                                  for p in pairs):
            raise PlanError(f"{origin}: details protections {kind} must be a list of [layer, expert] pairs, "
                            f"got {pairs!r}")
        for layer, expert in pairs:
            if layer not in keep or expert not in keep[layer]:
                raise PlanError(f"{origin}: expert {layer}:{expert} is recorded as protected ({kind.replace('_', ' ')})"
                                f" but the plan does not keep it; keep it, or {HAND_EDIT_HINT}")


def _check_expert_entries(entries: Any, kept: set[int], num_experts: int, where: str,
                          merged: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """A planner's per-expert records: one per expert, in id order, finite scores, ranks and decisions that agree
    (``keep`` for a kept expert, ``merge`` for an expert merged into another (``merged``), else ``drop``)."""
    if not isinstance(entries, list) or len(entries) != num_experts or not all(isinstance(e, dict) for e in entries):
        raise PlanError(f"{where}: 'experts' must list one record per expert ({num_experts})")
    for expert, entry in enumerate(entries):
        if entry.get("expert") != expert or not _is_number(entry.get("score")) or not _is_int(entry.get("rank")) \
                or not isinstance(entry.get("reason"), str):
            raise PlanError(f"{where}: expert record {expert} must hold its id {expert}, a finite score, an integer "
                            f"rank and a reason, got {entry!r}")
        decision = "keep" if expert in kept else "merge" if expert in merged else "drop"
        if entry.get("decision") != decision:
            fate = {"keep": "kept", "merge": "merged into a kept expert", "drop": "removed"}[decision]
            raise PlanError(f"{where}: expert {expert} is {fate} but its record's "
                            f"decision is {entry.get('decision')!r}; update its decision and reason, or "
                            f"{HAND_EDIT_HINT}")
    order = sorted(range(num_experts), key=lambda j: (-entries[j]["score"], j))
    for rank, expert in enumerate(order, start=1):
        if entries[expert]["rank"] != rank:
            raise PlanError(f"{where}: expert {expert} has rank {entries[expert]['rank']} but its score ranks it "
                            f"{rank} (higher score first, ties to the lower id); the scores or ranks were edited")
