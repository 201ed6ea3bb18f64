"""Removing neurons inside the routed experts, so that the checkpoint really shrinks.

A neuron n of expert j (CAMERA's micro-expert, HEAPr's atomic expert) is row n of its gate and up projections
(and their biases) and column n of its down projection. Removing it is exactly the expert with that neuron's
activation set to 0: the down projection never sees it again. Stock configs hold one expert width
(``moe_intermediate_size`` or the family's key, found by ``ConfigFields``), so every routed expert of every
MoE layer keeps the same number I' of its neurons (which ones: per expert); the config's width becomes I'.

    keep = {layer: torch.tensor([[0, 2, 5, ...], ...])}  # [E, I'] per MoE layer, ascending per expert
    prune_neurons(view, keep)

Where the family's shared experts take their width from the same key (DeepSeek-V2/V3, GLM-4-MoE, ERNIE-4.5,
EXAONE-MoE: ``moe_intermediate_size x n_shared_experts``; HunYuan-MoE and Llama-4: ``intermediate_size``), stock
``from_pretrained`` builds them with the new width too, so their neurons are selected as well (``shared``: the
kept neurons of each layer's shared MLP, as many as the new config gives it) and removed the same way. Which
tensors follow the width is found structurally, by building the model with the new width on the meta device and
comparing every other tensor's shape.

Refused: different widths per layer or expert, repeated or out-of-range neurons, quantized experts (their
block scales span neurons), and any other tensor that follows the width (Jamba's dense MLPs read
``intermediate_size``): moekit does not choose dense layers' neurons.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from moekit.arch.view import MoEModelView, _set, config_value
from moekit.edit.card import NEURON_PLAN_FORMAT, card_tail, plan_envelope, shown_path, versions
from moekit.edit.keep import PlanError

NeuronKeep = dict[int, torch.Tensor]  # MoE layer -> long [E, I'] kept neurons of each expert, ascending


def width_key(view: MoEModelView) -> str:
    """The config key that holds the routed experts' width."""
    keys = view.config_fields.intermediate_size
    if not keys:
        raise PlanError(f"{view.model_type}: no config key holds the experts' width "
                        f"({view.layers[0].intermediate_size}); neurons cannot be removed in a stock-loadable way")
    return keys[0]


# Config keys that size the shared experts by a width of their own (Qwen2-MoE, Qwen3-Next, GraniteMoE-Shared, ...).
SHARED_WIDTH_KEYS = ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
                     "shared_intermediate_size")


def shared_width_key(view: MoEModelView) -> str | None:
    """The config key holding the shared experts' width where the family sizes them by a key of their own (None
    without shared experts, or where their width follows the routed experts')."""
    width = {layer.shared_width for layer in view.layers} - {0}
    if len(width) != 1:
        return None
    value = width.pop()
    return next((key for key in SHARED_WIDTH_KEYS if config_value(view.model.config, key) == value), None)


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


def tensors_following_width(view: MoEModelView, width: int,
                            shared_width: int | None = None) -> dict[str, tuple[int, ...]]:
    """Tensors outside the routed experts whose shape would change if the config's expert width became
    ``width`` (and, with ``shared_width``, the shared experts' own width key that: ``shared_width_key``), the model
    built on the meta device from the edited config, every shape compared: name -> new shape."""
    from transformers import AutoModelForCausalLM

    key = width_key(view)
    config = copy.deepcopy(view.model.config)
    _set(config, key, width)
    if shared_width is not None:
        shared_key = shared_width_key(view)
        if shared_key is None:
            raise PlanError(f"--shared: {view.model_type} has no shared experts with a width key of their own")
        _set(config, shared_key, shared_width)
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(config)
    experts = tuple(f"{layer.path}.{layer.experts_name}." for layer in view.layers)
    now = dict(view.model.named_parameters())
    changed = {}
    for name, tensor in rebuilt.named_parameters():
        if name.startswith(experts):
            continue
        if name in now and tuple(now[name].shape) != tuple(tensor.shape):
            changed[name] = tuple(tensor.shape)
    return changed


SharedKeep = dict[int, torch.Tensor]  # MoE layer -> long [J'] kept neurons of its shared-expert MLP, ascending


