"""Rewriting the routed experts of a streamed checkpoint one decoder layer at a time.

Used by the edits that change expert weights (merging) or shapes (neuron removal) while the streaming editor
(``moekit.edit.stream``) copies every other tensor's bytes: each MoE layer named is read from the shards
(``moekit.layerwise.LayerwiseModel``, one decoder layer in memory), edited in place by a function of its
``MoELayer``, turned back into the stored names and layout by transformers' own ``revert_weight_conversion``
(what ``save_pretrained`` does), and written to a scratch safetensors file; the output tensors with those names
are pointed at the scratch bytes (and take their shapes when the edit changes shapes). The caller deletes the
scratch directory once the shards are written.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.arch.view import MoELayer, MoEModelView
from moekit.edit.keep import PlanError
from moekit.edit.safetensors_io import Piece, read_header


def rewrite_expert_layers(source: str | Path, layers: list[int], edit: Callable[[MoELayer], None],
                          outputs: list[Any], scratch: Path, what: str, reshape: bool = False,
                          modules: Callable[[MoELayer], dict[str, Any]] | None = None) -> None:
    """For each MoE layer in ``layers``: read it, ``edit`` it, write its experts' tensors (stored names and layout)
    and those of ``modules(layer)`` (other modules the edit changed, by path) to ``scratch``, and point the matching
    ``outputs`` at their bytes there. ``reshape``: the edit changes the tensors' shapes (else a shape or dtype that
    differs from the output's is refused). ``what``: the edit, for errors (e.g. "merged")."""
    from safetensors.torch import save_file

    from moekit.layerwise import LayerwiseModel

    by_name = {t.name: t for t in outputs}
    if not layers:
        return
    with LayerwiseModel(source, device="cpu", read_ahead=False) as run:
        loaded = {layer.index: layer for layer in run.view.layers}
        for index in layers:
            with run.loaded(index):
                layer = loaded[index]
                with torch.no_grad():
                    edit(layer)
                prefix = f"{layer.path}.{layer.experts_name}."
                state = {prefix + k: v.detach().contiguous() for k, v in layer.experts.state_dict().items()}
                for path, module in (modules(layer) if modules is not None else {}).items():
                    state.update({f"{path}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()})
                stored = stored_form(run.model, state, by_name, index, what)
                path = scratch / f"layer-{index}.safetensors"
                save_file(stored, str(path))
                del state, stored
            for info in read_header(path):
                target = by_name[info.name]
                if target.dtype != info.dtype or (not reshape and tuple(target.shape) != tuple(info.shape)):
                    raise PlanError(f"{what} tensor {info.name} is {info.dtype} {list(info.shape)} but the "
                                    f"checkpoint's is {target.dtype} {list(target.shape)}")
                target.shape = tuple(info.shape)
                target.pieces = [Piece(info.path, info.begin, info.nbytes)]


def stored_form(model: Any, state: dict[str, torch.Tensor], by_name: dict[str, Any], index: int,
                what: str) -> dict[str, torch.Tensor]:
    """``state`` (in-memory names) as the checkpoint stores it: transformers' reverse conversion when the
    checkpoint uses the original layout (per-expert tensors, old module names), else as it is."""
    from transformers.core_model_loading import revert_weight_conversion

    for candidate in (revert_weight_conversion(model, dict(state)), state):
        if candidate and all(name in by_name for name in candidate):
            return {k: v.contiguous() for k, v in candidate.items()}
    raise PlanError(f"MoE layer {index}: moekit cannot tell how the checkpoint stores the {what} experts' tensors "
                    f"(e.g. {next(iter(state))}); write it through the in-memory path (--dtype)")


@dataclass
class ExpertEdit:
    """An edit of the kept experts' weights, given the model structure after a plan's expert pruning.

    ``layer``: edits one MoE layer in place (its experts already pruned by the plan). ``reshape``: for edits that
    change shapes and the config (neuron removal), the edit of a whole model at once (a loaded model's weights, or
    the meta structure's shapes and config in a streamed write); None: ``layer`` runs on every layer."""

    layer: Callable[[MoELayer], None]
    reshape: Callable[[MoEModelView], None] | None = None
    # the layer's modules besides its experts that ``layer`` edits (path relative to the model -> module), written
    # back too (neuron removal's shared experts)
    modules: Callable[[MoELayer], dict[str, Any]] | None = None


def expert_edit_to_checkpoint(source: str | Path, plan: dict[str, Any], out: str | Path,
                              prepare: Callable[[MoEModelView], ExpertEdit],
                              render_card: Callable[[str, str, Any, Any, Path, str], str], what: str, *,
                              overwrite: bool = False, dtype: str = "auto", reproduce: str | None = None) -> Any:
    """Write ``source`` with ``plan``'s experts removed (if it removes any) and the kept experts' weights edited by
    ``prepare(structure)`` (the structure after the expert pruning; it checks the plan before a weight is read) to
    ``out``, with the plan and the card ``render_card(name, source, before, after, out, reproduce)`` (rendered after
    the edit, so it can report what the edit measured). A local safetensors checkpoint is streamed: each MoE layer
    is read one decoder layer at a time, edited and written back in the stored layout; every other tensor's bytes
    are copied. Hub ids and dtype casts go in memory. Written atomically."""
    from moekit.edit import PruneResult, _prune_view, config_aliases, read_source_structure, stream, write_streamed
    from moekit.edit.checkpoint import check_output_dir, write_checkpoint
    from moekit.edit.keep import plan_record_keep, validate_keep
    from moekit.edit.prune import prune_layer
    from moekit.model_io import check_dtype, describe_source, load_model
    from moekit.needs import check_disk_room
    from moekit.outputs import writing_directory
    from moekit.summary import summarize

    check_dtype(dtype)
    out_path = check_output_dir(out, source, overwrite)
    structure, files, tensors = read_source_structure(source)
    details = plan.get("details") or {}
    expert_keep = plan_record_keep(plan)
    allow_regroup = bool(details.get("allow_regroup", False))
    top_k = (plan.get("top_k") or {}).get("after")
    top_k = top_k if top_k != structure.top_k else None
    removes = any(len(kept) != structure.num_experts for kept in expert_keep.values())
    if removes:
        validate_keep(structure, expert_keep, allow_regroup=allow_regroup)
    before = summarize(structure)
    outputs = stream.plan_tensors(structure, expert_keep, tensors, source) if files is not None else None
    if removes:  # the structure after the expert pruning: what the edit is checked against
        _prune_view(structure, expert_keep, allow_regroup, top_k)
    edit = prepare(structure)

    def edit_layer(layer: Any) -> None:  # a source layer: its experts pruned first, then edited
        if removes:
            prune_layer(layer, expert_keep[layer.index])
        edit.layer(layer)

    described = describe_source(source)
    if reproduce is None:
        reproduce = f"moekit apply {shlex.quote(described)} moekit_plan.json --out OUT"
    if files is None or stream.needs_cast(tensors, dtype):
        model = load_model(source, dtype=dtype)
        view = MoEModelView.from_model(model)
        if removes:
            _prune_view(view, expert_keep, allow_regroup, top_k)
        with torch.no_grad():
            if edit.reshape is not None:
                edit.reshape(view)
            else:
                for layer in view.layers:
                    edit.layer(layer)
        after = summarize(view)
        card = render_card(out_path.name, described, before, after, out_path, reproduce)
        path = write_checkpoint(model, out_path, source, plan, card, overwrite=overwrite,
                                config_aliases=config_aliases(view))
        return PruneResult(path, before, after, plan)
    assert outputs is not None
    check_disk_room(out_path, 2 * sum(t.nbytes for t in outputs))  # the shards, plus the scratch expert copies
    if edit.reshape is not None:
        edit.reshape(structure)
    after = summarize(structure)
    with writing_directory(out_path, "checkpoint") as tmp:
        scratch = tmp / ".moekit-edited-experts"
        scratch.mkdir()
        rewrite_expert_layers(source, [layer.index for layer in structure.layers], edit_layer, outputs, scratch,
                              what, reshape=edit.reshape is not None, modules=edit.modules)
        card = render_card(out_path.name, described, before, after, out_path, reproduce)
        write_streamed(tmp, source, structure, files, tensors, outputs, dtype, plan, card)
        for file in scratch.iterdir():
            file.unlink()
        scratch.rmdir()
    return PruneResult(out_path, before, after, plan)
