"""Routing analysis from a Profile alone (no model): load, entropy, sparsity, super experts, specialisation.

Definitions (``METHODS.md``), per MoE layer and over the chosen sets:

- load share of expert j: count_j / sum(count); balance: coefficient of variation of the counts
  (0 = perfectly even), max/mean load, MaxVio = max/mean - 1, normalised load entropy
  H(share)/log E (1 = even), dead experts (never routed to), starved experts (below a quarter of
  the mean load) and nearly dead ones (below 1% of it). ``balance_warnings`` turns the layers that
  miss the bar of released MoEs (MaxVio <= 0.5, no expert below a quarter of the mean) into
  sentences on what that means for pruning.
- router entropy: mean over tokens of H(softmax(z_t)) / log E.
- token-level sparsity TLS = 1 - mean_t |S_t| / E; chunk-level sparsity for chunk length L
  CLS_L = 1 - mean over chunks of |union of S_t in the chunk| / E (BlockFFN).
- super experts (Su et al. 2025, the rule REAP's code applies): expert j of layer l is super if
  its largest |down-projection output| exceeds max(P99.5 of every expert's maximum across all MoE
  layers, the largest of them / 10); only experts in the first 75% of MoE layers are reported
  (the last layers' large activations are not the attention-sink kind). METHODS.md words the
  percentile as per layer; REAP's code takes it over all layers, which we follow: per layer, the
  top expert of a small layer would always pass.
- specialisation of a named set s: lift_j = share_j(s) / share_j(all sets); the set's preferred
  experts are those with the highest lift. Overlap of two sets: mean over layers of the Jaccard
  index of their most-used experts (the top quarter of experts by count, at least top-k).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moekit.profile.profile_file import Profile
from moekit.profile.stats import CHUNK_SIZES

SUPER_EXPERT_QUANTILE = 0.995
STARVED_SHARE = 0.25  # of the mean load: below it an expert is starved
NEARLY_DEAD_SHARE = 0.01
MAX_VIOLATION_BAR = 0.5  # released MoEs, balanced per layer, stay below it
SUPER_EXPERT_GLOBAL_FRACTION = 0.1
SUPER_EXPERT_LAYER_FRACTION = 0.75


@dataclass(frozen=True)
class SuperExpert:
    layer: int
    expert: int
    act_max: float
    threshold: float


def _entropy(share: torch.Tensor) -> float:
    nonzero = share[share > 0]
    return float(-(nonzero * nonzero.log()).sum())


def layer_summary(profile: Profile, layer: int, sets: list[str] | None = None) -> dict[str, Any]:
    """Load balance, entropy and sparsity of one layer."""
    counts = profile.stat(layer, "count", sets)
    tokens = float(profile.stat(layer, "tokens", sets))
    experts = counts.numel()
    log_e = math.log(experts)
    share = counts / counts.sum().clamp(min=1)
    mean = float(counts.mean())
    chunks = profile.stat(layer, "chunk_experts_sum", sets) / profile.stat(layer, "chunk_count", sets).clamp(min=1)
    return {
        "layer": layer,
        "tokens": int(tokens),
        "load_cv": float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0,
        "max_over_mean": float(counts.max() / mean) if mean > 0 else 0.0,
        "load_entropy": _entropy(share) / log_e,
        "router_entropy": float(profile.stat(layer, "router_entropy_sum", sets)) / max(tokens, 1) / log_e,
        "max_violation": float(counts.max() / mean) - 1 if mean > 0 else 0.0,
        "dead_experts": [int(i) for i in torch.nonzero(counts == 0).flatten()],
        "starved_experts": [int(i) for i in torch.nonzero(counts < STARVED_SHARE * mean).flatten()] if mean > 0 else [],
        "nearly_dead_experts": [int(i) for i in torch.nonzero(counts < NEARLY_DEAD_SHARE * mean).flatten()]
        if mean > 0 else [],
        "token_sparsity": 1 - float(counts.sum()) / max(tokens, 1) / experts,
        "chunk_sparsity": {str(size): 1 - float(chunks[c]) / experts for c, size in enumerate(CHUNK_SIZES)},
    }


def balance_warnings(layers: list[dict[str, Any]]) -> list[str]:
    """What the layers' balance means for pruning, for layers that miss the bar (none: an empty list)."""
    starved = [row for row in layers if row["starved_experts"]]
    uneven = [row for row in layers if row["max_violation"] > MAX_VIOLATION_BAR]
    if not starved and not uneven:
        return []
    warnings = []
    if starved:
        worst = max(starved, key=lambda row: len(row["starved_experts"]))
        nearly = sum(len(row["nearly_dead_experts"]) for row in starved)
        warnings.append(
            f"{len(starved)} of {len(layers)} MoE layers have starved experts on this calibration data (below a "
            "quarter of the mean load; "
            f"layer {worst['layer']}: {len(worst['starved_experts'])}), {nearly} of them with almost no load (below "
            "1%): removing them costs little, so frequency-based pruning will look nearly free here, while "
            "per-token means (reap, ean_mean) rank them on few tokens. Released MoEs, balanced per layer, have none "
            "on broad text")
    if uneven:
        worst = max(uneven, key=lambda row: row["max_violation"])
        warnings.append(f"{len(uneven)} of {len(layers)} MoE layers are strongly imbalanced on this calibration "
                        f"data (MaxVio = max/mean - 1 "
                        f"above {MAX_VIOLATION_BAR}; layer {worst['layer']}: {worst['max_violation']:.2f}): "
                        "criteria will disagree more than on a balanced model. A model balanced on broad text is often "
                        "this uneven on narrow text (its experts specialise by domain): calibrate on the mix you "
                        "will serve")
    return warnings


