"""Routing masks: a stock checkpoint in which chosen experts are never selected (MASCing-style configuration,
GateBreaker-style ablation for audits), and in-process masks and boosts for experiments.

Written exactly where the family's routing has a selection bias, by setting the masked experts' entries to -inf:

- a correction bias (DeepSeek-V3, GLM-4-MoE, ...: added to the scores for the top-k choice only): a masked expert
  is never chosen, and the chosen experts' weights are computed from the unbiased scores as before;
- a router bias added to the logits (GPT-OSS): the masked expert's logit is -inf, so it is never among the top-k
  (and has probability 0 where the softmax runs over every expert).

Both equal the view's masked routing, ``MoELayer.route(hidden, available)``, which moekit's analyses use (tested),
where the family scores each expert on its own (sigmoid) or selects on the biased logits. Where a softmax over every
expert comes before a biased choice (ERNIE-4.5: probabilities + correction bias), the masked expert is never chosen
but the others are chosen from probabilities normalised over every expert, as the model computes them, not over the
rest as removal would (``equals_removal`` false in the plan and said in the card).
A family with neither tensor cannot express a mask in a stock config: ``moekit mask --allow-remove`` removes the
experts instead (a pruning plan; its card says it is a prune), otherwise it is refused.

    masked = {3: [17, 40], 5: [2]}          # MoE layer -> experts never selected
    plan = make_mask_plan(view, masked, source, why="named by the user")
    mask_to_checkpoint(source, plan, out)   # streamed one decoder layer at a time

In memory, ``MoELayer.route(hidden, available)`` is the masked routing for analyses, and ``routing_bias(view,
{layer: bias[E]})`` adds to a loaded model's selection bias while a context lasts (-inf masks an expert, a
positive value boosts it), restoring it on exit: for experiments such as steering, on the same families. Families
without a selection bias have no in-process override yet (their routers select inside their own forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moekit.arch.view import MoELayer, MoEModelView
from moekit.edit.card import MASK_PLAN_FORMAT, card_tail, plan_envelope, shown_path, versions
from moekit.edit.keep import PlanError

MaskMap = dict[int, list[int]]  # MoE layer -> experts never selected
# routing kinds in which a -inf selection bias gives exactly the routing of the model without those experts
EQUALS_REMOVAL = frozenset({"sigmoid_topk", "topk_softmax", "softmax_topk", "topk_sigmoid"})


def mask_mechanism(view: MoEModelView) -> str | None:
    """How a stock checkpoint of ``view``'s family can express a routing mask: "correction_bias", "router_bias", or
    None (only by removing the experts)."""
    layer = view.layers[0]
    if layer.correction_bias_name is not None:
        return "correction_bias"
    if layer.router_bias_name is not None:
        return "router_bias"
    return None


def parse_mask(text: str | None) -> MaskMap:
    """``"3:17,3:40,5:2"`` -> {3: [17, 40], 5: [2]}."""
    from moekit.plan import parse_protect

    masked: MaskMap = {}
    try:
        pairs = parse_protect(text)
    except PlanError:
        raise PlanError(f"--experts {text!r}: expected LAYER:EXPERT pairs separated by commas, e.g. 3:17,5:2") from None
    for layer, expert in pairs:
        masked.setdefault(layer, []).append(expert)
    return masked


def check_mask(view: MoEModelView, masked: MaskMap) -> None:
    """Every entry names an expert of an MoE layer, and every layer keeps at least top-k experts selectable."""
    layers = {layer.index: layer for layer in view.layers}
    if not masked or not any(masked.values()):
        raise PlanError("a mask must name at least one expert (--experts LAYER:EXPERT,... or --from-contrast)")
    for index, experts in masked.items():
        if index not in layers:
            raise PlanError(f"layer {index} is not an MoE layer of this model (MoE layers: {sorted(layers)})")
        layer = layers[index]
        bad = [e for e in experts if not 0 <= e < layer.num_experts]
        if bad:
            raise PlanError(f"layer {index}: experts {bad} are out of range (0..{layer.num_experts - 1})")
        if layer.num_experts - len(set(experts)) < layer.top_k:
            raise PlanError(f"layer {index}: masking {len(set(experts))} of {layer.num_experts} experts leaves fewer "
                            f"than the {layer.top_k} each token needs")


def selection_bias_name(layer: MoELayer) -> str | None:
    """The name (relative to the MoE block) of the tensor a mask writes to: the correction bias, else the router
    bias; None without either."""
    return layer.correction_bias_name or layer.router_bias_name


def mask_bias(layer: MoELayer) -> torch.Tensor:
    """The tensor a mask writes to (``selection_bias_name``)."""
    bias = layer._tensor(selection_bias_name(layer))
    if bias is None:
        raise PlanError(f"{layer.path}: no selection bias to express a mask")
    return bias


def mask_layer(layer: MoELayer, experts: list[int]) -> None:
    """Set the selection bias of ``experts`` of ``layer`` to -inf, in place."""
    bias = mask_bias(layer)
    with torch.no_grad():
        bias.view(-1)[torch.tensor(sorted(set(experts)), dtype=torch.long, device=bias.device)] = float("-inf")


def make_mask_plan(view: MoEModelView, masked: MaskMap, source: str, why: str) -> dict[str, Any]:
    """The mask record (``moekit_plan.json``, format ``MASK_PLAN_FORMAT``): every expert is kept; each layer lists
    its masked experts. ``why``: how they were chosen, for the card."""
    from moekit.summary import summarize

    check_mask(view, masked)
    mechanism = mask_mechanism(view)
    if mechanism is None:
        raise PlanError(f"{view.model_type} has no selection bias (correction bias or router bias) in which a stock "
                        "config can hold a mask; give --allow-remove to remove the experts instead (a prune)")
    layers = {str(layer.index): {"kept": list(range(layer.num_experts)), "removed": [],
                                 "masked": sorted(set(masked.get(layer.index, [])))} for layer in view.layers}
    first = view.layers[0]
    details = {"mechanism": mechanism, "bias": selection_bias_name(first), "value": "-inf", "chosen": why,
               "equals_removal": first.routing.kind in EQUALS_REMOVAL}
    return plan_envelope(MASK_PLAN_FORMAT, source, summarize(view), view.num_experts, "routing-mask", details, None,
                         layers)


def make_mask_removal_plan(view: MoEModelView, masked: MaskMap, source: str, why: str) -> dict[str, Any]:
    """For a family without a selection bias (``moekit mask --allow-remove``): a pruning plan that removes the masked
    experts instead (the same number in every MoE layer, as stock configs need); its card says it is a prune."""
    from moekit.edit.card import prune_plan_record
    from moekit.summary import summarize

    check_mask(view, masked)
    counts = {len(set(masked.get(layer.index, []))) for layer in view.layers}
    if len(counts) != 1:
        raise PlanError(f"--allow-remove removes the masked experts, and stock configs hold one expert count: mask "
                        f"the same number in every MoE layer (now {sorted(counts)})")
    keep = {layer.index: [e for e in range(layer.num_experts) if e not in set(masked.get(layer.index, []))]
            for layer in view.layers}
    return prune_plan_record(source, summarize(view), keep, "routing-mask-removed",
                             {"chosen": why, "removed": "the family has no selection bias to hold a mask, so the "
                              "masked experts were removed (moekit mask --allow-remove)"})


def plan_mask_map(plan: dict[str, Any], view: MoEModelView, origin: str = "plan") -> MaskMap:
    """A mask plan's masked experts, checked against ``view``."""
    masked: MaskMap = {}
    for key, entry in plan["layers"].items():
        experts = entry.get("masked")
        if not isinstance(experts, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in experts):
            raise PlanError(f"{origin}: layer {key} 'masked' must be a list of expert ids")
        if experts:
            masked[int(key)] = experts
    check_mask(view, masked)
    if mask_mechanism(view) is None:
        raise PlanError(f"{origin}: {view.model_type} has no selection bias to hold a mask")
    return masked


