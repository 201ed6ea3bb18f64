"""Model cards and plan records for edited checkpoints."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import moekit
from moekit.environment import versions
from moekit.outputs import shown_path
from moekit.summary import ModelSummary, format_count

PLAN_FORMAT = "moekit.expert_prune_plan/1"
MERGE_PLAN_FORMAT = "moekit.expert_merge_plan/1"  # a pruning plan whose layers also hold groups (moekit.merge)
NEURON_PLAN_FORMAT = "moekit.neuron_prune_plan/1"  # a pruning plan whose layers also hold kept neurons (edit.neurons)
SPARSITY_PLAN_FORMAT = "moekit.sparsity_plan/1"  # a pruning plan whose layers also hold a sparsity (edit.sparsity)
MASK_PLAN_FORMAT = "moekit.routing_mask_plan/1"  # every expert kept; layers list experts never selected (edit.mask)
QUALITY_HEADING = "## Quality"
NOT_MEASURED = "Not measured by this step. Measure before serving."


def with_measured_quality(card: str, text: str) -> str:
    """``card`` (a pruned checkpoint's README.md) with its Quality section saying what was measured (``text``,
    markdown) instead of "not measured"."""
    placeholder = f"{QUALITY_HEADING}\n\n{NOT_MEASURED}\n"
    if placeholder not in card:
        raise ValueError("the card has no unmeasured Quality section to fill in")
    return card.replace(placeholder, f"{QUALITY_HEADING}\n\n{text.strip()}\n")


def prune_plan_record(source: str, before: ModelSummary, keep: dict[int, list[int]], method: str,
                      details: dict[str, Any] | None = None,
                      layer_details: dict[int, list[dict[str, Any]]] | None = None,
                      top_k: int | None = None) -> dict[str, Any]:
    """The plan saved beside a pruned checkpoint: same inputs, same bytes (no timestamps).

    ``layer_details``: per layer, one entry per expert (score, rank, decision, reason) from a planner.
    ``top_k``: a new number of experts per token, if the plan lowers it.
    """
    layers: dict[str, Any] = {}
    for layer in before.layers:
        kept = keep[layer.layer]
        layers[str(layer.layer)] = {"kept": kept,
                                    "removed": [e for e in range(layer.num_experts) if e not in set(kept)]}
        if layer_details and layer.layer in layer_details:
            layers[str(layer.layer)]["experts"] = layer_details[layer.layer]
    return plan_envelope(PLAN_FORMAT, source, before, len(next(iter(keep.values()))), method, details, top_k, layers)


def plan_envelope(fmt: str, source: str, before: ModelSummary, kept: int, method: str,
                  details: dict[str, Any] | None, top_k: int | None, layers: dict[str, Any]) -> dict[str, Any]:
    """Everything of a plan record but its layers, the same for pruning and merge plans (no timestamps)."""
    return {
        "format": fmt,
        "method": method,
        "details": details or {},
        "source": {"model": source, "model_type": before.model_type, "architecture": before.architecture,
                   "total_parameters": before.total_parameters},
        "num_experts": {"before": before.num_experts, "after": kept},
        "top_k": {"before": before.top_k, "after": top_k if top_k is not None else before.top_k},
        "layers": layers,
        "moekit_version": moekit.__version__,
    }


def _param_rows(before: ModelSummary, after: ModelSummary) -> str:
    rows = []
    for label, attr in (("parameters", "total_parameters"), ("active per token", "active_parameters"),
                        ("routed-expert parameters", "routed_expert_parameters")):
        a, b = getattr(before, attr), getattr(after, attr)
        rows.append(f"| {label} | {format_count(a)} | {format_count(b)} | {100.0 * b / max(a, 1):.1f}% |")
    return "\n".join(rows)


def card_tail(before: ModelSummary, after: ModelSummary, reproduce: str, note: str = "") -> str:
    """The end every edited checkpoint's card shares: that it loads stock, the parameter table, the versions and
    the command that reproduces it (``note``: a sentence before the versions)."""
    v = versions()
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""It loads with plain `AutoModelForCausalLM.from_pretrained`.

| | before | after | after / before |
|---|---:|---:|---:|
{_param_rows(before, after)}

{note}Made {today} with torch {v['torch']}, transformers {v['transformers']}. Reproduce:

```
{reproduce}
```
"""


def _top_k_text(before: ModelSummary, after: ModelSummary) -> str:
    if before.top_k == after.top_k:
        return f"top-{after.top_k} routing unchanged"
    return f"experts per token lowered from {before.top_k} to {after.top_k}"


