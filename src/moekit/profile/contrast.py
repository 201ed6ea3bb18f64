"""Routing contrast between two named sets of a profile: which experts set A routes to more than set B.

One mechanism for every use (domain specialisation, safety localisation, the audit of a prune plan, routing masks
from a contrast): per MoE layer, the counts y_j of routing selections of expert j (``count``: tokens that chose j;
every token makes k selections, so n = sum_j y_j = k x tokens) in A and in B.

Effect size and significance: the log-odds ratio with an informative Dirichlet prior, and its z-score (Monroe,
Colaresi & Quinn 2008, "Fightin' Words"), per expert j:

    delta_j = log((y_j^A + a_j) / (n^A + a_0 - y_j^A - a_j)) - log((y_j^B + a_j) / (n^B + a_0 - y_j^B - a_j))
    var_j  ~= 1 / (y_j^A + a_j) + 1 / (y_j^B + a_j),      z_j = delta_j / sqrt(var_j)

with a_j = ``prior`` x max(1, E x (y_j^A + y_j^B) / (n^A + n^B)) and a_0 = sum_j a_j (``prior``: default 10
pseudo-selections per expert). For an expert used at least as much as an even share this is Monroe et al.'s
informative prior (proportional to the pooled share); a rarer expert gets ``prior`` pseudo-selections instead, where
theirs would give it almost none (0 against 24 selections of ~44,000 read log-odds -6.3 on the demo model with their
prior alone, -1.2 with the floor): an expert seen a handful of times is pulled toward delta = 0 instead of topping
the list with a huge ratio of tiny counts. delta > 0: A routes to j more than B does (relative to each
set's size). The z-score treats each routing selection as independent; tokens of one sequence route alike, so it
overstates the significance of a difference (a sequence-level bootstrap would need per-sequence counts, which a
profile does not keep): read |z| as a ranking of how clearly the counts differ, not as a calibrated p-value.

Per layer also: the share difference d_j = p_j^A - p_j^B (p = y / n), the total variation TV = 1/2 sum |d_j|, how
many experts carry 50% and 90% of it (largest |d_j| first), and the Jensen-Shannon divergence between p^A and p^B
in bits (0 = the sets route alike, 1 = disjoint experts).
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.errors import UserError
from moekit.profile.profile_file import Profile

DEFAULT_PRIOR = 10.0  # pseudo-selections per expert
CARRIED_FRACTIONS = (0.5, 0.9)


class ContrastError(UserError):
    """A contrast that cannot be computed from this profile (a set it lacks, a set against itself)."""


def log_odds_z(counts_a: torch.Tensor, counts_b: torch.Tensor, prior: float = DEFAULT_PRIOR
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, z) of every expert from the selection counts ``[E]`` of two sets (module docstring), float64."""
    if prior <= 0:
        raise ContrastError(f"--prior {prior:g}: give a positive number of pseudo-selections per expert (e.g. 10)")
    y_a, y_b = counts_a.double(), counts_b.double()
    n_a, n_b = float(y_a.sum()), float(y_b.sum())
    pooled = (y_a + y_b) / max(n_a + n_b, 1.0)
    alpha = prior * torch.clamp(pooled * y_a.numel(), min=1.0)  # below an even share: `prior` pseudo-selections
    alpha_0 = float(alpha.sum())
    delta = (torch.log(y_a + alpha) - torch.log(n_a + alpha_0 - y_a - alpha)
             - torch.log(y_b + alpha) + torch.log(n_b + alpha_0 - y_b - alpha))
    z = delta / torch.sqrt(1 / (y_a + alpha) + 1 / (y_b + alpha))
    return delta, z