def following_shared_widths(view: MoEModelView, width: int, shared_width: int | None = None) -> dict[int, int]:
    """MoE layer -> the width its shared-expert MLP gets from a config whose expert width is ``width`` (and whose
    shared experts' own width key is ``shared_width``, when given), for the layers whose shared MLP changes width.
    Refused (PlanError): any other tensor that follows the width."""
    shared = {layer.shared_mlp[0] + ".": layer for layer in view.layers if layer.shared_mlp is not None}
    changed = tensors_following_width(view, width, shared_width)
    widths: dict[int, int] = {}
    others = []
    for name in changed:
        owner = next((prefix for prefix in shared if name.startswith(prefix)), None)
        if owner is None:
            others.append(name)
            continue
        widths[shared[owner].index] = int(changed.get(f"{owner}down_proj.weight", (0, 0))[1])
    for owner, layer in shared.items():  # the three projections change together, to one new width
        if layer.index not in widths:
            continue
        new_width, hidden = widths[layer.index], int(layer.router_weight.shape[-1])
        expected = {f"{owner}gate_proj.weight": (new_width, hidden), f"{owner}up_proj.weight": (new_width, hidden),
                    f"{owner}down_proj.weight": (hidden, new_width)}
        got = {name: shape for name, shape in changed.items() if name.startswith(owner)}
        if new_width < 1 or {k: tuple(v) for k, v in got.items() if k.endswith(".weight")} != expected:
            others.extend(got)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise PlanError(f"{view.model_type}: {width_key(view)} also sizes {shown} (dense layers whose width follows "
                        "the routed experts'); removing routed-expert neurons would change them on reload, and "
                        "moekit does not select dense layers' neurons")
    return widths


def check_neuron_removal(view: MoEModelView, keep: NeuronKeep, shared: SharedKeep | None = None,
                         shared_width: int | None = None) -> int:
    """Everything checkable before a weight changes: the selection, and that the shared experts whose width follows
    the experts' (and only those; with ``shared_width``, also those the family sizes by a key of their own, made
    that wide) get a selection of exactly the width the new config gives them; the new width."""
    width = check_neuron_keep(view, keep)
    follows = following_shared_widths(view, width, shared_width)
    shared = shared or {}
    layers = {layer.index: layer for layer in view.layers}
    if set(shared) != set(follows):
        if not shared:
            shown = ", ".join(layers[i].shared_mlp[0] for i in sorted(follows)[:3])  # type: ignore[index]
            raise PlanError(f"{view.model_type}: {width_key(view)} also sizes the shared experts ({shown}): removing "
                            "routed-expert neurons changes their width too, so their neurons must be selected as well "
                            "(moekit prune --neurons does, by the same criterion)")
        raise PlanError(f"shared-expert neurons are selected for layers {sorted(shared)}, but the shared experts "
                        f"whose width follows the experts' are those of layers {sorted(follows)}")
    for index, new_width in follows.items():
        kept, old = shared[index], layers[index].shared_width
        if kept.dim() != 1 or kept.dtype not in (torch.int64, torch.int32) or kept.numel() != new_width:
            raise PlanError(f"layer {index}: the shared experts keep {new_width} of their {old} neurons with this "
                            f"width; the selection must be that many neuron indices, got {list(kept.shape)}")
        if bool((kept < 0).any()) or bool((kept >= old).any()) or \
                (kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all())):
            raise PlanError(f"layer {index}: the shared experts' kept neurons must be distinct, ascending and in "
                            f"0..{old - 1}")
    return width


def prune_neurons(view: MoEModelView, keep: NeuronKeep, shared: SharedKeep | None = None,
                  shared_width: int | None = None) -> int:
    """Remove every routed expert's neurons not in ``keep`` from the loaded model, in place, the config's width
    included (and, where the shared experts' width follows it, or ``shared_width`` is given for a family that sizes
    them by a key of their own, their neurons not in ``shared``); the new width."""
    width = check_neuron_removal(view, keep, shared, shared_width)
    return _remove_neurons(view, keep, width, shared or {}, shared_width)


def _remove_layer_neurons(layer: Any, keep: NeuronKeep, shared: SharedKeep) -> None:
    from moekit.arch.experts import keep_shared_neurons

    layer.layout.keep_neurons(layer.experts, keep[layer.index])
    if layer.index in shared:
        keep_shared_neurons(layer.shared_mlp[1], shared[layer.index])


