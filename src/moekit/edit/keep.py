"""Which experts each MoE layer keeps: reading keep files and checking them against a model.

A keep file maps every MoE layer index to the expert ids it keeps::

    {"0": [0, 2, 5, 7], "1": [1, 2, 3, 6], ...}

A moekit plan file (``moekit_plan.json``, written beside every pruned checkpoint) is accepted too:
its ``layers.<i>.kept`` lists are read, once each layer's ``kept`` and ``removed`` lists are found
to split the layer's experts exactly (``plan_record_keep``).

Every stock config holds one global expert count, so every MoE layer must keep the same number
of experts (which ones may differ per layer). Checks run before any weight is touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.arch.view import MoEModelView
from moekit.edit.card import (
    MASK_PLAN_FORMAT,
    MERGE_PLAN_FORMAT,
    NEURON_PLAN_FORMAT,
    PLAN_FORMAT,
    SPARSITY_PLAN_FORMAT,
)
from moekit.errors import UserError


class PlanError(UserError):
    """A keep plan that cannot be applied to this model; the message says why and what to do."""


KeepMap = dict[int, list[int]]


def parse_keep(data: Any, origin: str = "keep plan") -> KeepMap:
    """Turn ``{"<layer>": [ids...]}`` (or a moekit plan) into ``{layer: sorted ids}``."""
    if isinstance(data, dict) and "format" in data:
        return plan_record_keep(data, origin)
    if not isinstance(data, dict) or not data:
        raise PlanError(f"{origin} must be a JSON object mapping each MoE layer index to a list of expert ids, "
                        'e.g. {"0": [0, 1, 4], "1": [2, 3, 5]}')
    keep: KeepMap = {}
    for key, ids in data.items():
        layer = _layer_key(key, keep, origin)
        keep[layer] = sorted(_expert_ids(ids, f"{origin}: layer {layer}"))
    return keep


def _layer_key(key: Any, seen: KeepMap | dict[int, Any], origin: str) -> int:
    try:
        layer = int(key)
    except (TypeError, ValueError):
        raise PlanError(f"{origin}: layer key {key!r} is not an integer layer index") from None
    if layer in seen:
        raise PlanError(f"{origin}: layer {layer} appears twice (as {key!r} and another key)")
    return layer


def _expert_ids(ids: Any, what: str) -> list[int]:
    """A list of distinct integer expert ids (JSON true/false and 1.0 are not ids)."""
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise PlanError(f"{what} must map to a list of integer expert ids, got {ids!r}")
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise PlanError(f"{what} lists expert(s) {dupes} more than once")
    return ids


OTHER_RECORDS = {"moekit.recover/1": "the record of a moekit recover run", "moekit.moefy/1": "the record of a "
                 "moekit moefy conversion"}


def check_plan_format(plan: dict[str, Any], origin: str = "plan") -> None:
    """Refuse a record that is not an editing plan of the formats moekit writes: a pruning plan (``PLAN_FORMAT``),
    a merge plan (``MERGE_PLAN_FORMAT``), a neuron plan (``NEURON_PLAN_FORMAT``) or a sparsity plan
    (``SPARSITY_PLAN_FORMAT``), whose ``kept``/``removed`` lists mean what a pruning plan's do."""
    fmt = plan.get("format")
    if fmt in (PLAN_FORMAT, MERGE_PLAN_FORMAT, NEURON_PLAN_FORMAT, SPARSITY_PLAN_FORMAT, MASK_PLAN_FORMAT):
        return
    what = OTHER_RECORDS.get(fmt) if isinstance(fmt, str) else None
    raise PlanError(f"{origin} has format {fmt!r}" + (f", {what}, not a pruning plan" if what else "")
                    + f"; moekit applies pruning plans of format {PLAN_FORMAT!r} (moekit prune --plan-only writes "
                    f"one), merge plans of format {MERGE_PLAN_FORMAT!r} (moekit merge --plan-only), neuron plans of "
                    f"format {NEURON_PLAN_FORMAT!r} (moekit prune --neurons --plan-only), sparsity plans of format "
                    f"{SPARSITY_PLAN_FORMAT!r} (moekit prune --sparsity --plan-only), routing masks of format "
                    f"{MASK_PLAN_FORMAT!r} (moekit mask --plan-only) or plain keep "
                    'maps {"<layer>": [expert ids to keep], ...}')


