"""Editing models: remove experts and write a standard checkpoint (``prune_to_checkpoint``)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from moekit.arch.view import MoEModelView, config_value
from moekit.edit import stream
from moekit.edit.card import prune_plan_record, render_prune_card
from moekit.edit.checkpoint import OutputDirError, check_output_dir, finish_checkpoint, write_checkpoint
from moekit.edit.keep import KeepMap, PlanError, check_removes_experts, parse_keep, read_keep_file, validate_keep
from moekit.edit.prune import prune_experts, prune_layer, set_top_k, validate_top_k
from moekit.edit.safetensors_io import write_sharded
from moekit.model_io import check_dtype, describe_source, load_model, load_structure
from moekit.needs import check_disk_room
from moekit.outputs import writing_directory
from moekit.summary import ModelSummary, summarize

__all__ = [
    "OutputDirError", "PlanError", "PruneResult", "parse_keep", "prune_experts", "prune_layer",
    "prune_to_checkpoint", "read_keep_file", "read_source_structure", "set_top_k", "validate_keep", "validate_top_k",
    "write_streamed",
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

    Everything is checked before a weight is read: the output directory, that the model is a
    supported MoE, the stored weights (safetensors headers complete, shapes matching the config), and the
    plan (every MoE layer covered, equal counts, ids that exist, top-k and group constraints). The
    checkpoint is written atomically, with ``moekit_plan.json`` and a card.
    ``top_k`` lowers the experts per token; ``plan`` is a planner's record (``moekit.plan``) to
    save instead of a bare keep-list record. A keep map that keeps every expert is refused (nothing would
    be removed) unless ``allow_no_removal``, which writes a copy (a test of the writer's exactness).

    A local safetensors checkpoint is edited by streaming (``moekit.edit.stream``): tensor by tensor, in
    memory that does not grow with the model. A hub id, or a ``dtype`` that would cast stored weights, is
    loaded into memory, pruned there and saved (``_prune_in_memory``).
    """
    check_dtype(dtype)
    out_path = check_output_dir(out, source, overwrite)
    structure, files, tensors = read_source_structure(source)
    kept = validate_keep(structure, keep, allow_regroup=allow_regroup)
    if not allow_no_removal:
        check_removes_experts(structure, kept)
    if top_k is not None:
        validate_top_k(structure, top_k, kept)
    if files is None or stream.needs_cast(tensors, dtype):
        return _prune_in_memory(source, keep, out_path, overwrite, allow_regroup, dtype, method, details, reproduce,
                                top_k, plan)

    outputs = stream.plan_tensors(structure, keep, tensors, source)
    check_disk_room(out_path, sum(t.nbytes for t in outputs))  # the weights are all but a few kB of it
    before = summarize(structure)
    _prune_view(structure, keep, allow_regroup, top_k)  # on the meta model: the edited config, the summary after
    after = summarize(structure)
    plan, card = _records(source, out_path, before, after, keep, method, details, reproduce, top_k, plan)
    with writing_directory(out_path, "checkpoint") as tmp:
        write_streamed(tmp, source, structure, files, tensors, outputs, dtype, plan, card)
    return PruneResult(out_path, before, after, plan)


def read_source_structure(source: str | Path) -> tuple[MoEModelView, list[Path] | None, list[stream.TensorInfo]]:
    """The model's structure (the view over the meta model), its safetensors files (None for a hub id) and their
    tensors, checked; for a family not in moekit's table, the routing is probed on the stored routers."""
    structure = MoEModelView.from_model(load_structure(source))
    files = stream.safetensors_files(source)
    tensors = stream.read_source(files, source) if files is not None else []
    if files is not None and not structure.family_known:  # probe the routing on the stored routers
        stream.load_router_tensors(structure, tensors)
        structure = MoEModelView.from_model(structure.model)
    return structure, files, tensors


def write_streamed(tmp: Path, source: str | Path, structure: MoEModelView, files: list[Path],
                   tensors: list[stream.TensorInfo], outputs: list[Any], dtype: str, plan: dict[str, Any],
                   card: str) -> None:
    """The streaming editor's checkpoint in ``tmp``: the output tensors in shards sized like the source's, the
    edited config (``structure``'s, already edited; the stored dtype unless ``dtype`` says otherwise), the
    source's generation config and side files, the plan and the card. Pruning and merging both end here."""
    config = structure.model.config
    config.architectures = [type(structure.model).__name__]
    if dtype != "auto":
        config.dtype = dtype
    elif getattr(config, "dtype", None) is None:
        config.dtype = stream.stored_dtype(tensors)
    write_sharded(tmp, outputs, stream.default_shard_size(files))
    config.save_pretrained(tmp)
    _save_generation_config(structure.model, Path(source), tmp)
    finish_checkpoint(tmp, source, plan, card, config_aliases(structure))


def _prune_view(view: MoEModelView, keep: KeepMap, allow_regroup: bool, top_k: int | None) -> None:
    prune_experts(view, keep, allow_regroup=allow_regroup)
    if top_k is not None:
        set_top_k(view, top_k)


def _records(source: str | Path, out: Path, before: ModelSummary, after: ModelSummary, keep: KeepMap, method: str,
             details: dict[str, Any] | None, reproduce: str | None, top_k: int | None,
             plan: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The plan record and the model card of a pruned checkpoint."""
    source_name = describe_source(source)
    if plan is None:
        plan = prune_plan_record(source_name, before, keep, method, details, top_k=top_k)
    if reproduce is None:
        reproduce = f"moekit apply {shlex.quote(source_name)} moekit_plan.json --out OUT"
    return plan, render_prune_card(out.name, source_name, before, after, plan, reproduce, base=out)


def _save_generation_config(model: Any, source: Path, tmp: Path) -> None:
    """What ``save_pretrained`` writes beside the config: the source's generation config (re-saved), or the
    one transformers derives from the model config."""
    if not model.can_generate():
        return
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(tmp)
    elif model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)


def _prune_in_memory(
    source: str | Path, keep: KeepMap, out: str | Path, overwrite: bool = False, allow_regroup: bool = False,
    dtype: str = "auto", method: str = "keep-list", details: dict[str, Any] | None = None,
    reproduce: str | None = None, top_k: int | None = None, plan: dict[str, Any] | None = None,
) -> PruneResult:
    """The in-memory path: ``from_pretrained``, prune the loaded model, ``save_pretrained``. Peak memory is
    about twice the checkpoint; used for hub ids and casts, and as the streaming editor's reference in tests."""
    model = load_model(source, dtype=dtype)
    view = MoEModelView.from_model(model)
    before = summarize(view)
    _prune_view(view, keep, allow_regroup, top_k)
    after = summarize(view)
    plan, card = _records(source, Path(out), before, after, keep, method, details, reproduce, top_k, plan)
    path = write_checkpoint(model, out, source, plan, card, overwrite=overwrite, config_aliases=config_aliases(view))
    return PruneResult(path, before, after, plan)
