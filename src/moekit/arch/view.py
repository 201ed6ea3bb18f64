"""One view over every Hugging Face MoE family: ``MoEModelView.from_model(model)``.

The view is found from the module structure (experts modules, their sibling router, biases and
shared experts) plus the family table for the routing maths (``moekit.arch.families``):

    view = MoEModelView.from_model(model)
    layer = view.layers[0]
    routing = layer.route(hidden_states)                 # the model's own selection and gates
    routing = layer.route(hidden_states, available=mask) # with experts masked out
    w = layer.expert_weights(3)                          # gate [I,H], up [I,H], down [H,I]
    with routing_override(view, {layer.index: mask}):    # run the model with experts masked
        model(input_ids)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit.arch.experts import (
    SHARED_MLP_PROJECTIONS,
    ExpertLayout,
    ExpertWeights,
    expert_parameter_count,
    layout_of,
)
from moekit.arch.families import FAMILIES, PROBE_CANDIDATES, FamilySpec, RouterCall, supported_model_types
from moekit.arch.routing import RoutingSpec, compute_router_logits, select_experts
from moekit.errors import UserError

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)(?:\.|$)")
ROUTER_NAMES = ("gate", "router")
CORRECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                     "ffn_config.moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "ffn_config.moe_top_k")
N_GROUP_KEYS = ("n_group", "num_expert_group")
TOPK_GROUP_KEYS = ("topk_group",)


class UnsupportedModelError(UserError):
    """The model is not an MoE model moekit knows how to read."""


@dataclass(frozen=True)
class CallConvention:
    """How the MoE block obtains its routing (it changes between transformers releases).

    - ``tuple``: ``router(hidden[, correction_bias])`` returns a tuple holding the logits, the
      top-k weights and the top-k index in the order ``order``.
    - ``block_routes``: the router returns logits only; ``block.route_tokens_to_experts([hidden,]
      logits)`` returns the top-k weights and index in the order ``order``.
    - ``llama4``: ``router(hidden)`` returns (sigmoid scores ``[T, E]``, logits).
    """

    kind: str = "tuple"
    order: tuple[str, ...] = ("logits", "weights", "index")
    passes_bias: bool = False
    takes_hidden: bool = False


@dataclass
class Routing:
    logits: torch.Tensor  # [T, E] raw router logits, as the router computes them
    index: torch.Tensor  # [T, k] selected experts
    weights: torch.Tensor  # [T, k] final gate weights


def config_value(config: Any, dotted: str) -> Any:
    obj = config
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set(config: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    obj = config
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


@dataclass
class ConfigFields:
    """Config keys that must change together when experts are removed (every alias included)."""

    expert_count: list[str]
    top_k: list[str]
    n_group: str | None
    topk_group: str | None
    intermediate_size: list[str]

    @classmethod
    def from_config(cls, config: Any, num_experts: int, top_k: int, intermediate: int) -> ConfigFields:
        def matching(keys: tuple[str, ...], value: int) -> list[str]:
            values = {k: config_value(config, k) for k in keys}
            return [k for k, v in values.items() if v == value and not isinstance(v, bool)]

        inter_keys = ("moe_intermediate_size", "intermediate_size", "expert_ffn_hidden_size",
                      "ffn_config.ffn_hidden_size")
        n_group = next((k for k in N_GROUP_KEYS if isinstance(config_value(config, k), int)), None)
        topk_group = next((k for k in TOPK_GROUP_KEYS if isinstance(config_value(config, k), int)), None)
        return cls(matching(EXPERT_COUNT_KEYS, num_experts), matching(TOP_K_KEYS, top_k), n_group, topk_group,
                   matching(inter_keys, intermediate)[:1])

    def set_expert_count(self, config: Any, value: int) -> None:
        for key in self.expert_count:
            _set(config, key, value)

    def set_top_k(self, config: Any, value: int) -> None:
        for key in self.top_k:
            _set(config, key, value)


@dataclass
class MoELayer:
    """One MoE block, seen the same way whatever the family."""

    index: int  # decoder layer index
    path: str  # module path of the MoE block
    block: nn.Module
    experts: nn.Module
    experts_name: str
    layout: ExpertLayout
    router: nn.Module
    router_name: str
    router_weight_name: str  # relative to the block, e.g. "gate.weight", "gate.wg.weight"
    router_bias_name: str | None
    correction_bias_name: str | None  # relative to the block
    routing: RoutingSpec
    call: CallConvention
    shared: dict[str, nn.Module] = field(default_factory=dict)  # name (relative to the model) -> module

    def _tensor(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        owner, _, attr = name.rpartition(".")
        module = self.block.get_submodule(owner) if owner else self.block
        return getattr(module, attr)

    @property
    def router_weight(self) -> torch.Tensor:  # [E, H]
        tensor = self._tensor(self.router_weight_name)
        assert tensor is not None
        return tensor

    @property
    def router_bias(self) -> torch.Tensor | None:  # [E], added to the logits (GPT-OSS)
        return self._tensor(self.router_bias_name)

    @property
    def correction_bias(self) -> torch.Tensor | None:  # [E] (or [1, E]), added for selection only
        return self._tensor(self.correction_bias_name)

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts(self.experts)

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def intermediate_size(self) -> int:
        return self.layout.intermediate_size(self.experts)

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return compute_router_logits(self.routing, hidden, self.router_weight, self.router_bias)

    def route_logits(self, logits: torch.Tensor, available: torch.Tensor | None = None,
                     hidden_dtype: torch.dtype | None = None) -> Routing:
        index, weights = select_experts(self.routing, logits, self.correction_bias, available, hidden_dtype)
        return Routing(logits, index, weights)

    def route(self, hidden: torch.Tensor, available: torch.Tensor | None = None) -> Routing:
        """The model's own routing of ``hidden [..., H]``; ``available`` (bool ``[E]``) masks experts."""
        return self.route_logits(self.router_logits(hidden), available, hidden.dtype)

    def expert_weights(self, expert: int) -> ExpertWeights:
        return self.layout.expert_weights(self.experts, expert)

    def expert_parameters(self) -> int:
        return expert_parameter_count(self.experts)

    def shared_parameters(self) -> int:
        return sum(int(p.numel()) for m in self.shared.values() for p in m.parameters())

    @property
    def shared_mlp(self) -> tuple[str, nn.Module] | None:
        """(path, module) of the layer's shared-expert MLP when it has exactly one with ``gate_proj``, ``up_proj``
        and ``down_proj`` linear layers (DeepSeek-V2/V3, GLM-4-MoE, Qwen2-MoE, Llama-4, ...): the form whose neurons
        moekit measures and selects (neuron m: row m of gate and up, column m of down); else None."""
        found = [(path, module) for path, module in self.shared.items()
                 if all(isinstance(getattr(module, name, None), nn.Linear) for name in SHARED_MLP_PROJECTIONS)]
        return found[0] if len(found) == 1 else None

    @property
    def shared_width(self) -> int:
        """Neurons of :attr:`shared_mlp` (0 without one)."""
        found = self.shared_mlp
        return int(found[1].down_proj.in_features) if found is not None else 0


