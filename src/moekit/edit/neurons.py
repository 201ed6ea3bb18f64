"""Removing neurons inside the routed experts, so that the checkpoint really shrinks.

A neuron n of expert j (CAMERA's micro-expert, HEAPr's atomic expert) is row n of its gate and up projections
(and their biases) and column n of its down projection. Removing it is exactly the expert with that neuron's
activation set to 0: the down projection never sees it again. Stock configs hold one expert width
(``moe_intermediate_size`` or the family's key, found by ``ConfigFields``), so every routed expert of every
MoE layer keeps the same number I' of its neurons (which ones: per expert); the config's width becomes I'.

    keep = {layer: torch.tensor([[0, 2, 5, ...], ...])}  # [E, I'] per MoE layer, ascending per expert
    prune_neurons(view, keep)

Refused: different widths per layer or expert, repeated or out-of-range neurons, quantized experts (their
block scales span neurons), and families in which another tensor's shape follows the same config key (the
shared experts of DeepSeek-V2/V3 and GLM-4-MoE are ``moe_intermediate_size x n_shared_experts`` wide; Llama-4's
shared expert and dense layers read ``intermediate_size`` too): stock ``from_pretrained`` would build those
with the new width, so their neurons would have to be chosen as well, which moekit does not do yet. That is
found structurally, by building the model with the new width on the meta device and comparing every other
tensor's shape.
"""

from __future__ import annotations

import copy

import torch

from moekit.arch.view import MoEModelView, _set, config_value
from moekit.edit.keep import PlanError

NeuronKeep = dict[int, torch.Tensor]  # MoE layer -> long [E, I'] kept neurons of each expert, ascending


def width_key(view: MoEModelView) -> str:
    """The config key that holds the routed experts' width."""
    keys = view.config_fields.intermediate_size
    if not keys:
        raise PlanError(f"{view.model_type}: no config key holds the experts' width "
                        f"({view.layers[0].intermediate_size}); neurons cannot be removed in a stock-loadable way")
    return keys[0]


def check_neuron_keep(view: MoEModelView, keep: NeuronKeep) -> int:
    """The experts' new width if ``keep`` is a valid neuron selection for ``view`` (else a PlanError)."""
    layers = {layer.index: layer for layer in view.layers}
    if set(keep) != set(layers):
        missing, extra = sorted(set(layers) - set(keep)), sorted(set(keep) - set(layers))
        raise PlanError(f"a neuron selection must name every MoE layer once (missing {missing}, not MoE "
                        f"layers {extra})")
    widths = set()
    for index, layer in layers.items():
        kept = keep[index]
        width = layer.intermediate_size
        if kept.dim() != 2 or kept.shape[0] != layer.num_experts:
            raise PlanError(f"layer {index}: kept neurons must be [experts={layer.num_experts}, width], got "
                            f"{list(kept.shape)}")
        if kept.dtype not in (torch.int64, torch.int32):
            raise PlanError(f"layer {index}: kept neurons must be integers")
        if kept.shape[1] < 1:
            raise PlanError(f"layer {index}: every expert must keep at least one neuron")
        if bool((kept < 0).any()) or bool((kept >= width).any()):
            raise PlanError(f"layer {index}: neuron indices must be in 0..{width - 1}")
        if kept.shape[1] > 1 and not bool((kept[:, 1:] > kept[:, :-1]).all()):
            raise PlanError(f"layer {index}: each expert's kept neurons must be distinct and ascending")
        widths.add(int(kept.shape[1]))
    if len(widths) != 1:
        raise PlanError(f"stock configs hold one expert width; the selection keeps {sorted(widths)} neurons in "
                        "different layers (keep the same number everywhere)")
    return widths.pop()


def tensors_following_width(view: MoEModelView, width: int) -> list[str]:
    """Tensors outside the routed experts whose shape would change if the config's expert width became
    ``width`` (the model built on the meta device from the edited config, every shape compared)."""
    from transformers import AutoModelForCausalLM

    key = width_key(view)
    config = copy.deepcopy(view.model.config)
    _set(config, key, width)
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(config)
    experts = tuple(f"{layer.path}.{layer.experts_name}." for layer in view.layers)
    now = dict(view.model.named_parameters())
    changed = []
    for name, tensor in rebuilt.named_parameters():
        if name.startswith(experts):
            continue
        if name in now and tuple(now[name].shape) != tuple(tensor.shape):
            changed.append(name)
    return changed


def check_neuron_removal(view: MoEModelView, keep: NeuronKeep) -> int:
    """Everything checkable before a weight changes: the selection, and that no other tensor follows the width."""
    width = check_neuron_keep(view, keep)
    changed = tensors_following_width(view, width)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise PlanError(f"{view.model_type}: {width_key(view)} also sizes {shown} (shared experts or dense layers "
                        f"whose width follows the routed experts'); removing routed-expert neurons would change "
                        "them on reload, and moekit does not select their neurons yet")
    return width


def prune_neurons(view: MoEModelView, keep: NeuronKeep) -> int:
    """Remove every routed expert's neurons not in ``keep`` from the loaded model, in place, the config's width
    included; the new width."""
    width = check_neuron_removal(view, keep)
    before = view.layers[0].intermediate_size
    with torch.no_grad():
        for layer in view.layers:
            layer.layout.keep_neurons(layer.experts, keep[layer.index])
    key = width_key(view)
    if config_value(view.model.config, key) == before:
        _set(view.model.config, key, width)
    return width


__all__ = ["NeuronKeep", "check_neuron_keep", "check_neuron_removal", "prune_neurons", "tensors_following_width",
           "width_key"]
