"""The table of MoE families: how each one routes, and where its config keeps the MoE fields.

Only what cannot be read off the module structure lives here: the routing maths (code, not
structure) and the way the block calls its router. Layer discovery, router weights, biases,
expert layouts and shared experts are found structurally (``moekit.arch.view``), so a family
that copies a listed family's router needs only one line here -- and an unlisted family whose
router returns ``(logits, weights, index)`` is still recognised by probing its router against
every routing kind (``moekit.arch.view.probe_routing``).

To support a new family, add a ``FamilySpec`` to ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from moekit.arch.routing import RoutingSpec

# How the MoE block obtains its routing is read off the router by a probe call
# (moekit.arch.view.detect_call_convention); only Llama-4's (sigmoid scores [T, E], logits) cannot be
# told apart from its outputs and is named here.
RouterCall = Literal["tuple", "llama4"]

SpecBuilder = Callable[[Any, nn.Module, nn.Module, int, int], RoutingSpec]


def _attr(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


def softmax_topk(renorm: bool | None = None, weights_dtype: str = "logits") -> SpecBuilder:
    """renorm=None: read ``norm_topk_prob`` from the router (then the config)."""

    def build(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
        do_renorm = renorm
        if do_renorm is None:
            do_renorm = bool(_attr(router, "norm_topk_prob", default=_attr(config, "norm_topk_prob", default=False)))
        return RoutingSpec("softmax_topk", top_k, num_experts, renormalize="sum" if do_renorm else "none",
                           weights_dtype=weights_dtype)  # type: ignore[arg-type]

    return build


def deepseek_v2(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
    method = _attr(router, "topk_method", default=_attr(config, "topk_method", default="greedy"))
    grouped = method == "group_limited_greedy"
    return RoutingSpec(
        "softmax_topk", top_k, num_experts,
        scaling=float(_attr(router, "routed_scaling_factor", default=1.0)),
        n_group=int(_attr(router, "num_group", default=1)) if grouped else 1,
        topk_group=int(_attr(router, "topk_group", default=1)) if grouped else 1,
        group_score="max", logits_fp32=True, weights_dtype="float32",
    )


def deepseek_v3(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
    n_group = int(_attr(router, "num_group", "n_group", default=_attr(config, "n_group", default=1)))
    norm = bool(_attr(router, "norm_topk_prob", default=_attr(config, "norm_topk_prob", default=True)))
    return RoutingSpec(
        "sigmoid_topk", top_k, num_experts, renormalize="sum" if norm else "none", norm_eps=1e-20,
        scaling=float(_attr(router, "routed_scaling_factor",
                            default=_attr(config, "routed_scaling_factor", default=1.0))),
        n_group=n_group, topk_group=int(_attr(router, "topk_group", default=_attr(config, "topk_group", default=1))),
        group_score="top2_sum", logits_fp32=True, weights_dtype="float32",
    )


def minimax_m2(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
    return RoutingSpec("sigmoid_topk", top_k, num_experts, renormalize="sum", weights_dtype="float32")


def ernie(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
    return RoutingSpec("softmax_biased_topk", top_k, num_experts, logits_fp32=True, weights_dtype="hidden",
                       norm_min=float(_attr(router, "norm_min", default=_attr(config, "moe_norm_min", default=1e-12))))


def topk_softmax(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
    return RoutingSpec("topk_softmax", top_k, num_experts, weights_dtype="logits")


def phimoe(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
    jitter = float(_attr(router, "router_jitter_noise", default=_attr(config, "router_jitter_noise", default=0.0)))
    return RoutingSpec("sparsemixer", 2, num_experts, jitter_eps=jitter)


def llama4(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
    return RoutingSpec("topk_sigmoid", top_k, num_experts)


def dbrx(config: Any, router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> RoutingSpec:
    p = getattr(block, "moe_normalize_expert_weights", None)
    return RoutingSpec("softmax_topk", top_k, num_experts, renormalize="none" if p is None else "lp",
                       lp_norm=float(p or 1.0), probs_fp32=False)


@dataclass(frozen=True)
class FamilySpec:
    routing: SpecBuilder
    call: RouterCall = "tuple"


_QWEN_LIKE = FamilySpec(softmax_topk())
_DEEPSEEK_V3_LIKE = FamilySpec(deepseek_v3)
_TOPK_SOFTMAX = FamilySpec(topk_softmax)

FAMILIES: dict[str, FamilySpec] = {
    "mixtral": FamilySpec(softmax_topk(True, weights_dtype="float32")),
    "minimax": FamilySpec(softmax_topk(True, weights_dtype="float32")),
    "minimax_m2": FamilySpec(minimax_m2),
    "phimoe": FamilySpec(phimoe),  # sparsemixer is hard-wired to two experts per token
    "qwen2_moe": _QWEN_LIKE,
    "qwen3_moe": _QWEN_LIKE,
    "qwen3_next": _QWEN_LIKE,
    "qwen3_vl_moe_text": _QWEN_LIKE,
    "qwen3_5_moe_text": FamilySpec(softmax_topk(True)),
    "qwen3_5_moe": FamilySpec(softmax_topk(True)),
    "olmoe": _QWEN_LIKE,
    "flex_olmo": _QWEN_LIKE,
    "jamba": FamilySpec(softmax_topk(False)),
    "hunyuan_v1_moe": FamilySpec(softmax_topk(True)),
    "deepseek_v2": FamilySpec(deepseek_v2),
    "deepseek_v3": _DEEPSEEK_V3_LIKE,
    "deepseek_v32": _DEEPSEEK_V3_LIKE,
    "glm4_moe": _DEEPSEEK_V3_LIKE,
    "glm4_moe_lite": _DEEPSEEK_V3_LIKE,
    "glm4v_moe_text": _DEEPSEEK_V3_LIKE,
    "dots1": _DEEPSEEK_V3_LIKE,
    "solar_open": _DEEPSEEK_V3_LIKE,
    "ernie4_5_moe": FamilySpec(ernie),
    "gpt_oss": _TOPK_SOFTMAX,
    "granitemoe": _TOPK_SOFTMAX,
    "granitemoeshared": _TOPK_SOFTMAX,
    "granitemoehybrid": _TOPK_SOFTMAX,
    "llama4_text": FamilySpec(llama4, call="llama4"),
    "llama4": FamilySpec(llama4, call="llama4"),
    "dbrx": FamilySpec(dbrx),
}

# Candidate routing builders tried, in order, for model types not in FAMILIES.
PROBE_CANDIDATES: list[SpecBuilder] = [
    softmax_topk(True, "logits"), softmax_topk(False, "logits"), softmax_topk(True, "float32"),
    softmax_topk(False, "float32"), deepseek_v3, minimax_m2, topk_softmax, ernie, deepseek_v2,
]


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)