def _remove_neurons(view: MoEModelView, keep: NeuronKeep, width: int, shared: SharedKeep | None = None,
                    shared_width: int | None = None) -> int:
    """``prune_neurons`` once ``keep`` was checked (``check_neuron_removal``, which gave ``width``)."""
    before = view.layers[0].intermediate_size
    shared_key = shared_width_key(view) if shared_width is not None else None
    with torch.no_grad():
        for layer in view.layers:
            _remove_layer_neurons(layer, keep, shared or {})
    key = width_key(view)
    if config_value(view.model.config, key) == before:
        _set(view.model.config, key, width)
    if shared_key is not None:
        _set(view.model.config, shared_key, shared_width)
    return width


def keep_top_neurons(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[E, count]: each expert's ``count`` highest-scoring neurons (ties: the lower index), ascending."""
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :count]
    return order.sort(dim=1).values


def kept_width(width: int, ratio: float, align: int = 1) -> int:
    """Neurons every expert keeps when ``ratio`` of ``width`` are removed (checked: at least one removed and kept),
    rounded to the nearest multiple of ``align`` when ``width`` is one (grouped-GEMM kernels, transformers' default
    experts implementation, need every row of the expert tensors to be a multiple of 16 bytes: a width of 219
    float32 neurons fails at the first forward)."""
    if not 0 < ratio < 1:
        raise PlanError(f"--neuron-ratio {ratio:g} is the fraction of each expert's neurons removed: give a value "
                        "between 0 and 1 (e.g. 0.25)")
    count = width - round(width * ratio)
    if not 1 <= count < width:
        raise PlanError(f"--neuron-ratio {ratio:g} of {width} neurons keeps {count}: choose a ratio that removes at "
                        "least one neuron and keeps at least one")
    if align > 1 and width % align == 0 and width > align:  # the nearest multiple, halves up
        count = min(max(align * int((width - width * ratio) / align + 0.5), align), width - align)
    return count