def render_mask_card(name: str, source: str, before: Any, after: Any, plan: dict[str, Any], reproduce: str,
                     base: Path | None = None) -> str:
    """The checkpoint's README.md after masking."""
    reproduce = reproduce.replace(source, shown_path(source, base))
    source = shown_path(source, base)
    v = versions()
    details = plan["details"]
    masked = {int(k): e["masked"] for k, e in plan["layers"].items() if e["masked"]}
    listed = "; ".join(f"layer {k}: {', '.join(map(str, v))}" for k, v in sorted(masked.items()))
    same = ("The other experts are routed exactly as in the source without the masked ones." if
            details.get("equals_removal") else "The other experts are chosen from router probabilities normalised over "
            "every expert, as the model computes them (removing the masked experts would renormalise over the rest).")
    how = ("its correction bias (added to the scores for the top-k choice only)" if details["mechanism"] ==
           "correction_bias" else "its router bias (added to the logits)")
    return f"""---
library_name: transformers
tags:
- moekit
- mixture-of-experts
- routing-mask
---

# {name}

Routing-masked from `{source}` ({before.model_type}, {before.architecture}) with moekit {v['moekit']}:
**{sum(len(v) for v in masked.values())} experts are never selected** ({listed}; {details['chosen']}). Each masked
expert's entry in {how} is set to -inf, so the router never chooses it; every weight is the source's. {same}
The experts are still stored (the checkpoint is as large as the source); remove
them with `moekit prune` to save memory. No weights were retrained.

{card_tail(before, after, reproduce)}"""