def _layer_index(path: str) -> int:
    match = _LAYER_INDEX.search(path)
    if match is None:
        raise UnsupportedModelError(f"cannot tell the decoder layer of MoE block {path!r}")
    return int(match.group(1))


def _find_router(block: nn.Module, num_experts: int, hidden: int) -> tuple[str, nn.Module, str, str | None]:
    """(router name, router module, weight name, bias name) relative to the block."""
    for name in ROUTER_NAMES:
        router = getattr(block, name, None)
        if not isinstance(router, nn.Module):
            continue
        weight = getattr(router, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (num_experts, hidden):
            bias = getattr(router, "bias", None)
            has_bias = isinstance(bias, torch.Tensor) and tuple(bias.shape) == (num_experts,)
            return name, router, f"{name}.weight", f"{name}.bias" if has_bias else None
        for child_name, child in router.named_children():
            if isinstance(child, nn.Linear) and child.out_features == num_experts:
                bias_name = f"{name}.{child_name}.bias" if child.bias is not None else None
                return name, router, f"{name}.{child_name}.weight", bias_name
    raise UnsupportedModelError(f"no router found beside the experts of {type(block).__name__}")


def _find_correction_bias(block: nn.Module, experts_name: str, num_experts: int) -> str | None:
    for name, tensor in list(block.named_buffers()) + list(block.named_parameters()):
        if name.startswith(experts_name + ".") or "shared" in name:
            continue
        if name.rsplit(".", 1)[-1] in CORRECTION_BIAS_NAMES and tensor.shape[-1] == num_experts:
            return name
    return None


def _find_shared(model: nn.Module, block_path: str) -> dict[str, nn.Module]:
    shared: dict[str, nn.Module] = {}
    parent_path = block_path.rpartition(".")[0]
    for path in (block_path, parent_path):
        owner = model.get_submodule(path)
        for name, child in owner.named_children():
            if "shared" in name and any(True for _ in child.parameters()):
                shared[f"{path}.{name}"] = child
    return shared


def _top_k(config: Any, router: nn.Module, block: nn.Module) -> int:
    for obj in (router, block):
        value = getattr(obj, "top_k", None)
        if isinstance(value, int):
            return value
    for key in TOP_K_KEYS:
        value = config_value(config, key)
        if isinstance(value, int):
            return value
    raise UnsupportedModelError("cannot find the number of experts per token (top-k)")


def _name_outputs(outputs: Any, num_experts: int) -> tuple[str, ...] | None:
    """Names ("logits", "weights", "index") of a routing tuple's items, told apart by dtype and shape."""
    if not isinstance(outputs, tuple) or not all(isinstance(t, torch.Tensor) for t in outputs):
        return None
    names: list[str] = []
    for tensor in outputs:
        if not tensor.is_floating_point():
            names.append("index")
        elif tensor.shape[-1] == num_experts and "logits" not in names:
            names.append("logits")
        else:
            names.append("weights")
    if len(outputs) == 3 and sorted(names) == ["index", "logits", "weights"]:
        return tuple(names)
    if len(outputs) == 2 and sorted(names) in (["index", "weights"], ["index", "logits"]):
        return tuple("weights" if n == "logits" else n for n in names)  # k == E: the float one is the weights
    return None


def detect_call_convention(block: nn.Module, router: nn.Module, weight: torch.Tensor, num_experts: int,
                           correction_bias: torch.Tensor | None, default: RouterCall) -> CallConvention:
    """Call the router (and the block's routing method) once on a probe and read what comes back."""
    if default == "llama4":
        return CallConvention("llama4", ("scores", "logits"))
    probe = torch.zeros(4, weight.shape[-1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            out, passes_bias = router(probe), False
        except TypeError:  # MiniMax-M2 passes the block's correction bias to its router
            out, passes_bias = router(probe, correction_bias), True
        if isinstance(out, torch.Tensor) and hasattr(block, "route_tokens_to_experts"):
            takes_hidden = len(inspect.signature(block.route_tokens_to_experts).parameters) >= 2
            routed = block.route_tokens_to_experts(*((probe, out) if takes_hidden else (out,)))
            order = _name_outputs(routed, num_experts)
            if order is not None:
                return CallConvention("block_routes", order, takes_hidden=takes_hidden)
        order = _name_outputs(out, num_experts)
    if order is None:
        raise UnsupportedModelError(f"cannot tell what the router of {type(block).__name__} returns; "
                                    "add its family to moekit/arch/families.py")
    return CallConvention("tuple", order, passes_bias=passes_bias)


def model_routing(layer: MoELayer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weights) from the model's own router, for probing and verification."""
    call = layer.call
    if call.kind == "llama4":
        scores, _ = layer.router(hidden)
        weights, index = torch.topk(scores, layer.top_k, dim=-1)
        return index, weights
    if call.kind == "block_routes":
        logits = layer.router(hidden)
        out = layer.block.route_tokens_to_experts(*((hidden, logits) if call.takes_hidden else (logits,)))
    else:
        out = layer.router(hidden, layer.correction_bias) if call.passes_bias else layer.router(hidden)
    named = dict(zip(call.order, out, strict=True))
    return named["index"], named["weights"]


def routing_mismatch(layer: MoELayer, hidden: torch.Tensor) -> float:
    """Largest gate difference between the view's routing and the model's own router on ``hidden``
    (``inf`` if they select different experts)."""
    with torch.no_grad():
        index, weights = model_routing(layer, hidden)
        mine = layer.route(hidden)
    order_a, order_b = index.sort(dim=-1), mine.index.sort(dim=-1)
    if not torch.equal(order_a.values, order_b.values):
        return float("inf")
    a = weights.gather(-1, order_a.indices).float()
    b = mine.weights.gather(-1, order_b.indices).float()
    return float((a - b).abs().max()) if a.numel() else 0.0


def probe_routing(layer: MoELayer, config: Any, samples: int = 256, seed: int = 0) -> RoutingSpec | None:
    """Find the routing kind of an unlisted family by matching its router on random inputs."""
    gen = torch.Generator().manual_seed(seed)
    weight = layer.router_weight
    hidden = torch.randn(samples, weight.shape[-1], generator=gen).to(weight.device, weight.dtype)
    tol = 1e-5 if weight.dtype == torch.float32 else 1e-2
    for build in PROBE_CANDIDATES:
        layer.routing = build(config, layer.router, layer.block, layer.num_experts, layer.routing.top_k)
        try:
            if routing_mismatch(layer, hidden) <= tol:
                return layer.routing
        except Exception:  # a candidate that cannot run on this router is simply not the one
            continue
    return None


@dataclass
class MoEModelView:
    """Every MoE layer of a model, its config fields and its family."""

    model: nn.Module
    model_type: str
    layers: list[MoELayer]
    config_fields: ConfigFields
    family_known: bool

    @classmethod
    def from_model(cls, model: nn.Module) -> MoEModelView:
        config = model.config
        model_type = str(getattr(config, "model_type", type(model).__name__))
        family: FamilySpec | None = FAMILIES.get(model_type)
        hidden = int(config_value(config, "hidden_size") or config_value(config, "d_model") or 0)
        layers: list[MoELayer] = []
        for path, module in model.named_modules():
            layout = layout_of(module)
            if layout is None:
                continue
            block_path, _, experts_name = path.rpartition(".")
            block = model.get_submodule(block_path)
            num_experts = layout.num_experts(module)
            router_name, router, weight_name, bias_name = _find_router(block, num_experts, hidden)
            top_k = _top_k(config, router, block)
            build = family.routing if family else PROBE_CANDIDATES[0]
            layer = MoELayer(
                index=_layer_index(block_path), path=block_path, block=block, experts=module,
                experts_name=experts_name, layout=layout, router=router, router_name=router_name,
                router_weight_name=weight_name, router_bias_name=bias_name,
                correction_bias_name=_find_correction_bias(block, experts_name, num_experts),
                routing=build(config, router, block, num_experts, top_k),
                call=CallConvention(), shared=_find_shared(model, block_path),
            )
            layer.call = detect_call_convention(block, router, layer.router_weight, num_experts,
                                                layer.correction_bias, family.call if family else "tuple")
            # Unlisted family: find its routing kind by probing (not possible on the meta device,
            # where only the structure is loaded; validation is repeated once weights are in).
            if family is None and not layer.router_weight.is_meta and probe_routing(layer, config) is None:
                raise UnsupportedModelError(
                    f"model type {model_type!r} has MoE layers but its routing matches none of moekit's "
                    f"routing kinds; supported model types: {', '.join(supported_model_types())}. "
                    "Add it to moekit/arch/families.py (FAMILIES)."
                )
            layers.append(layer)
        if not layers:
            raise UnsupportedModelError(
                f"no MoE layers found in {type(model).__name__} (model type {model_type!r}); "
                f"supported model types: {', '.join(supported_model_types())}"
            )
        first = layers[0]
        fields = ConfigFields.from_config(config, first.num_experts, first.top_k, first.intermediate_size)
        return cls(model, model_type, layers, fields, family is not None)

    @property
    def num_experts(self) -> int:
        counts = {layer.num_experts for layer in self.layers}
        if len(counts) != 1:
            raise ValueError(f"MoE layers hold different expert counts: {sorted(counts)}")
        return counts.pop()

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k

    @property
    def decoder_layers_path(self) -> str:
        """Where the decoder layers are (``model.layers``): the list holding the first MoE layer's decoder layer."""
        return self.layers[0].path.rpartition(".")[0].rpartition(".")[0]

    def layer(self, index: int) -> MoELayer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(f"layer {index} is not an MoE layer; MoE layers: {[x.index for x in self.layers]}")

    def __iter__(self) -> Iterator[MoELayer]:
        return iter(self.layers)


@contextmanager
def routing_override(view: MoEModelView, available: dict[int, torch.Tensor]) -> Iterator[None]:
    """Run the model with the view's routing function, experts masked per layer.

    ``available`` maps a layer index to a bool ``[E]`` mask (``True`` = may be routed to); layers
    not listed route over all experts, through the view's routing function too.
    """
    patched: list[tuple[nn.Module, str]] = []
    try:
        for layer in view.layers:
            mask = available.get(layer.index)
            if layer.call.kind == "block_routes":
                def route_tokens(*args: Any, layer: MoELayer = layer, mask: Any = mask) -> Any:
                    r = layer.route_logits(args[-1], mask, args[0].dtype if len(args) > 1 else None)
                    named = {"weights": r.weights, "index": r.index}
                    return tuple(named[n] for n in layer.call.order)
                layer.block.route_tokens_to_experts = route_tokens  # type: ignore[method-assign]
                patched.append((layer.block, "route_tokens_to_experts"))
            elif layer.call.kind == "llama4":
                def llama4_router(hidden: torch.Tensor, layer: MoELayer = layer, mask: Any = mask) -> Any:
                    r = layer.route(hidden, mask)
                    scores = torch.zeros_like(r.logits).scatter_(1, r.index, r.weights.to(r.logits.dtype))
                    return scores, r.logits
                layer.router.forward = llama4_router  # type: ignore[method-assign]
                patched.append((layer.router, "forward"))
            else:
                def tuple_router(hidden: torch.Tensor, *args: Any, layer: MoELayer = layer, mask: Any = mask,
                                 **kwargs: Any) -> Any:
                    r = layer.route(hidden, mask)
                    named = {"logits": r.logits, "weights": r.weights, "index": r.index}
                    return tuple(named[n] for n in layer.call.order)
                layer.router.forward = tuple_router  # type: ignore[method-assign]
                patched.append((layer.router, "forward"))
        yield
    finally:
        for module, attr in patched:
            module.__dict__.pop(attr, None)