def width_alignment(view: MoEModelView) -> int:
    """Neurons per 16 bytes of the experts' weights (4 for float32, 8 for bfloat16, 16 for FP8)."""
    layer = view.layers[0]
    weights = layer.layout.expert_weights(layer.experts, 0)
    return max(1, 16 // weights.down.element_size())


MODES = ("uniform", "masked")


def keep_layer_top_neurons(scores: torch.Tensor, removed: int) -> list[list[int]]:
    """Each expert's kept neurons when the ``removed`` lowest-scoring neurons of the whole layer (``scores``
    [E, I]) go, whichever experts they are in (CAMERA's per-layer selection; ties: the lower
    expert, then the lower neuron, goes first)."""
    experts, width = scores.shape
    order = torch.sort(scores.flatten(), stable=True).indices[:removed]  # lowest first, ties to the lower index
    kept = torch.ones(experts * width, dtype=torch.bool)
    kept[order] = False
    kept = kept.view(experts, width)
    return [[int(n) for n in kept[e].nonzero().flatten()] for e in range(experts)]


def make_neuron_plan(source: str | Path, view: MoEModelView, profile: Any, criterion: str, ratio: float,
                     set_weights: dict[str, float] | None = None, profile_path: str | None = None,
                     source_name: str | None = None, progress: bool = False, mode: str = "uniform",
                     experts_plan: dict[str, Any] | None = None, shrink_shared: bool = False) -> dict[str, Any]:
    """The neuron plan record (``moekit_plan.json``, format ``NEURON_PLAN_FORMAT``) of ``criterion`` (a key of
    ``moekit.score.neurons.NEURON_CRITERIA``); every expert is kept. ``mode`` "uniform": every expert keeps the same
    number of neurons, its highest-scoring ones, and the checkpoint shrinks. "masked": the lowest-scoring
    ``ratio`` of each layer's neurons go, from whichever experts (different counts per expert); they are zeroed,
    not removed, since a stock config holds one width: the checkpoint is as large as the source (its card says
    what a format holding only the kept neurons would save). With ``experts_plan`` (a pruning plan record of the
    same model, ``moekit.plan.make_prune_plan``) the plan removes those experts first and selects neurons in the
    experts it keeps: one plan, applied in one pass. Shared experts whose width follows the routed experts' lose
    neurons as the config says, chosen by the same criterion; ``shrink_shared`` (``--shared``) does the same for
    shared experts the family sizes by a key of their own, removing the same fraction of theirs. The experts'
    weights are read one decoder layer at a time from ``source``."""
    from tqdm.auto import tqdm

    from moekit.arch.experts import shared_mlp_weights
    from moekit.layerwise import layers_with_expert_weights
    from moekit.score.neurons import NEURON_CRITERIA, neuron_layer_stats, shared_neuron_scores, shared_reads
    from moekit.summary import summarize

    if mode not in MODES:
        raise PlanError(f"--mode {mode!r}: choose uniform (neurons removed, the checkpoint shrinks) or masked "
                        "(per-layer selection, neurons zeroed, nothing saved on disk)")
    method = NEURON_CRITERIA.get(criterion)  # an unknown name lists the valid ones
    profile.check_model(view)
    width = view.layers[0].intermediate_size
    align = width_alignment(view) if mode == "uniform" else 1
    count = kept_width(width, ratio, align)
    check_profile_holds(profile, view, criterion, method.reads)  # before a weight is read
    shared_widths: dict[int, int] = {}
    own_shared_width = own_key = None
    if shrink_shared:
        own_key = shared_width_key(view)
        if mode != "uniform":
            raise PlanError("--shared removes shared-expert neurons, so it needs --mode uniform (masking leaves the "
                            "shared experts whole)")
        if own_key is None:
            raise PlanError(f"--shared: the shared experts of {view.model_type} have no width key of their own "
                            "(where their width follows the routed experts', moekit chooses their neurons anyway; "
                            "a model without shared experts has none to shrink): drop --shared")
        own_shared_width = kept_width(config_value(view.model.config, own_key), ratio, align)
    if mode == "uniform":
        shared_widths = following_shared_widths(view, count, own_shared_width)
        if shared_widths:  # the shared experts' neurons are chosen by the same criterion
            reads = shared_reads(method)
            if reads is None:
                raise PlanError(f"{criterion} cannot score the shared experts' neurons, whose width follows the "
                                "routed experts' in this family: choose camera_p or heapr")
            check_profile_holds(profile, view, criterion, reads)
            before_shared = {layer.shared_width for layer in view.layers if layer.index in shared_widths}
            after_shared = set(shared_widths.values())
            if len(before_shared) != 1 or len(after_shared) != 1:
                raise PlanError(f"the shared experts' widths differ between layers ({sorted(before_shared)}); "
                                "moekit expects one width, as stock configs give")
            shared_width_change = {"before": before_shared.pop(), "after": after_shared.pop()}
        check_neuron_removal(view, {layer.index: torch.arange(count).repeat(layer.num_experts, 1)
                                    for layer in view.layers},
                             {index: torch.arange(new) for index, new in shared_widths.items()}, own_shared_width)
    if experts_plan is not None:
        from moekit.plan import plan_keep_map

        expert_keep = plan_keep_map(experts_plan)
    else:
        expert_keep = {layer.index: list(range(layer.num_experts)) for layer in view.layers}
    kept_experts = len(expert_keep[view.layers[0].index])
    layers: dict[str, Any] = {}
    for layer, weights in tqdm(layers_with_expert_weights(source, view), total=len(view.layers),
                               desc=f"{criterion} plan", unit="layer", disable=not progress):
        kept = expert_keep[layer.index]
        stats = {k: v[kept] for k, v in neuron_layer_stats(profile, layer.index, set_weights, method.reads).items()}
        scores = method.score(stats, [weights(e) for e in kept])
        if mode == "uniform":
            rows = [[int(n) for n in row] for row in keep_top_neurons(scores, count)]
        else:
            rows = keep_layer_top_neurons(scores, len(kept) * (width - count))
        entry = dict(experts_plan["layers"][str(layer.index)]) if experts_plan is not None else \
            {"kept": kept, "removed": []}
        layers[str(layer.index)] = {**entry, "neurons": rows}
        if layer.index in shared_widths:
            shared_scores = shared_neuron_scores(profile, layer.index, set_weights, method,
                                                 shared_mlp_weights(layer.shared_mlp[1]))
            layers[str(layer.index)]["shared_neurons"] = [
                int(n) for n in keep_top_neurons(shared_scores[None], shared_widths[layer.index])[0]]
    sets = [{"name": x["name"], "tokens": x["tokens"], "data": x["data"]} for x in profile.meta["sets"]]
    details = {"neuron_criterion": criterion, "neuron_ratio": ratio, "set_weights": set_weights,
               "profile": {"path": profile_path, "sets": sets, "fingerprint": profile.fingerprint},
               "mode": mode, "selection": "the same number of neurons in every expert (stock configs hold one "
               "width), each expert's own highest-scoring ones" if mode == "uniform" else "the layer's "
               "lowest-scoring neurons, from any expert; zeroed, not removed", "criterion_doc": method.doc}
    if shared_widths:
        why = (f"asked with --shared ({own_key} {shared_width_change['before']} -> {shared_width_change['after']})"
               if own_key is not None else "their width follows the routed experts' in this family")
        details["shared_experts"] = (f"{why}, so each layer's shared MLP keeps its highest-scoring neurons by the same "
                                     f"criterion ({criterion}; the shared MLP scored as one more expert that every "
                                     "token runs through with weight 1)")
        if own_key is not None:
            details["shrink_shared"] = own_key
    top_k = None
    if experts_plan is not None:  # the expert pruning this plan does first, as its own plan recorded it
        details["experts"] = {"method": experts_plan["method"], "details": experts_plan.get("details", {})}
        details["allow_regroup"] = experts_plan.get("details", {}).get("allow_regroup", False)
        top_k = (experts_plan.get("top_k") or {}).get("after")
    record = plan_envelope(NEURON_PLAN_FORMAT, source_name or profile.meta["model"].get("source", ""),
                           summarize(view), kept_experts, criterion, details, top_k, layers)
    record["width"] = {"before": width, "after": count if mode == "uniform" else width}
    if shared_widths:
        record["width"]["shared"] = shared_width_change
    if mode == "uniform" and align > 1 and width % align == 0:
        record["width"]["aligned_to"] = align
        record["width"]["removed_fraction"] = round(1 - count / width, 6)
    if mode == "masked":
        record["masked_neurons"] = {"per_layer": kept_experts * (width - count), "of": kept_experts * width}
    return record


def check_profile_holds(profile: Any, view: MoEModelView, criterion: str, reads: tuple[str, ...]) -> None:
    """A PlanError naming the ``moekit profile`` option(s) that collect what ``criterion`` reads and the profile
    lacks (--gradients alone where it is needed: it includes --neuron-stats)."""
    from moekit.profile.stats import COLLECTED_BY, profile_flag

    first = view.layers[0].index
    missing = [stat for stat in reads if stat not in profile.layers.get(first, {})]
    if not missing:
        return
    options = {COLLECTED_BY.get(stat, "") for stat in missing}
    if "gradients" in options:
        options.discard("neuron_stats")
    flags = " ".join(profile_flag(o) for o in sorted(options) if o)
    raise PlanError(f"{criterion} reads {', '.join(missing)}, which this profile does not hold: profile the model "
                    f"with {flags or 'a newer moekit'} (moekit profile MODEL --data NAME=PATH {flags} --out PROFILE)")


def plan_neuron_masks(plan: dict[str, Any], view: MoEModelView, origin: str = "plan") -> dict[int, list[list[int]]]:
    """A masked neuron plan's kept neurons per layer and expert (any count per expert), checked against ``view``
    (the model after the plan's expert pruning)."""
    layers = {int(k): v for k, v in plan["layers"].items()}
    width = view.layers[0].intermediate_size
    out = {}
    for layer in view.layers:
        rows = layers[layer.index].get("neurons")
        if not isinstance(rows, list) or len(rows) != layer.num_experts or not all(
                isinstance(r, list) and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < width
                                            for n in r) and r == sorted(set(r)) for r in rows):
            raise PlanError(f"{origin}: layer {layer.index} 'neurons' must hold, for each of its {layer.num_experts} "
                            f"experts, its kept neuron indices (distinct, ascending, 0..{width - 1})")
        out[layer.index] = rows
    return out


