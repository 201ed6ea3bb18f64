"""What moekit sees in a model: layers, experts, routing and parameter counts (``moekit inspect``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from moekit.arch.view import MoEModelView


@dataclass
class LayerSummary:
    layer: int
    path: str
    num_experts: int
    top_k: int
    routing: str
    expert_layout: str
    intermediate_size: int
    router: str
    router_bias: str | None
    correction_bias: str | None
    shared_experts: list[str]
    routed_parameters: int
    shared_parameters: int


@dataclass
class ModelSummary:
    model_type: str
    architecture: str
    family_known: bool
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    total_parameters: int
    active_parameters: int  # per token: everything but the routed experts not chosen
    routed_expert_parameters: int
    config_fields: dict[str, Any]
    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def routed_share(self) -> float:
        return self.routed_expert_parameters / max(self.total_parameters, 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["routed_share"] = self.routed_share
        return out


def summarize(view: MoEModelView) -> ModelSummary:
    model = view.model
    config = model.config
    total = sum(int(p.numel()) for p in model.parameters())  # tied weights counted once
    routed = 0
    active_routed = 0
    layers = []
    for layer in view.layers:
        params = layer.expert_parameters()
        routed += params
        active_routed += params * layer.top_k // max(layer.num_experts, 1)
        layers.append(LayerSummary(
            layer=layer.index, path=layer.path, num_experts=layer.num_experts, top_k=layer.top_k,
            routing=layer.routing.describe(), expert_layout=layer.layout.describe(layer.experts),
            intermediate_size=layer.intermediate_size, router=layer.router_weight_name,
            router_bias=layer.router_bias_name, correction_bias=layer.correction_bias_name,
            shared_experts=list(layer.shared), routed_parameters=params, shared_parameters=layer.shared_parameters(),
        ))
    num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None) or 0
    counts = {x.num_experts for x in view.layers}
    return ModelSummary(
        model_type=view.model_type, architecture=type(model).__name__, family_known=view.family_known,
        num_layers=int(num_layers), moe_layers=[x.index for x in view.layers],
        num_experts=counts.pop() if len(counts) == 1 else -1, top_k=view.top_k,
        total_parameters=total, active_parameters=total - routed + active_routed, routed_expert_parameters=routed,
        config_fields=asdict(view.config_fields), layers=layers,
    )


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
