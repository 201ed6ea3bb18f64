"""STUN's first stage (Lee et al. 2024, "STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning"):
expert pruning by behaviour similarity, with no forward pass beyond the profile.

Per MoE layer, experts the router selects together for the same tokens are taken to behave alike. Distance
d_ij = -C_ij / mean_{k != l} C_kl, with C the profile's co-activation counts (``coactivation``: tokens for which
both i and j are among the selected experts), as the reference's documented run (its ``--load_path`` of top-k
co-selection counts with ``--divide_mean``). Clustering is greedy: the closest pair of experts in different
clusters joins their clusters, until E - r clusters remain (r: experts removed). Each cluster keeps one expert,
the one whose weights (gate, up and down, flattened) are closest to the cluster's mean weights; its router row
is kept as it is, and the others are removed.

Where moekit differs from the reference code, and why:
- every layer removes the same number of experts (stock configs hold one expert count), where the reference
  binary-searches one distance threshold over all layers and writes per-layer counts with its own modeling code;
- the reference's threshold test (merge two clusters only if every cross pair is below the threshold) is not
  applied: its documented runs leave the threshold infinite, and with a per-layer count it is not needed;
- a layer left with at most ``merge_max_clusters`` clusters is averaged in the reference; moekit only prunes;
- protected experts (super experts, ``--protect``) are kept: a cluster that holds one keeps it, and two clusters
  that each hold one never join; group-limited routers (DeepSeek-V3's n_group) cluster inside each routing
  group, every group keeping the same number (as every moekit plan does, unless ``--allow-regroup``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.arch.view import MoEModelView
from moekit.edit.card import prune_plan_record
from moekit.edit.keep import KeepMap, PlanError, validate_keep
from moekit.model_io import describe_source, load_structure
from moekit.plan import PlanRequest, kept_count, layer_entries, plan_details, protections, routing_groups
from moekit.profile.profile_file import Profile
from moekit.score.criteria import check_set_weights
from moekit.summary import summarize

STUN_DOC = __doc__.split("\n\n")[0]


def coactivation_distance(coactivation: torch.Tensor) -> torch.Tensor:
    """d_ij = -C_ij / mean of the off-diagonal C (float64 [E, E]); the diagonal is +inf (an expert is not its own
    neighbour). With no co-activation at all every distance is 0 (ties go to the lowest ids)."""
    c = coactivation.double().clone()
    experts = c.shape[0]
    off = ~torch.eye(experts, dtype=torch.bool)
    mean = float(c[off].abs().mean()) if experts > 1 else 0.0
    distance = -c / mean if mean > 0 else torch.zeros_like(c)
    distance[~off] = float("inf")
    return distance


def combined_coactivation(profile: Profile, layer: int, weights: dict[str, float] | None) -> torch.Tensor:
    """[E, E] co-activation of the named sets, each set's counts per token weighed as the criteria weigh sets
    (sum_s w_s C_s / N_s; every set weighs 1 by default)."""
    weights = weights or {name: 1.0 for name in profile.set_names}
    total = None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        tokens = max(float(profile.stat(layer, "tokens", name)), 1.0)
        part = profile.stat(layer, "coactivation", name).double() * (weight / tokens)
        total = part if total is None else total + part
    assert total is not None  # check_set_weights: one weight is positive
    return total


def greedy_clusters(distance: torch.Tensor, clusters: int, members: list[int] | None = None,
                    protected: set[int] = frozenset()) -> list[list[int]]:
    """Greedy agglomerative clustering of ``members`` (default all rows of ``distance``) into ``clusters`` groups:
    repeatedly join the clusters of the closest pair (i, j) in different clusters (ties: the lowest (i, j)); two
    clusters that each hold a protected expert never join. Returns the clusters, each sorted, ordered by their
    smallest member."""
    members = list(range(distance.shape[0])) if members is None else list(members)
    if not 1 <= clusters <= len(members):
        raise PlanError(f"cannot cluster {len(members)} experts into {clusters} groups")
    cluster_of = {e: e for e in members}
    groups = {e: {e} for e in members}
    pairs = sorted((float(distance[i, j]), i, j) for a, i in enumerate(members) for j in members[a + 1:])
    for _, i, j in pairs:
        if len(groups) <= clusters:
            break
        a, b = cluster_of[i], cluster_of[j]
        if a == b or (groups[a] & protected and groups[b] & protected):
            continue
        keep, gone = min(a, b), max(a, b)
        groups[keep] |= groups.pop(gone)
        for e in groups[keep]:
            cluster_of[e] = keep
    if len(groups) > clusters:
        raise PlanError(f"cannot keep {clusters} of {len(members)} experts: more than {clusters} protected experts "
                        "would have to stay; protect fewer experts or keep more")
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def representative(cluster: list[int], flat_weights: dict[int, torch.Tensor], protected: set[int]) -> int:
    """The cluster's protected expert if it has one, else the expert closest (L2) to the cluster's mean weights
    (ties: the lowest id)."""
    chosen = [e for e in cluster if e in protected]
    if chosen:
        return chosen[0]
    if len(cluster) == 1:
        return cluster[0]
    stacked = torch.stack([flat_weights[e] for e in cluster])
    centroid = stacked.mean(0)
    distances = torch.linalg.vector_norm(stacked - centroid, dim=1)
    return cluster[int(torch.argmin(distances))]


def _flat(weights: Any) -> torch.Tensor:
    parts = [weights.up, weights.down] + ([weights.gate] if weights.gate is not None else [])
    return torch.cat([p.detach().double().flatten() for p in parts])


def stun_plan(source: str | Path, profile: Profile, request: PlanRequest,
              profile_path: str | None = None) -> dict[str, Any]:
    """STUN stage 1's pruning plan for the model at ``source`` from its profile (co-activation) and its expert
    weights, read one decoder layer at a time."""
    from moekit.layerwise import layers_with_expert_weights

    view = MoEModelView.from_model(load_structure(source))
    profile.check_model(view)
    weights = check_set_weights(request.set_weights, profile.set_names) if request.set_weights else None
    kept = kept_count(view.num_experts, request)
    supers, reasons_all = protections(view, profile, request)
    groups = routing_groups(view, kept, request.allow_regroup)
    keep: KeepMap = {}
    details: dict[int, list[dict[str, Any]]] = {}
    for layer, expert_weights in layers_with_expert_weights(source, view):
        experts = layer.num_experts
        coactivation = combined_coactivation(profile, layer.index, weights)
        distance = coactivation_distance(coactivation)
        reasons = {e: why for (i, e), why in reasons_all.items() if i == layer.index}
        protected = set(reasons)
        size = experts // groups
        chosen: list[int] = []
        clusters_of: dict[int, list[int]] = {}
        flat = {e: _flat(expert_weights(e)) for e in range(experts)}
        for g in range(groups):
            members = list(range(g * size, (g + 1) * size))
            for cluster in greedy_clusters(distance, kept // groups, members, protected & set(members)):
                rep = representative(cluster, flat, protected)
                chosen.append(rep)
                for e in cluster:
                    clusters_of[e] = cluster
        keep[layer.index] = sorted(chosen)
        # score for the record: how often the expert is selected with another one, relative to the layer's mean
        scores = [float(-distance[e][torch.arange(experts) != e].min()) if experts > 1 else 0.0
                  for e in range(experts)]
        entries = layer_entries(scores, set(chosen), reasons, "kept: its cluster's representative (closest to the "
                                "cluster's mean weights)", "dropped: its cluster keeps a behaviourally similar expert")
        for entry in entries:
            entry["cluster"] = clusters_of[entry["expert"]]
        details[layer.index] = entries
    validate_keep(view, keep, allow_regroup=request.allow_regroup)
    record = plan_details(profile, request, kept, supers, profile_path, STUN_DOC,
                          {layer: set(experts) for layer, experts in keep.items()})
    record["stun"] = {"distance": "-coactivation / mean off-diagonal coactivation", "clustering": "greedy, closest "
                      "pair first, until the kept count of clusters", "representative": "closest to the cluster's "
                      "mean weights", "score": "the expert's largest co-activation with another expert, relative to "
                      "the layer's mean"}
    return prune_plan_record(describe_source(source), summarize(view), keep, "stun", record, details,
                             top_k=request.top_k)


__all__ = ["STUN_DOC", "coactivation_distance", "combined_coactivation", "greedy_clusters", "representative",
           "stun_plan"]
