"""Editing models: remove experts and write a standard checkpoint (``prune_to_checkpoint``)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.arch.view import MoEModelView, config_value
from moekit.edit.card import prune_plan_record, render_prune_card
from moekit.edit.checkpoint import OutputDirError, check_output_dir, write_checkpoint
from moekit.edit.keep import KeepMap, PlanError, check_removes_experts, parse_keep, read_keep_file, validate_keep
from moekit.edit.prune import prune_experts, prune_layer, set_top_k, validate_top_k
from moekit.model_io import describe_source, load_model, load_structure
from moekit.summary import ModelSummary, summarize

__all__ = [
    "OutputDirError", "PlanError", "PruneResult", "parse_keep", "prune_experts", "prune_layer",
    "prune_to_checkpoint", "read_keep_file", "set_top_k", "validate_keep", "validate_top_k",
]


@dataclass
class PruneResult:
    out: Path
    before: ModelSummary
    after: ModelSummary
    plan: dict[str, Any]


def config_aliases(view: MoEModelView) -> dict[str, Any]:
    """Top-level config keys (every alias) of the expert count and of top-k, with their current values."""
    keys = [*view.config_fields.expert_count, *view.config_fields.top_k]
    return {k: config_value(view.model.config, k) for k in keys if "." not in k}


def prune_to_checkpoint(
    source: str | Path,
    keep: KeepMap,
    out: str | Path,
    overwrite: bool = False,
    allow_regroup: bool = False,
    dtype: str = "auto",
    method: str = "keep-list",
    details: dict[str, Any] | None = None,
    reproduce: str | None = None,
    top_k: int | None = None,
    plan: dict[str, Any] | None = None,
    allow_no_removal: bool = False,
) -> PruneResult:
    """Keep only the listed experts of every MoE layer of ``source`` and write the result to ``out``.

    Everything is checked before a weight is loaded: the output directory, that the model is a
    supported MoE, and the plan (every MoE layer covered, equal counts, ids that exist, top-k and
    group constraints). The checkpoint is written atomically, with ``moekit_plan.json`` and a card.
    ``top_k`` lowers the experts per token; ``plan`` is a planner's record (``moekit.plan``) to
    save instead of a bare keep-list record. A keep map that keeps every expert is refused (nothing would
    be removed) unless ``allow_no_removal``, which writes a copy (a test of the writer's exactness).
    """
    check_output_dir(out, source, overwrite)
    structure = MoEModelView.from_model(load_structure(source))
    kept = validate_keep(structure, keep, allow_regroup=allow_regroup)
    if not allow_no_removal:
        check_removes_experts(structure, kept)
    if top_k is not None:
        validate_top_k(structure, top_k, kept)

    model = load_model(source, dtype=dtype)
    view = MoEModelView.from_model(model)
    before = summarize(view)
    prune_experts(view, keep, allow_regroup=allow_regroup)
    if top_k is not None:
        set_top_k(view, top_k)
    after = summarize(view)

    source_name = describe_source(source)
    if plan is None:
        plan = prune_plan_record(source_name, before, keep, method, details, top_k=top_k)
    if reproduce is None:
        reproduce = f"moekit apply {shlex.quote(source_name)} moekit_plan.json --out OUT"
    card = render_prune_card(Path(out).name, source_name, before, after, plan, reproduce)
    path = write_checkpoint(model, out, source, plan, card, overwrite=overwrite, config_aliases=config_aliases(view))
    return PruneResult(path, before, after, plan)
