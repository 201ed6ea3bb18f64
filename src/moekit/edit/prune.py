"""Remove experts from a loaded model, in place, through the one view.

Per MoE layer: every per-expert tensor of the experts module (weights, biases, FP8 scales), the
router's rows (and its bias), the selection correction bias; the modules' expert-count
attributes; then the config (every alias of the expert count).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.arch.experts import replace_tensor, set_count_attributes
from moekit.arch.view import MoELayer, MoEModelView
from moekit.edit.keep import KeepMap, validate_keep


def _slice(layer: MoELayer, name: str | None, keep: torch.Tensor, dim: int) -> None:
    if name is None:
        return
    owner_name, _, attr = name.rpartition(".")
    owner = layer.block.get_submodule(owner_name) if owner_name else layer.block
    tensor = getattr(owner, attr).detach()
    replace_tensor(owner, attr, tensor.index_select(dim, keep.to(tensor.device)))


def prune_layer(layer: MoELayer, keep: list[int]) -> None:
    """Keep only experts ``keep`` (ascending ids) in one MoE layer."""
    index = torch.tensor(keep, dtype=torch.long)
    new_count = len(keep)
    layer.layout.keep_experts(layer.experts, index)
    _slice(layer, layer.router_weight_name, index, 0)
    _slice(layer, layer.router_bias_name, index, 0)
    _slice(layer, layer.correction_bias_name, index, -1)
    for module in [layer.block, *layer.block.modules()]:
        if module is layer.experts or any(module is m for m in layer.shared.values()):
            continue
        set_count_attributes(module, new_count)
        if isinstance(module, nn.Linear) and module.weight is layer.router_weight:
            module.out_features = new_count
    layer.routing = layer.routing.with_experts(new_count)


def prune_experts(view: MoEModelView, keep: KeepMap, allow_regroup: bool = False) -> int:
    """Validate ``keep`` and apply it to ``view.model`` in place; return the new expert count."""
    kept = validate_keep(view, keep, allow_regroup=allow_regroup)
    with torch.no_grad():
        for layer in view.layers:
            prune_layer(layer, keep[layer.index])
    model = view.model
    view.config_fields.set_expert_count(model.config, kept)
    set_count_attributes(model, kept)  # e.g. MixtralForCausalLM.num_experts feeds the aux loss
    return kept
