"""Applying a merge plan: fewer experts on disk, each kept slot holding its group's merged expert.

    result = merge_to_checkpoint("model-dir", plan, "out-dir")      # plan: a merge plan record (moekit.merge.groups)

A merge is a pruning (each group keeps its router expert's slot, router row, router bias and correction bias,
``moekit.merge.groups``) whose kept experts' weights are then replaced by their groups' merged weights
(``moekit.merge.combine.merge_group``). A local safetensors checkpoint is written by the streaming editor
(``moekit.edit.stream``) exactly as pruning writes it, except that the expert tensors of the slots that merge
come from a scratch file: one MoE layer at a time is read from the shards (``moekit.layerwise.LayerwiseModel``),
merged in memory, turned back into the stored names and layout by transformers' own
``revert_weight_conversion`` (what ``save_pretrained`` does), written to a scratch safetensors file inside
the output being written, copied from there into the shards, and deleted. Memory holds one decoder layer;
layers whose groups are all singletons are never read (their bytes are copied, so a plan of singleton
groups writes the pruned checkpoint byte for byte). A hub id, or a ``dtype`` that casts, goes through the
in-memory path (``from_pretrained``, merge, ``save_pretrained``), as pruning does.

Merging averages stored values, so FP8-quantized experts (values with block scales) are refused.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.arch.experts import write_expert_weights
from moekit.arch.view import MoELayer, MoEModelView
from moekit.edit import _prune_view, config_aliases, read_source_structure, stream, write_streamed
from moekit.edit.checkpoint import check_output_dir, write_checkpoint
from moekit.edit.keep import PlanError, check_removes_experts, validate_keep
from moekit.edit.prune import prune_layer, set_expert_count, validate_top_k
from moekit.edit.rewrite import rewrite_expert_layers
from moekit.merge.card import render_merge_card
from moekit.merge.combine import merge_group
from moekit.merge.groups import GroupMap, check_groups, check_neuron_maps, keep_of
from moekit.model_io import check_dtype, describe_source, load_model
from moekit.needs import check_disk_room
from moekit.outputs import writing_directory
from moekit.summary import ModelSummary, summarize

SCRATCH = ".moekit-merged-experts"  # inside the output being written; deleted before it is renamed into place


@dataclass
class MergeResult:
    out: Path
    before: ModelSummary
    after: ModelSummary
    plan: dict[str, Any]


def check_mergeable(view: MoEModelView, groups: GroupMap, allow_regroup: bool = False) -> None:
    """Everything about ``groups`` that can be checked on the model's structure, before a weight is read."""
    keep = keep_of(groups)
    kept = validate_keep(view, keep, allow_regroup=allow_regroup)
    check_removes_experts(view, kept)
    check_groups(view, groups, allow_regroup=allow_regroup)
    check_neuron_maps(groups, view.layers[0].intermediate_size)


def _refuse_quantized(layer: MoELayer) -> None:
    fp8 = [name for name, t in layer.experts.named_parameters() if t.dtype.is_floating_point and t.element_size() == 1]
    if fp8 or any(name.endswith(stream.SCALE_SUFFIXES) for name, _ in layer.experts.named_parameters()):
        raise PlanError(f"MoE layer {layer.index} stores its experts in FP8 with block scales; merging averages "
                        "weights, which quantized values cannot be. Dequantize the checkpoint first (or prune it: "
                        "pruning copies quantized experts unchanged)")


def merge_layer(layer: MoELayer, groups: list[Any]) -> None:
    """Merge one loaded MoE layer in place: every group's merged expert computed from the source experts, then
    the layer pruned to the groups' router experts (``prune_layer``) and each merging slot overwritten."""
    _refuse_quantized(layer)
    layout, experts = layer.layout, layer.experts
    merged = {into: merge_group([layout.expert_weights(experts, e) for e in group.experts], group)
              for into, group in enumerate(groups) if not group.is_copy}
    prune_layer(layer, [g.router for g in groups])
    for into, weights in merged.items():
        write_expert_weights(layout, layer.experts, into, weights)


