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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moekit.arch.view import MoELayer
from moekit.edit.keep import PlanError
from moekit.edit.safetensors_io import Piece, read_header


def rewrite_expert_layers(source: str | Path, layers: list[int], edit: Callable[[MoELayer], None],
                          outputs: list[Any], scratch: Path, what: str, reshape: bool = False) -> None:
    """For each MoE layer in ``layers``: read it, ``edit`` it, write its experts' tensors (stored names and layout)
    to ``scratch``, and point the matching ``outputs`` at their bytes there. ``reshape``: the edit changes the
    tensors' shapes (else a shape or dtype that differs from the output's is refused). ``what``: the edit, for
    errors (e.g. "merged")."""
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
