"""The merge plan record (``moekit_plan.json``) and the model card of a merged checkpoint."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from moekit.edit.card import NOT_MEASURED, QUALITY_HEADING, _details_text, _param_rows, _top_k_text, plan_envelope
from moekit.environment import versions
from moekit.merge.groups import MERGE_PLAN_FORMAT, GroupMap
from moekit.outputs import shown_path
from moekit.summary import ModelSummary


def merge_plan_record(source: str, before: ModelSummary, groups: GroupMap, method: str,
                      details: dict[str, Any] | None = None,
                      layer_details: dict[int, list[dict[str, Any]]] | None = None,
                      top_k: int | None = None) -> dict[str, Any]:
    """The plan saved beside a merged checkpoint: same inputs, same bytes (no timestamps). Layers carry the
    pruning plan's ``kept``/``removed`` lists (each group's router expert is kept) and the ``groups``."""
    layers: dict[str, Any] = {}
    for layer in before.layers:
        layer_groups = groups[layer.layer]
        kept = [g.router for g in layer_groups]
        entry: dict[str, Any] = {"kept": kept, "removed": [e for e in range(layer.num_experts) if e not in set(kept)],
                                 "groups": [g.record(into) for into, g in enumerate(layer_groups)]}
        if layer_details and layer.layer in layer_details:
            entry["experts"] = layer_details[layer.layer]
        layers[str(layer.layer)] = entry
    kept = len(next(iter(groups.values())))
    return plan_envelope(MERGE_PLAN_FORMAT, source, before, kept, method, details, top_k, layers)


def _group_text(entry: dict[str, Any]) -> str:
    parts = []
    for group in entry["groups"]:
        members = group["members"]
        if len(members) == 1:
            continue
        inner = " + ".join(f"{m['expert']} ({m['weight']:.2f})" for m in members)
        parts.append(f"{group['into']} = {inner}")
    return "; ".join(parts) or "-"


def render_merge_card(name: str, source: str, before: ModelSummary, after: ModelSummary, plan: dict[str, Any],
                      reproduce: str, base: Path | None = None) -> str:
    """The merged checkpoint's README.md (local paths shown relative to ``base``, as pruned cards show them)."""
    reproduce = reproduce.replace(source, shown_path(source, base))
    source = shown_path(source, base)
    v = versions()
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(f"| {layer} | {len(entry['kept'])} | {_group_text(entry)} |"
                     for layer, entry in sorted(plan["layers"].items(), key=lambda kv: int(kv[0])))
    merged = before.num_experts - after.num_experts
    return f"""---
library_name: transformers
tags:
- moekit
- mixture-of-experts
- expert-merging
---

# {name}

Expert-merged from `{source}` ({before.model_type}, {before.architecture}) with
moekit {v['moekit']}: **the {before.num_experts} routed experts of each of the {len(before.moe_layers)} MoE layers
merged into {after.num_experts}** ({merged} fewer per layer, {_top_k_text(before, after)}). No weights were
retrained: each output expert is the weighted average of its group's experts (neurons aligned where the method
aligns them), its router row is that of the group's router expert, and every other weight is the source's.
The routed experts really are fewer on disk (not copies of a merged expert in every old slot).

It loads with plain `AutoModelForCausalLM.from_pretrained`.

| | source | merged | kept |
|---|---|---|---|
{_param_rows(before, after)}

## How

Method: `{plan['method']}`. The plan (`moekit_plan.json`, beside this card) lists every layer's groups: the
experts merged into each output expert, their weights, and the expert whose router row it keeps.
{_details_text(plan.get("details") or {}, base)}
Reproduce: `{reproduce}`

## Groups per MoE layer

Output expert = source experts (weights); experts kept alone are not listed.

| layer | experts | merged groups (source numbering) |
|---|---|---|
{rows}

{QUALITY_HEADING}

{NOT_MEASURED}

Written {today} with moekit {v['moekit']}, transformers {v['transformers']}, torch {v['torch']}.
"""
