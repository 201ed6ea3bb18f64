"""Remove experts from a loaded model, in place, through the one view.

Per MoE layer: every per-expert tensor of the experts module (weights, biases, FP8 scales), the
router's rows (and its bias), the selection correction bias; the modules' expert-count
attributes; then the config (every alias of the expert count).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moekit.arch.experts import replace_tensor, set_count_attributes
from moekit.arch.view import MoELayer, MoEModelView
from moekit.edit.keep import KeepMap, PlanError, validate_keep

TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok", "moe_k", "moe_topk")


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
    set_expert_count(view, kept)
    return kept


def set_expert_count(view: MoEModelView, count: int) -> None:
    """The model-level expert count after its layers were edited: every alias in the config and every count
    attribute of the model (e.g. MixtralForCausalLM.num_experts feeds the aux loss)."""
    view.config_fields.set_expert_count(view.model.config, count)
    set_count_attributes(view.model, count)


def validate_top_k(view: MoEModelView, top_k: int, kept: int) -> None:
    """Check a new number of experts per token against the kept experts and the routing."""
    spec = view.layers[0].routing
    if spec.kind == "sparsemixer":
        raise PlanError("PhiMoE's sparsemixer routing is hard-wired to two experts per token; --top-k cannot "
                        "change it")
    if not 1 <= top_k <= kept:
        raise PlanError(f"--top-k {top_k} must be between 1 and the {kept} experts kept per layer")
    if top_k > spec.top_k:
        raise PlanError(f"--top-k {top_k} is above the model's {spec.top_k} experts per token; moekit only lowers "
                        "it (raising it changes the model more than pruning does)")
    if spec.group_limited:
        per_group = kept // spec.n_group
        if spec.topk_group * per_group < top_k:
            raise PlanError(f"group-limited routing picks {spec.topk_group} groups of {per_group} experts, fewer "
                            f"than --top-k {top_k}")


def set_top_k(view: MoEModelView, top_k: int) -> None:
    """Route every token to ``top_k`` experts: config fields and every module attribute that holds top-k."""
    old = view.top_k
    for layer in view.layers:
        for module in [layer.block, *layer.block.modules()]:
            if module is layer.experts or any(module is m for m in layer.shared.values()):
                continue
            for attr in TOP_K_ATTRIBUTES:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value == old:
                    setattr(module, attr, top_k)
        layer.routing = replace(layer.routing, top_k=top_k)
    view.config_fields.set_top_k(view.model.config, top_k)
