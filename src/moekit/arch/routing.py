"""Routing maths of every supported MoE family, as pure functions of the router logits.

Each routing kind reproduces one family's own expert selection and gate weights (tested against
the model's own router on every supported family). Each takes an optional ``available`` mask
(bool ``[E]``, ``True`` = expert may be chosen; or one mask per row, broadcast against the logits, see
``select_experts``): a masked expert's logit is set to ``-inf``
*before* the family's own softmax / sigmoid / normalisation, and it is also excluded from any
biased selection score. For every kind this equals the routing of a model whose masked experts
were removed (the softmax over the kept logits equals the masked softmax; sigmoid is element-wise)
-- with one exception: group-limited routing (``n_group > 1``) groups experts by contiguous index
blocks, so pruning re-forms the groups unless the same number of experts is removed from every
group. ``moekit.edit`` enforces that by default.

Kinds (``RoutingSpec.kind``):

- ``softmax_topk``: p = softmax(z); [group mask]; top-k on p; optional renorm (sum or L_p);
  x scaling. Mixtral, MiniMax, Qwen2/3/3.5/Next-MoE, OLMoE, FlexOlmo, Jamba, Hunyuan,
  DeepSeek-V2 (greedy and group_limited_greedy), DBRX.
- ``topk_softmax``: top-k on z (router bias included), softmax over the k. GPT-OSS, Granite-MoE.
- ``sigmoid_topk``: s = sigmoid(z); choice = s + correction bias; [group mask from the sum of
  the top-2 choices per group]; top-k on choice; w = s (no bias); optional renorm; x scaling.
  DeepSeek-V3, GLM-4-MoE and the families that copy them; MiniMax-M2.
- ``softmax_biased_topk``: p = softmax(z); top-k on p + bias; w = p / clamp(sum, min). ERNIE-4.5.
- ``sparsemixer``: PhiMoE's sparsemixer in evaluation mode (top-2, jitter band).
- ``topk_sigmoid``: top-k on z, w = sigmoid(selected z); the family scales the expert *input*
  by w. Llama-4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from moekit.registry import Registry

RoutingFn = Callable[["RoutingSpec", torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
                     "tuple[torch.Tensor, torch.Tensor]"]
ROUTING_KINDS: Registry[RoutingFn] = Registry("routing kind")

NEG_INF = float("-inf")


@dataclass(frozen=True)
class RoutingSpec:
    """Everything a routing kind needs besides the logits. Read from the router and the config."""

    kind: str
    top_k: int
    num_experts: int
    renormalize: Literal["none", "sum", "lp"] = "none"
    lp_norm: float = 1.0  # DBRX's moe_normalize_expert_weights
    scaling: float = 1.0  # routed_scaling_factor
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    norm_eps: float = 0.0  # DeepSeek-V3 adds 1e-20 to the renorm denominator
    norm_min: float = 0.0  # ERNIE clamps the renorm denominator from below
    jitter_eps: float = 0.0  # PhiMoE sparsemixer band
    logits_fp32: bool = False  # the family computes logits in float32
    probs_fp32: bool = True  # softmax in float32 (DBRX takes it in the logits' dtype)
    weights_dtype: Literal["float32", "logits", "hidden"] = "logits"

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1

    def with_experts(self, num_experts: int) -> RoutingSpec:
        return replace(self, num_experts=num_experts)

    def describe(self) -> str:
        parts = [self.kind, f"top{self.top_k}"]
        if self.renormalize != "none":
            parts.append("renorm" if self.renormalize == "sum" else f"L{self.lp_norm:g}-norm")
        if self.scaling != 1.0:
            parts.append(f"x{self.scaling:g}")
        if self.group_limited:
            parts.append(f"groups {self.topk_group}/{self.n_group}")
        return " ".join(parts)


def _mask_logits(logits: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
    if available is None:
        return logits
    return logits.masked_fill(~available.to(logits.device), NEG_INF)


def _mask_choice(choice: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
    if available is None:
        return choice
    return choice.masked_fill(~available.to(choice.device), NEG_INF)


def _group_mask(spec: RoutingSpec, choice: torch.Tensor, fill: float) -> torch.Tensor:
    """Keep only the experts of the ``topk_group`` best groups (contiguous index blocks); ``choice`` is
    ``[..., E]``."""
    *rows, num_experts = choice.shape
    per_group = num_experts // spec.n_group
    grouped = choice.reshape(*rows, spec.n_group, per_group)
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [..., n_group]
    else:
        group_scores = grouped.max(dim=-1).values
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_keep = torch.zeros_like(group_scores).scatter_(-1, group_idx, 1).bool()
    expert_keep = group_keep.unsqueeze(-1).expand(*group_keep.shape, per_group).reshape(choice.shape)
    return choice.masked_fill(~expert_keep, fill)


def _renormalize(spec: RoutingSpec, weights: torch.Tensor) -> torch.Tensor:
    if spec.renormalize == "sum":
        return weights / (weights.sum(dim=-1, keepdim=True) + spec.norm_eps)
    if spec.renormalize == "lp":
        return weights / torch.norm(weights, p=spec.lp_norm, dim=-1, keepdim=True)
    return weights


def _scale(spec: RoutingSpec, weights: torch.Tensor) -> torch.Tensor:
    return weights * spec.scaling if spec.scaling != 1.0 else weights


@ROUTING_KINDS.register("softmax_topk")
def softmax_topk(spec: RoutingSpec, logits: torch.Tensor, bias: torch.Tensor | None,
                 available: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    probs_dtype = torch.float32 if spec.probs_fp32 else logits.dtype
    probs = torch.softmax(_mask_logits(logits, available), dim=-1, dtype=probs_dtype)  # [T, E]
    if spec.group_limited:
        probs = _group_mask(spec, probs, 0.0)
    weights, index = torch.topk(probs, spec.top_k, dim=-1)  # [T, k]
    return index, _scale(spec, _renormalize(spec, weights))


@ROUTING_KINDS.register("topk_softmax")
def topk_softmax(spec: RoutingSpec, logits: torch.Tensor, bias: torch.Tensor | None,
                 available: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    top_logits, index = torch.topk(_mask_logits(logits, available), spec.top_k, dim=-1)  # [T, k]
    weights = torch.softmax(top_logits.float(), dim=-1)
    return index, _scale(spec, weights)


@ROUTING_KINDS.register("sigmoid_topk")
def sigmoid_topk(spec: RoutingSpec, logits: torch.Tensor, bias: torch.Tensor | None,
                 available: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(_mask_logits(logits, available).float())  # [T, E]
    choice = scores if bias is None else scores + bias.float().reshape(-1)
    choice = _mask_choice(choice, available)
    if spec.group_limited:
        choice = _group_mask(spec, choice, NEG_INF)
    index = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]  # [T, k]
    weights = scores.gather(-1, index)
    return index, _scale(spec, _renormalize(spec, weights))


@ROUTING_KINDS.register("softmax_biased_topk")
def softmax_biased_topk(spec: RoutingSpec, logits: torch.Tensor, bias: torch.Tensor | None,
                        available: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(_mask_logits(logits, available).float(), dim=-1)  # [T, E]
    choice = probs if bias is None else probs + bias.float().reshape(-1)
    index = torch.topk(_mask_choice(choice, available), spec.top_k, dim=-1)[1]
    weights = probs.gather(-1, index)
    weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=spec.norm_min)
    return index, _scale(spec, weights)


def _sparsemixer_step(scores: torch.Tensor, masked_scores: torch.Tensor, jitter_eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    threshold, max_index = masked_scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    outside_band = ((threshold - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(masked_scores.masked_fill(outside_band, NEG_INF), dim=-1)
    return max_index, gates.gather(dim=-1, index=max_index)


@ROUTING_KINDS.register("sparsemixer")
def sparsemixer(spec: RoutingSpec, logits: torch.Tensor, bias: torch.Tensor | None,
                available: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer, evaluation path (deterministic); always two experts."""
    scores = _mask_logits(logits, available)
    first, w_first = _sparsemixer_step(scores, scores, spec.jitter_eps)
    second, w_second = _sparsemixer_step(scores, torch.scatter(scores, -1, first, NEG_INF),
                                         spec.jitter_eps)
    index = torch.cat((first, second), dim=-1)
    weights = torch.cat((w_first, w_second), dim=-1)
    return index, _scale(spec, weights)