def merge_model(view: MoEModelView, groups: GroupMap, allow_regroup: bool = False) -> int:
    """Merge a loaded model in place (every MoE layer), the config's expert count included; the new count."""
    check_mergeable(view, groups, allow_regroup)
    with torch.no_grad():
        for layer in view.layers:
            merge_layer(layer, groups[layer.index])
    kept = len(groups[view.layers[0].index])
    set_expert_count(view, kept)
    return kept


def merge_to_checkpoint(source: str | Path, groups: GroupMap, plan: dict[str, Any], out: str | Path,
                        overwrite: bool = False, allow_regroup: bool = False, dtype: str = "auto",
                        top_k: int | None = None, reproduce: str | None = None) -> MergeResult:
    """Write ``source`` merged by ``groups`` to ``out`` with ``plan`` (the merge plan record) and a card.

    Checked before a weight is read: the output directory, the plan against the model (kept counts, top-k,
    routing groups, neuron maps), the stored weights. Written atomically; nothing is left on failure."""
    check_dtype(dtype)
    out_path = check_output_dir(out, source, overwrite)
    structure, files, tensors = read_source_structure(source)
    check_mergeable(structure, groups, allow_regroup)
    keep = keep_of(groups)
    kept = len(keep[structure.layers[0].index])
    if top_k is not None:
        validate_top_k(structure, top_k, kept)
    if reproduce is None:
        reproduce = f"moekit apply {shlex.quote(describe_source(source))} moekit_plan.json --out OUT"
    if files is None or stream.needs_cast(tensors, dtype):
        return _merge_in_memory(source, groups, plan, out_path, overwrite, allow_regroup, dtype, top_k, reproduce)

    outputs = stream.plan_tensors(structure, keep, tensors, source)
    merging = [layer.index for layer in structure.layers if not all(g.is_copy for g in groups[layer.index])]
    check_disk_room(out_path, sum(t.nbytes for t in outputs) + _expert_bytes(structure, outputs, merging))
    before = summarize(structure)
    _prune_view(structure, keep, allow_regroup, top_k)
    after = summarize(structure)
    card = render_merge_card(out_path.name, describe_source(source), before, after, plan, reproduce, base=out_path)
    with writing_directory(out_path, "checkpoint") as tmp:
        scratch = tmp / SCRATCH
        scratch.mkdir()
        rewrite_expert_layers(source, merging, lambda layer: merge_layer(layer, groups[layer.index]), outputs,
                              scratch, "merged")
        write_streamed(tmp, source, structure, files, tensors, outputs, dtype, plan, card)
        for file in scratch.iterdir():
            file.unlink()
        scratch.rmdir()
    return MergeResult(out_path, before, after, plan)


def _expert_bytes(view: MoEModelView, outputs: list[Any], layers: list[int]) -> int:
    """Bytes of the output expert tensors of ``layers`` (the scratch file holds them once more while it exists),
    told by the streaming editor's own roles of the stored names."""
    names = stream.NameMap(view)
    roles = (names.role(t.name) for t in outputs)
    return sum(t.nbytes for t, role in zip(outputs, roles, strict=True)
               if role.kind in ("expert", "stacked") and role.layer is not None and role.layer.index in layers)


def _merge_in_memory(source: str | Path, groups: GroupMap, plan: dict[str, Any], out: Path, overwrite: bool,
                     allow_regroup: bool, dtype: str, top_k: int | None, reproduce: str) -> MergeResult:
    """``from_pretrained``, merge, ``save_pretrained``: for hub ids and casts (peak memory ~ twice the model)."""
    from moekit.edit.prune import set_top_k

    model = load_model(source, dtype=dtype)
    view = MoEModelView.from_model(model)
    before = summarize(view)
    merge_model(view, groups, allow_regroup)
    if top_k is not None:
        set_top_k(view, top_k)
    after = summarize(view)
    card = render_merge_card(out.name, describe_source(source), before, after, plan, reproduce, base=out)
    path = write_checkpoint(model, out, source, plan, card, overwrite=overwrite, config_aliases=config_aliases(view))
    return MergeResult(path, before, after, plan)