def mask_to_checkpoint(source: str | Path, plan: dict[str, Any], out: str | Path, overwrite: bool = False,
                       dtype: str = "auto", reproduce: str | None = None) -> Any:
    """Write ``source`` with ``plan``'s masks to ``out`` (streamed one decoder layer at a time from a local
    safetensors checkpoint: each MoE layer's router is rewritten with the masked bias, every other tensor's bytes
    copied), with the plan and a card; checked before a weight is read, written atomically."""
    from moekit.edit.rewrite import ExpertEdit, expert_edit_to_checkpoint

    def prepare(structure: MoEModelView) -> ExpertEdit:
        masked = plan_mask_map(plan, structure)

        def edit(layer: MoELayer) -> None:
            if layer.index in masked:
                mask_layer(layer, masked[layer.index])

        def modules(layer: MoELayer) -> dict[str, Any]:  # the module holding the bias, written back
            owner = (selection_bias_name(layer) or "").rpartition(".")[0]
            path = f"{layer.path}.{owner}" if owner else layer.path
            return {path: layer.block.get_submodule(owner) if owner else layer.block}
        return ExpertEdit(edit, modules=modules)

    def card(name: str, described: str, before: Any, after: Any, base: Path, command: str) -> str:
        return render_mask_card(name, described, before, after, plan, command, base)

    return expert_edit_to_checkpoint(source, plan, out, prepare, card, "masked", overwrite=overwrite, dtype=dtype,
                                     reproduce=reproduce)


@contextmanager
def routing_bias(view: MoEModelView, biases: dict[int, torch.Tensor]) -> Iterator[None]:
    """Add ``biases[layer]`` (``[E]``) to those MoE layers' selection bias (``mask_bias``: the correction bias, else
    the router's logit bias) while the context lasts, in place on the loaded model, and restore the original values
    on exit (also after an error). -inf masks an expert (exactly ``moekit mask``'s checkpoint); a positive value makes
    the router choose it more (through the correction bias: the choice only, not the weights; through a logit bias:
    both)."""
    layers = {layer.index: layer for layer in view.layers}
    if mask_mechanism(view) is None:
        raise PlanError(f"{view.model_type} has no selection bias to add to; in-process routing overrides work on "
                        "families with a correction bias or a router logit bias")
    saved = []
    try:
        for index, bias in biases.items():
            if index not in layers:
                raise PlanError(f"layer {index} is not an MoE layer of this model (MoE layers: {sorted(layers)})")
            target = mask_bias(layers[index])
            if bias.numel() != target.numel():
                raise PlanError(f"layer {index}: a routing bias has {target.numel()} entries, got {bias.numel()}")
            saved.append((target, target.detach().clone()))
            with torch.no_grad():
                target.add_(bias.to(target.device, target.dtype).reshape(target.shape))
        yield
    finally:
        with torch.no_grad():
            for target, original in saved:
                target.copy_(original)