@ROUTING_KINDS.register("topk_sigmoid")
def topk_sigmoid(spec: RoutingSpec, logits: torch.Tensor, bias: torch.Tensor | None,
                 available: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    top_logits, index = torch.topk(_mask_logits(logits, available), spec.top_k, dim=-1)
    weights = torch.sigmoid(top_logits.float())
    return index, _scale(spec, weights)


SIGMOID_KINDS = ("sigmoid_topk", "topk_sigmoid")


def router_scoring(spec: RoutingSpec) -> str:
    """How the family turns logits into its router probabilities: ``sigmoid`` (each expert's score on its own:
    DeepSeek-V3, GLM-4-MoE, Llama-4, ...) or ``softmax`` (every other kind)."""
    return "sigmoid" if spec.kind in SIGMOID_KINDS else "softmax"


def compute_router_logits(spec: RoutingSpec, hidden: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Router logits ``[T, E]`` the way the family computes them (dtype included)."""
    hidden = hidden.reshape(-1, weight.shape[-1])
    if spec.logits_fp32:
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(hidden.to(weight.dtype), weight, bias)


def select_experts(spec: RoutingSpec, logits: torch.Tensor, correction_bias: torch.Tensor | None = None,
                   available: torch.Tensor | None = None, hidden_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert indices ``[..., k]`` and final gate weights ``[..., k]`` from logits ``[..., E]`` (``[T, E]``
    as the router gives them, or with leading dimensions added, e.g. ``[C, T, E]``: each row is routed on its own).

    ``available``: bool ``[E]``, one mask for every row (checked to leave at least ``top_k`` experts); or a mask
    of as many dimensions as the logits that broadcasts to their shape (e.g. ``[C, 1, E]`` against ``[C, T, E]``:
    one mask per candidate). The per-row form is not counted here -- that would cost a host sync per call -- so
    its caller makes sure every row leaves ``top_k`` experts (``ExpertOutputCache.losses`` does).

    The weights come back in the dtype the family's router returns them in
    (``spec.weights_dtype``: float32, the logits' dtype or the hidden states' dtype).
    """
    if available is not None:
        available = available.bool()
        experts = logits.shape[-1]
        if available.dim() == 1:
            if available.shape != (experts,):
                raise ValueError(f"mask has shape {tuple(available.shape)}, expected ({experts},)")
            if int(available.sum()) < spec.top_k:
                raise ValueError(f"only {int(available.sum())} experts available but top_k={spec.top_k}")
        elif (available.dim() != logits.dim() or available.shape[-1] != experts
              or any(m not in (1, n) for m, n in zip(available.shape, logits.shape, strict=True))):
            raise ValueError(f"mask has shape {tuple(available.shape)}, expected ({experts},) or a shape that "
                             f"broadcasts to the logits' {tuple(logits.shape)}")
    index, weights = ROUTING_KINDS.get(spec.kind)(spec, logits, correction_bias, available)
    if spec.weights_dtype == "logits":
        weights = weights.to(logits.dtype)
    elif spec.weights_dtype == "hidden" and hidden_dtype is not None:
        weights = weights.to(hidden_dtype)
    return index, weights
