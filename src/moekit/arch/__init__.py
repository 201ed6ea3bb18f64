"""One exact view over every Hugging Face MoE family (see ``view.py``)."""

from moekit.arch.experts import ExpertLayout, ExpertWeights, StackedLayout
from moekit.arch.families import FAMILIES, supported_model_types
from moekit.arch.routing import RoutingSpec, select_experts
from moekit.arch.view import (
    ConfigFields,
    MoELayer,
    MoEModelView,
    Routing,
    UnsupportedModelError,
    routing_mismatch,
    routing_override,
)

__all__ = [
    "FAMILIES", "ConfigFields", "ExpertLayout", "ExpertWeights", "MoELayer", "MoEModelView", "Routing",
    "RoutingSpec", "StackedLayout", "UnsupportedModelError", "routing_mismatch", "routing_override",
    "select_experts", "supported_model_types",
]