def super_experts(profile: Profile, sets: list[str] | None = None) -> list[SuperExpert]:
    """Experts with extreme down-projection activations (rule in the module docstring)."""
    layers = profile.fingerprint["moe_layers"]
    maxima = {layer: profile.stat(layer, "act_max", sets).double() for layer in layers}
    everything = torch.cat(list(maxima.values()))
    threshold = max(float(torch.quantile(everything, SUPER_EXPERT_QUANTILE)),
                    float(everything.max()) * SUPER_EXPERT_GLOBAL_FRACTION)
    considered = layers[: max(1, int(len(layers) * SUPER_EXPERT_LAYER_FRACTION))]
    found = []
    for layer in considered:
        values = maxima[layer]
        for expert in torch.nonzero(values > threshold).flatten().tolist():
            found.append(SuperExpert(layer, int(expert), float(values[expert]), threshold))
    return found


def _top_experts(counts: torch.Tensor, size: int) -> set[int]:
    order = sorted(range(counts.numel()), key=lambda j: (-float(counts[j]), j))
    return set(order[:size])


def set_specialisation(profile: Profile, preferred: int = 5) -> dict[str, Any]:
    """Per set: preferred experts per layer by lift; per pair of sets: overlap of their most-used experts."""
    names = profile.set_names
    layers = profile.fingerprint["moe_layers"]
    result: dict[str, Any] = {"sets": {}, "overlap": {}}
    for name in names:
        per_layer = []
        for layer in layers:
            own = profile.stat(layer, "count", name)
            everyone = profile.stat(layer, "count")
            lift = (own / own.sum().clamp(min=1)) / (everyone / everyone.sum().clamp(min=1)).clamp(min=1e-12)
            lift = torch.where(everyone > 0, lift, torch.zeros_like(lift))
            order = sorted(range(lift.numel()), key=lambda j: (-float(lift[j]), j))[:preferred]
            per_layer.append({"layer": layer, "experts": order, "lift": [round(float(lift[j]), 3) for j in order]})
        result["sets"][name] = per_layer
    top_k = int(profile.fingerprint["top_k"])
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            jaccards = []
            for layer, experts in zip(layers, profile.fingerprint["num_experts"], strict=True):
                size = max(top_k, experts // 4)
                top_a = _top_experts(profile.stat(layer, "count", a), size)
                top_b = _top_experts(profile.stat(layer, "count", b), size)
                jaccards.append(len(top_a & top_b) / len(top_a | top_b))
            result["overlap"][f"{a}|{b}"] = {"mean_jaccard": sum(jaccards) / len(jaccards),
                                              "per_layer": [round(j, 4) for j in jaccards]}
    return result


def analyze_profile(profile: Profile, sets: list[str] | None = None) -> dict[str, Any]:
    """Everything above, JSON-serialisable."""
    layers = profile.fingerprint["moe_layers"]
    summaries = [layer_summary(profile, layer, sets) for layer in layers]
    return {
        "model": profile.meta["model"],
        "sets": [{"name": s["name"], "tokens": s["tokens"]} for s in profile.meta["sets"]],
        "analysed_sets": sets or profile.set_names,
        "layers": summaries,
        "warnings": balance_warnings(summaries),
        "super_experts": [asdict(s) for s in super_experts(profile, sets)],
        "specialisation": set_specialisation(profile),
    }
