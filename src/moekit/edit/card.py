"""Model cards and plan records for edited checkpoints."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import torch
import transformers

import moekit
from moekit.summary import ModelSummary, format_count

PLAN_FORMAT = "moekit.expert_prune_plan/1"


def versions() -> dict[str, str]:
    return {"moekit": moekit.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def prune_plan_record(source: str, before: ModelSummary, keep: dict[int, list[int]], method: str,
                      details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan saved beside a pruned checkpoint: same inputs, same bytes (no timestamps)."""
    layers = {}
    for layer in before.layers:
        kept = keep[layer.layer]
        layers[str(layer.layer)] = {"kept": kept,
                                    "removed": [e for e in range(layer.num_experts) if e not in set(kept)]}
    return {
        "format": PLAN_FORMAT,
        "method": method,
        "details": details or {},
        "source": {"model": source, "model_type": before.model_type, "architecture": before.architecture,
                   "total_parameters": before.total_parameters},
        "num_experts": {"before": before.num_experts, "after": len(next(iter(keep.values())))},
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


def render_prune_card(name: str, source: str, before: ModelSummary, after: ModelSummary, plan: dict[str, Any],
                      reproduce: str) -> str:
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
top-{after.top_k} routing unchanged). No weights were retrained: the kept experts, the routers' rows for them,
and every other weight are the source's, unchanged (bit for bit unless a different dtype was asked for).

It loads with plain `AutoModelForCausalLM.from_pretrained`.

| | source | pruned | kept |
|---|---|---|---|
{_param_rows(before, after)}

## How

Method: `{plan['method']}`. The plan (`moekit_plan.json`, beside this card) lists the kept and removed
experts of every layer; kept experts keep their relative order (new id = rank of the old id).

Reproduce: `{reproduce}`

## Removed experts per MoE layer

| layer | kept | removed expert ids (source numbering) |
|---|---|---|
{rows}

## Quality

Not measured by this step. Measure before serving.

Written {today} with moekit {v['moekit']}, transformers {v['transformers']}, torch {v['torch']}.
"""