def _has_scores(plan: dict[str, Any]) -> bool:
    return any("experts" in entry for entry in plan["layers"].values())


def _details_text(details: dict[str, Any], base: Path | None = None) -> str:
    """Method, budget, calibration data and protections of a scored plan, as card lines."""
    if "criterion" not in details:
        return "".join(f"\n- {key}: `{value}`" for key, value in sorted(details.items())) + "\n" if details else ""
    budget = (f"ratio {details['ratio']} (fraction of experts removed)" if details.get("ratio") is not None
              else f"keep {details['keep']} experts per layer")
    sets = details.get("profile", {}).get("sets", [])
    data = "; ".join(f"`{s['name']}`: {s['tokens']:,} tokens from `{_data_path(s['data'], base)}` "
                     f"(weight {details['set_weights'].get(s['name'], 0):g})" for s in sets)
    protections = details.get("protections", {})
    supers = ", ".join(f"{layer}:{expert}" for layer, expert in protections.get("super_experts", [])) or "none"
    user = ", ".join(f"{layer}:{expert}" for layer, expert in protections.get("user", [])) or "none"
    contrast = ""
    if protections.get("contrast_sets"):
        c = protections["contrast_sets"]
        contrast = (f"- protected by contrast: the {c['per_layer']} experts per layer that `{c['a']}` routes to most "
                    f"more than `{c['b']}` ({len(protections.get('contrast', []))} experts)\n")
    for audit in details.get("contrast_audits", []):
        verdict = (f"**removes or merges {audit['not_kept_count']} of them** (layer:expert "
                   + ", ".join(f"{layer}:{e}" for layer, e in audit["not_kept"]) + ")"
                   if audit["not_kept_count"] else "keeps every one of them")
        contrast += (f"- contrast audit: of the {audit['of']} experts that `{audit['a']}` routes to most more than "
                     f"`{audit['b']}` (top {audit['per_layer']} per layer), this plan {verdict}\n")
    return (f"\n- criterion: `{details['criterion']}` — {details.get('criterion_doc', '')}\n- budget: {budget}\n"
            f"- calibration data: {data}\n- protected super experts (layer:expert): {supers}"
            f"{'' if protections.get('protect_super', True) else ' (protection turned off)'}\n"
            f"- protected by the user: {user}\n{contrast}")


def _data_path(data: Any, base: Path | None = None) -> str:
    items = data if isinstance(data, list) else [data]
    paths = [str(item.get("path", "?")) for item in items if isinstance(item, dict)]
    return ", ".join(shown_path(p, base) for p in paths)


def render_prune_card(name: str, source: str, before: ModelSummary, after: ModelSummary, plan: dict[str, Any],
                      reproduce: str, base: Path | None = None) -> str:
    """The pruned checkpoint's README.md; with ``base`` (the output folder) local paths are shown relative to it
    or by name (``shown_path``), not as this machine's absolute paths."""
    reproduce = reproduce.replace(source, shown_path(source, base))
    source = shown_path(source, base)
    v = versions()
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(
        f"| {layer} | {len(entry['kept'])} | {', '.join(map(str, entry['removed'])) or '-'} |"
        for layer, entry in sorted(plan["layers"].items(), key=lambda kv: int(kv[0]))
    )
    removed = before.num_experts - after.num_experts

    return f"""---
library_name: transformers
tags:
- moekit
- mixture-of-experts
- expert-pruning
---

# {name}

Expert-pruned from `{source}` ({before.model_type}, {before.architecture}) with
moekit {v['moekit']}: **{removed} of {before.num_experts} routed experts
removed from each of the {len(before.moe_layers)} MoE layers** ({before.num_experts} -> {after.num_experts} experts,
{_top_k_text(before, after)}). No weights were retrained: the kept experts, the routers' rows for them,
and every other weight are the source's, unchanged (bit for bit unless a different dtype was asked for).

It loads with plain `AutoModelForCausalLM.from_pretrained`.

| | source | pruned | kept |
|---|---|---|---|
{_param_rows(before, after)}

## How

Method: `{plan['method']}`. The plan (`moekit_plan.json`, beside this card) lists the kept and removed
experts of every layer{" with each expert's score and the reason for its fate" if _has_scores(plan) else ""};
kept experts keep their relative order (new id = rank of the old id).
{_details_text(plan.get("details") or {}, base)}
Reproduce: `{reproduce}`

## Removed experts per MoE layer

| layer | kept | removed expert ids (source numbering) |
|---|---|---|
{rows}

{QUALITY_HEADING}

{NOT_MEASURED}

Written {today} with moekit {v['moekit']}, transformers {v['transformers']}, torch {v['torch']}.
"""