@contextmanager
def routing_override(view: MoEModelView, biases: dict[int, torch.Tensor]) -> Iterator[None]:
    """Add ``biases[layer]`` (``[E]``) to those MoE layers' router *logits* while the context lasts, on every family
    moekit reads, whether or not it has a selection bias: in-process masks (``-inf``) and boosts for experiments.

    transformers 5's routers choose their experts inside their own forward, so a hook on their output cannot change
    the choice. Instead the router's forward (or the block's ``route_tokens_to_experts``) is replaced, on this loaded
    model only, by moekit's routing maths for the family (``moekit.arch.routing``, tested against every family's own
    router) applied to ``logits + bias``; the original is restored on exit, also after an error. The logits handed
    on for auxiliary losses are the unbiased ones. What the bias does is the family's maths on shifted logits: with a
    softmax router (Mixtral, Qwen3-MoE, OLMoE, ...) it changes the choice and the gate weights; ``-inf`` takes an
    expert out of the choice, which equals removing it from the model for every kind in ``EQUALS_REMOVAL`` (tested
    against pruned models); with sigmoid scores (DeepSeek-V3, ...) the shift enters the gate weights too
    (``routing_bias`` shifts only the choice, through the correction bias). A profile collected inside the context
    counts the overridden choices and gate weights, while its router-probability statistics (``router_mass``,
    entropy) are of the unbiased logits."""
    layers = {layer.index: layer for layer in view.layers}
    patched: list[tuple[Any, str, Any]] = []
    try:
        for index, bias in biases.items():
            if index not in layers:
                raise PlanError(f"layer {index} is not an MoE layer of this model (MoE layers: {sorted(layers)})")
            layer = layers[index]
            if bias.numel() != layer.num_experts:
                raise PlanError(f"layer {index}: a routing bias has {layer.num_experts} entries, got {bias.numel()}")
            owner, name, replacement = _biased_router(layer, bias.reshape(-1))
            patched.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, previous in reversed(patched):
            if previous is None:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)


def _biased_router(layer: MoELayer, bias: torch.Tensor) -> tuple[Any, str, Any]:
    """(object, attribute, function) that routes ``layer`` on logits + ``bias`` in the family's call convention."""
    call = layer.call

    def choose(logits: torch.Tensor, hidden_dtype: torch.dtype | None) -> Any:
        return layer.route_logits(logits + bias.to(logits.device, logits.dtype), hidden_dtype=hidden_dtype)

    if call.kind == "llama4":  # router(hidden) -> (scores [T, E]: sigmoid of the chosen logits, 0 elsewhere; logits)
        def scores_forward(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = layer.router_logits(hidden)
            chosen = choose(logits, hidden.dtype)
            scores = torch.zeros_like(logits).scatter_(1, chosen.index, chosen.weights.to(logits.dtype))
            return scores, logits
        return layer.router, "forward", scores_forward

    def routed(logits: torch.Tensor, hidden_dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        chosen = choose(logits, hidden_dtype)
        values = {"logits": logits, "index": chosen.index, "weights": chosen.weights}
        return tuple(values[name] for name in call.order)

    if call.kind == "block_routes":  # router(hidden) gives the logits, then block.route_tokens_to_experts chooses
        def route_tokens_to_experts(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return routed(args[-1], args[0].dtype if call.takes_hidden else None)
        return layer.block, "route_tokens_to_experts", route_tokens_to_experts

    def forward(hidden: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, ...]:
        return routed(layer.router_logits(hidden), hidden.dtype)
    return layer.router, "forward", forward


__all__ = ["MaskMap", "check_mask", "make_mask_plan", "make_mask_removal_plan", "mask_layer", "mask_mechanism",
           "mask_to_checkpoint", "parse_mask", "plan_mask_map", "render_mask_card", "routing_bias", "routing_override",
           "selection_bias_name"]