def mask_layer_neurons(layer: Any, kept: list[list[int]]) -> None:
    """Zero every neuron of ``layer``'s experts not in ``kept[e]``: its gate and up rows (and biases) and its down
    column, so its activation is 0 and nothing reaches the output, in place."""
    from dataclasses import replace

    from moekit.arch.experts import write_expert_weights

    for expert, rows in enumerate(kept):
        w = layer.layout.expert_weights(layer.experts, expert)
        drop = torch.ones(w.up.shape[0], dtype=torch.bool)
        drop[rows] = False
        if not bool(drop.any()):
            continue
        new = {}
        for name in ("gate", "up", "gate_bias", "up_bias"):
            value = getattr(w, name)
            if value is not None:
                value = value.detach().clone()
                value[drop.to(value.device)] = 0
            new[name] = value
        down = w.down.detach().clone()
        down[:, drop.to(down.device)] = 0
        write_expert_weights(layer.layout, layer.experts, expert, replace(w, down=down, **new))


def plan_own_shared_width(plan: dict[str, Any], origin: str = "plan") -> int | None:
    """The new width of shared experts sized by a key of their own, for a plan made with ``--shared`` (else None)."""
    if not (plan.get("details") or {}).get("shrink_shared"):
        return None
    stated = plan.get("width")
    width = (stated.get("shared") or {}).get("after") if isinstance(stated, dict) else None
    if not isinstance(width, int) or isinstance(width, bool):
        raise PlanError(f"{origin}: a plan made with --shared must give 'width': {{'shared': {{'after': N}}}}")
    return width