def js_divergence_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence of two distributions, in bits (0..1)."""
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> float:
        nonzero = a > 0
        return float((a[nonzero] * (a[nonzero] / m[nonzero]).log2()).sum())
    return max(0.0, (kl(p) + kl(q)) / 2)


def experts_carrying(difference: torch.Tensor, fraction: float) -> int:
    """How many experts, largest |difference| first, hold ``fraction`` of sum |difference|."""
    size = difference.abs().sort(descending=True).values
    total = float(size.sum())
    if total == 0:
        return 0
    reached = torch.nonzero(size.cumsum(0) >= fraction * total - 1e-12 * total).flatten()
    return int(reached[0]) + 1


def check_contrast_sets(profile: Profile, a: str, b: str) -> None:
    for name in (a, b):
        if name not in profile.set_names:
            raise ContrastError(f"no calibration set {name!r} in this profile; its sets: "
                                f"{', '.join(profile.set_names)}")
    if a == b:
        raise ContrastError(f"--a and --b are both {a!r}: a contrast needs two different sets (its sets: "
                            f"{', '.join(profile.set_names)})")


def contrast_layer(profile: Profile, layer: int, a: str, b: str, prior: float = DEFAULT_PRIOR,
                   top: int = 5) -> dict[str, Any]:
    """The contrast of one MoE layer (module docstring): per expert arrays and the summary."""
    counts_a, counts_b = profile.stat(layer, "count", a).double(), profile.stat(layer, "count", b).double()
    delta, z = log_odds_z(counts_a, counts_b, prior)
    share_a = counts_a / counts_a.sum().clamp(min=1)
    share_b = counts_b / counts_b.sum().clamp(min=1)
    difference = share_a - share_b
    order = sorted(range(delta.numel()), key=lambda j: (-float(delta[j]), j))
    return {
        "layer": layer,
        "selections": {a: int(counts_a.sum()), b: int(counts_b.sum())},
        "log_odds": [round(float(v), 6) for v in delta],
        "z": [round(float(v), 4) for v in z],
        "share_a": [round(float(v), 8) for v in share_a],
        "share_b": [round(float(v), 8) for v in share_b],
        "top_a": [{"expert": j, "log_odds": round(float(delta[j]), 4), "z": round(float(z[j]), 2),
                   "share_a": round(float(share_a[j]), 6), "share_b": round(float(share_b[j]), 6)}
                  for j in order[:top]],
        "top_b": [{"expert": j, "log_odds": round(float(delta[j]), 4), "z": round(float(z[j]), 2),
                   "share_a": round(float(share_a[j]), 6), "share_b": round(float(share_b[j]), 6)}
                  for j in reversed(order[-top:])],
        "total_variation": round(0.5 * float(difference.abs().sum()), 6),
        "experts_carrying": {f"{round(100 * f)}%": experts_carrying(difference, f) for f in CARRIED_FRACTIONS},
        "js_divergence_bits": round(js_divergence_bits(share_a, share_b), 6),
    }


def contrast_profile(profile: Profile, a: str, b: str, prior: float = DEFAULT_PRIOR, top: int = 5) -> dict[str, Any]:
    """Set ``a`` against set ``b`` in every MoE layer of ``profile``: JSON-serialisable (``moekit contrast``)."""
    check_contrast_sets(profile, a, b)
    if top < 1:
        raise ContrastError(f"--top {top}: give at least 1")
    layers = [contrast_layer(profile, layer, a, b, prior, top) for layer in profile.fingerprint["moe_layers"]]
    tokens = {s["name"]: s["tokens"] for s in profile.meta["sets"]}
    strongest = max(layers, key=lambda row: row["js_divergence_bits"])
    return {
        "model": profile.meta["model"].get("source"),
        "a": a, "b": b, "tokens": {a: tokens[a], b: tokens[b]},
        "method": {"effect": "log-odds ratio of routing selections with an informative Dirichlet prior (Monroe, "
                             "Colaresi & Quinn 2008); a_0 = prior x experts pseudo-selections, spread by the pooled "
                             "share",
                   "prior_per_expert": prior,
                   "significance": "z = log-odds / its approximate standard error, selections taken as independent "
                                   "(overstates significance: tokens of a sequence route alike); a ranking, not a "
                                   "calibrated p-value",
                   "divergence": "Jensen-Shannon divergence of the two sets' routing shares, bits"},
        "layers": layers,
        "most_divergent_layer": strongest["layer"],
        "mean_js_divergence_bits": round(sum(row["js_divergence_bits"] for row in layers) / len(layers), 6),
    }


def top_contrast_experts(profile: Profile, a: str, b: str, per_layer: int,
                         prior: float = DEFAULT_PRIOR) -> dict[int, list[int]]:
    """The ``per_layer`` experts of every MoE layer that A routes to most more than B (highest log-odds, ties to the
    lower index), for protection and audits."""
    check_contrast_sets(profile, a, b)
    out = {}
    for layer in profile.fingerprint["moe_layers"]:
        delta, _ = log_odds_z(profile.stat(layer, "count", a), profile.stat(layer, "count", b), prior)
        out[layer] = sorted(range(delta.numel()), key=lambda j: (-float(delta[j]), j))[:per_layer]
    return out


def matching_sets(profile: Profile, patterns: list[str]) -> list[str]:
    """The profile's set names matching any of ``patterns`` (shell-style: ``parallel-*``), in the profile's order;
    a pattern matching nothing is an error that lists the sets."""
    from fnmatch import fnmatchcase

    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in profile.set_names):
            raise ContrastError(f"no calibration set matches {pattern!r}; the profile's sets: "
                                f"{', '.join(profile.set_names)}")
    return [name for name in profile.set_names if any(fnmatchcase(name, p) for p in patterns)]


def routing_similarity(profile: Profile, reference: str, sets: list[str] | None = None) -> dict[str, Any]:
    """Per MoE layer, how alike every other named set routes to ``reference`` (e.g. each language to English on
    parallel text: Multilingual Routing in MoE finds language-specific early and late layers and shared middle
    ones): similarity = 1 - the Jensen-Shannon divergence of the two sets' routing shares, in bits (1 = the same
    distribution over experts, 0 = disjoint experts). ``sets``: names or shell-style patterns of the sets compared
    (default: all). JSON-serialisable."""
    if reference not in profile.set_names:
        raise ContrastError(f"no calibration set {reference!r} in this profile; its sets: "
                            f"{', '.join(profile.set_names)}")
    others = [name for name in (matching_sets(profile, sets) if sets else profile.set_names) if name != reference]
    if not others:
        raise ContrastError(f"routing similarity to {reference!r} needs at least one other set; the profile has "
                            f"{', '.join(profile.set_names)}")
    for name in others:
        profile.set_index(name)  # an unknown set lists the valid ones
    layers = profile.fingerprint["moe_layers"]
    similarity: dict[str, list[float]] = {}
    for name in others:
        row = []
        for layer in layers:
            ref, own = profile.stat(layer, "count", reference).double(), profile.stat(layer, "count", name).double()
            row.append(round(1 - js_divergence_bits(ref / ref.sum().clamp(min=1), own / own.sum().clamp(min=1)), 6))
        similarity[name] = row
    return {"reference": reference, "layers": layers, "similarity": similarity,
            "measure": "1 - Jensen-Shannon divergence (bits) of the two sets' routing shares, per layer"}


def steering_biases(profile: Profile, toward: str, away: str, delta: float, per_layer: int,
                    layers: list[int] | None = None, prior: float = DEFAULT_PRIOR) -> dict[int, torch.Tensor]:
    """Router-logit biases ``{layer: [E]}`` for ``moekit.edit.mask.routing_override`` that promote, in ``layers``
    (default: the middle third of the MoE layers), the ``per_layer`` experts that set ``toward`` routes to most more
    than set ``away`` (:func:`top_contrast_experts`) by ``delta``: the inference-time steering of Multilingual
    Routing in MoE, which promotes in the middle layers the experts that English text activates (``toward="en"``,
    ``away`` the language being read). The paper picks experts by English activation frequency on its task data;
    this picks them by the contrast of the two sets' routing, from the profile alone."""
    moe_layers = list(profile.fingerprint["moe_layers"])
    if layers is None:
        third = len(moe_layers) // 3
        layers = moe_layers[third:len(moe_layers) - third] or moe_layers
    unknown = [layer for layer in layers if layer not in moe_layers]
    if unknown:
        raise ContrastError(f"layers {unknown} are not MoE layers of the profile's model (MoE layers: {moe_layers})")
    chosen = top_contrast_experts(profile, toward, away, per_layer, prior)
    out = {}
    for layer in layers:
        bias = torch.zeros(profile.stat(layer, "count", toward).numel())
        bias[chosen[layer]] = delta
        out[layer] = bias
    return out


__all__ = ["CARRIED_FRACTIONS", "DEFAULT_PRIOR", "ContrastError", "check_contrast_sets", "contrast_layer",
           "contrast_profile", "experts_carrying", "js_divergence_bits", "log_odds_z", "matching_sets",
           "routing_similarity", "steering_biases",
           "top_contrast_experts"]