def plan_record_keep(plan: dict[str, Any], origin: str = "plan") -> KeepMap:
    """The kept experts of a moekit plan record, after checking what needs no model: the format, and that
    every layer's ``kept`` and ``removed`` lists are integer ids, disjoint, and together exactly 0..E-1 with
    the same E in every layer. ``moekit.plan.check.checked_plan`` checks the rest against the model."""
    check_plan_format(plan, origin)
    layers = plan.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise PlanError(f"{origin}: 'layers' must map every MoE layer index to its kept and removed experts")
    keep: KeepMap = {}
    sizes: dict[int, int] = {}
    for key, entry in layers.items():
        layer = _layer_key(key, keep, origin)
        if not isinstance(entry, dict):
            raise PlanError(f"{origin}: layer {layer} must be an object with 'kept' and 'removed' expert lists")
        kept = _expert_ids(entry.get("kept"), f"{origin}: layer {layer} 'kept'")
        removed = _expert_ids(entry.get("removed"), f"{origin}: layer {layer} 'removed'")
        both = sorted(set(kept) & set(removed))
        if both:
            raise PlanError(f"{origin}: layer {layer} lists expert(s) {both} as both kept and removed; each expert "
                            "is either kept or removed")
        sizes[layer] = len(kept) + len(removed)
        if sorted(kept + removed) != list(range(sizes[layer])):
            raise PlanError(f"{origin}: layer {layer}: kept {sorted(kept)} and removed {sorted(removed)} together "
                            f"must be exactly the experts 0..E-1 of the layer, each once")
        keep[layer] = sorted(kept)
    if len(set(sizes.values())) != 1:
        raise PlanError(f"{origin}: the layers' kept and removed lists describe different expert counts {sizes}; "
                        "every layer lists each of its experts once, as kept or as removed")
    return keep


def read_json_plan(path: str | Path, what: str = "plan file") -> Any:
    """The JSON in a plan or keep file, with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PlanError(f"{what} {path} is not valid JSON (it is not UTF-8 text: a binary file?)") from None
    except json.JSONDecodeError as err:
        raise PlanError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}, "
                        f"column {err.colno})") from None


def read_keep_file(path: str | Path) -> KeepMap:
    return parse_keep(read_json_plan(path, "keep file"), origin=f"keep file {path}")


def validate_keep(view: MoEModelView, keep: KeepMap, allow_regroup: bool = False) -> int:
    """Check ``keep`` against the model; return the number of experts every layer keeps."""
    moe_layers = [layer.index for layer in view.layers]
    missing = [i for i in moe_layers if i not in keep]
    extra = sorted(set(keep) - set(moe_layers))
    if extra:
        raise PlanError(f"layer(s) {extra} are not MoE layers of this model; its MoE layers are {moe_layers}")
    if missing:
        raise PlanError(f"the plan does not cover MoE layer(s) {missing}; list the experts to keep for every "
                        f"MoE layer {moe_layers}")
    counts = {i: len(keep[i]) for i in moe_layers}
    if len(set(counts.values())) != 1:
        raise PlanError(
            f"every MoE layer must keep the same number of experts (stock configs hold one expert count); "
            f"got {counts}. Keep the same count in every layer (the ids may differ)."
        )
    kept = next(iter(counts.values()))
    for layer in view.layers:
        bad = [e for e in keep[layer.index] if not 0 <= e < layer.num_experts]
        if bad:
            raise PlanError(f"layer {layer.index}: expert id(s) {bad} do not exist; valid ids are "
                            f"0..{layer.num_experts - 1}")
    layer = view.layers[0]
    spec = layer.routing
    if kept < spec.top_k:
        raise PlanError(f"keeping {kept} experts per layer but the model routes each token to {spec.top_k} "
                        f"(top-k); keep at least {spec.top_k}")
    if spec.group_limited:
        _validate_groups(view, keep, kept, allow_regroup)
    return kept


def check_removes_experts(view: MoEModelView, kept: int) -> None:
    """Refuse a keep map that keeps every expert: the "pruned" checkpoint would be a copy of the model."""
    if kept == view.num_experts:
        raise PlanError(f"the plan keeps all {kept} experts of every MoE layer: nothing would be removed. Keep fewer "
                        f"than {kept} per layer, or copy the model instead")


def _validate_groups(view: MoEModelView, keep: KeepMap, kept: int, allow_regroup: bool) -> None:
    spec = view.layers[0].routing
    n_group, topk_group, top_k = spec.n_group, spec.topk_group, spec.top_k
    if kept % n_group:
        raise PlanError(f"group-limited routing: the kept count {kept} must be divisible by n_group={n_group}")
    per_group = kept // n_group
    if spec.group_score == "top2_sum" and per_group < 2:
        raise PlanError(f"group-limited routing scores each group by its top-2 experts: keep at least 2 per "
                        f"group ({2 * n_group} in all), not {kept}")
    if topk_group * per_group < top_k:
        raise PlanError(f"group-limited routing picks {topk_group} of {n_group} groups of {per_group} experts, "
                        f"fewer than top_k={top_k}; keep at least {-(-top_k // topk_group) * n_group}")
    if allow_regroup:
        return
    size = view.layers[0].num_experts // n_group
    for layer in view.layers:
        per = [sum(1 for e in keep[layer.index] if e // size == g) for g in range(n_group)]
        if len(set(per)) != 1:
            raise PlanError(
                f"layer {layer.index}: group-limited routing groups experts in blocks of {size}; the plan keeps "
                f"{per} per group, which would re-form the groups and change routing beyond the removed "
                f"experts. Keep the same number in every group, or allow it explicitly (--allow-regroup)."
            )