def plan_neuron_keep(plan: dict[str, Any], view: MoEModelView, origin: str = "plan") -> tuple[NeuronKeep, SharedKeep]:
    """A neuron plan's kept neurons (the routed experts', and the shared experts' where their width follows), checked
    against ``view`` (``check_neuron_removal``): the model after the plan's expert pruning (rows are the kept
    experts', in order)."""
    if plan.get("format") != NEURON_PLAN_FORMAT:
        raise PlanError(f"{origin} is not a neuron plan (format {NEURON_PLAN_FORMAT!r})")
    layers = {int(k): v for k, v in plan["layers"].items()}
    stated = plan.get("width")
    own_shared_width = plan_own_shared_width(plan, origin)
    neurons: NeuronKeep = {}
    shared: SharedKeep = {}
    for index, entry in layers.items():
        rows = entry.get("neurons")
        if not isinstance(rows, list) or not all(isinstance(r, list) and all(isinstance(n, int) and not
                                                                            isinstance(n, bool) for n in r)
                                                 for r in rows):
            raise PlanError(f"{origin}: layer {index} 'neurons' must be a list (one per expert) of lists of "
                            "neuron indices")
        if len({len(r) for r in rows}) > 1:
            raise PlanError(f"{origin}: layer {index} keeps different numbers of neurons in different experts; stock "
                            "configs hold one width")
        neurons[index] = torch.tensor(rows, dtype=torch.long)
        if "shared_neurons" in entry:
            kept = entry["shared_neurons"]
            if not isinstance(kept, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in kept):
                raise PlanError(f"{origin}: layer {index} 'shared_neurons' must be a list of neuron indices")
            shared[index] = torch.tensor(kept, dtype=torch.long)
    width = check_neuron_removal(view, neurons, shared, own_shared_width)
    if not isinstance(stated, dict) or stated.get("before") != view.layers[0].intermediate_size or \
            stated.get("after") != width:
        raise PlanError(f"{origin}: 'width' must be {{'before': {view.layers[0].intermediate_size}, 'after': "
                        f"{width}}} for the neurons it keeps, got {stated!r}")
    if shared:
        layer = next(layer for layer in view.layers if layer.index in shared)
        expected = {"before": layer.shared_width, "after": int(shared[layer.index].numel())}
        if stated.get("shared") != expected:
            raise PlanError(f"{origin}: 'width' must hold 'shared': {expected} for the shared-expert neurons it "
                            f"keeps, got {stated.get('shared')!r}")
    return neurons, shared


def render_neuron_card(name: str, source: str, before: Any, after: Any, plan: dict[str, Any], reproduce: str,
                       base: Path | None = None) -> str:
    """The checkpoint's README.md after neuron removal."""
    reproduce = reproduce.replace(source, shown_path(source, base))
    source = shown_path(source, base)
    v = versions()
    width = plan["width"]
    if (plan.get("details") or {}).get("mode") == "masked":
        share = plan["masked_neurons"]
        saved = before.routed_expert_parameters * share["per_layer"] / share["of"]
        what = (f"**the lowest-scoring {share['per_layer']} of the {share['of']} routed-expert neurons of each of the "
                f"{len(before.moe_layers)} MoE layers are zeroed** (criterion `{plan['method']}`, selected across each "
                "layer's experts, so experts keep different numbers). They are zeroed, not removed: a stock config "
                "holds one expert width, so **this checkpoint is as large as the source and saves no memory**; a "
                f"format that stored only the kept neurons would drop about {saved:,.0f} routed-expert parameters "
                f"({100 * share['per_layer'] / share['of']:.0f}%).")
    else:
        what = (f"**every routed expert of the {len(before.moe_layers)} MoE layers keeps {width['after']} of its "
                f"{width['before']} neurons** (criterion `{plan['method']}`, each expert its own highest-scoring ones; "
                "the same count everywhere because the config holds one expert width).")
    own_key = (plan.get("details") or {}).get("shrink_shared")
    if "shared" in width:
        why = (f"asked for with `--shared` (the config's `{own_key}` gives their width)" if own_key else
               "in this family their width follows the routed experts' (the config's one key sizes both), so stock "
               "`from_pretrained` builds them narrower too")
        shared = (f"**The shared experts keep {width['shared']['after']} of their {width['shared']['before']} "
                  f"neurons, chosen by the same criterion** (`{plan['method']}`, the shared MLP scored as one more "
                  f"expert that every token runs through with weight 1): {why}.")
    else:
        shared = "Shared experts keep their width."
    return f"""---
library_name: transformers
tags:
- moekit
- mixture-of-experts
- neuron-pruning
---

# {name}

Neuron-pruned from `{source}` ({before.model_type}, {before.architecture}) with moekit {v['moekit']}:
{what} Every expert, router and other weight is the source's; the kept neurons' rows and columns are
unchanged. {shared} No weights were retrained.

{card_tail(before, after, reproduce)}
The plan (`moekit_plan.json`) lists every expert's kept neurons.
"""


def neurons_to_checkpoint(source: str | Path, plan: dict[str, Any], out: str | Path, overwrite: bool = False,
                          dtype: str = "auto", reproduce: str | None = None) -> Any:
    """Write ``source`` with the neurons of ``plan`` (a neuron plan record) removed to ``out``, with the plan and a
    card. A local safetensors checkpoint is streamed: every MoE layer is read one decoder layer at a time, its
    experts cut to the kept neurons and written back in the stored layout; every other tensor's bytes are copied.
    Checked before a weight is read; written atomically."""
    from moekit.edit.rewrite import ExpertEdit, expert_edit_to_checkpoint

    masked = (plan.get("details") or {}).get("mode") == "masked"

    def prepare(structure: MoEModelView) -> ExpertEdit:
        if masked:
            masks = plan_neuron_masks(plan, structure)
            return ExpertEdit(lambda layer: mask_layer_neurons(layer, masks[layer.index]))
        keep, shared = plan_neuron_keep(plan, structure)
        own_shared_width = plan_own_shared_width(plan)
        return ExpertEdit(lambda layer: _remove_layer_neurons(layer, keep, shared),
                          reshape=lambda view: _remove_neurons(view, keep, plan["width"]["after"], shared,
                                                               own_shared_width),
                          modules=lambda layer: dict([layer.shared_mlp]) if layer.index in shared else {})

    def card(name: str, described: str, before: Any, after: Any, base: Path, command: str) -> str:
        return render_neuron_card(name, described, before, after, plan, command, base)

    return expert_edit_to_checkpoint(source, plan, out, prepare, card, "neuron-pruned", overwrite=overwrite,
                                     dtype=dtype, reproduce=reproduce)


__all__ = ["NeuronKeep", "SharedKeep", "check_neuron_keep", "check_neuron_removal", "check_profile_holds",
           "following_shared_widths", "keep_top_neurons", "kept_width", "make_neuron_plan", "neurons_to_checkpoint",
           "plan_neuron_keep", "plan_own_shared_width", "prune_neurons", "render_neuron_card", "shared_width_key",
           "tensors_following_width", "width_key"]
