"""The merging methods: from a profile (and, where a method reads them, the experts' weights) to a merge plan.

    plan = make_merge_plan("model-dir", profile, PlanRequest(method="hc_smoe", ratio=0.5))

Shared rules, the same as pruning's (``moekit.plan``): the budget (``ratio`` of experts removed or ``keep``
experts per layer) is the number of output experts of every layer; protected experts (super experts unless
``protect_super`` is off, and the user's list) are kept as singleton groups, nothing merged into them; with
group-limited routing each routing group keeps the same number of output experts and merging happens only
within a routing group (``allow_regroup`` lifts both). Frequencies are the profile's token counts ``|X_j|``
(every top-k slot counted, with the model's own top-k), each named set's counts divided by its tokens and
weighed by ``set_weights``; a member's merge weight is its frequency over its group's (uniform if the whole
group was never routed to). An expert never routed to (frequency 0) gets weight 0 in an average, so it is
left out of its group (dropped, as its reason says), as its zero weight would leave it out of the sum.

The router: each output expert keeps the router row (bias, correction bias) of one member, its group's
router expert (M-SMoE: the dominant; the others: the group's most frequent member), so that top-k runs
over the merged experts only and the checkpoint holds fewer experts. The reference code of MC-SMoE, HC-SMoE
and the REAP repository instead keeps all E router rows and points the members at one shared module, which
saves no memory; moekit does not.

Methods (formulas and sources: ``shared/design/METHODS.md``):

- ``m_smoe`` (MC-SMoE, Li et al. 2024): dominant experts = the most frequent (per layer, ties to the lower id);
  each other expert joins the dominant whose router-logit column is most similar (cosine over all calibration
  tokens, from the profile's ``router_logit_gram``: G_ij / sqrt(G_ii G_jj)); its neurons are aligned to the
  dominant's by weight matching (``moekit.merge.combine.align_to``); frequency-weighted average. Differences
  from the paper: the same number of groups in every layer (stock configs hold one count; MC-SMoE allocates
  groups across layers by a global frequency threshold); members aligned to their own group's dominant (as
  REAP's reproduction and the issue ask; MC-SMoE's code aligns every expert to expert 0 once).
- ``hc_smoe`` (Chen et al. 2025): expert representation = its mean output over all calibration tokens, every
  expert run on every token (``expert_output_sum``); agglomerative clustering with average linkage and
  Euclidean distance (``scipy.cluster.hierarchy``, cut to exactly the budget); frequency-weighted average.
- ``sub_moe`` (Li et al. 2025): k-means (k-means++ seeding from the request's seed) into the budget's clusters
  over the experts' unit-normalised mean outputs (so Euclidean distance orders pairs as cosine does; the
  paper's similarity is the mean per-token cosine, and its k-means feature vector is not stated, so this
  follows the REAP repository's reproduction); then the joint SVD merge (``moekit.merge.combine``): with
  ``svd_rank`` r the merged projections are projected onto the top-r left singular vectors shared by the
  cluster. At full rank (``svd_rank`` None, the default: the paper states no rank) the joint-SVD merge equals
  the frequency-weighted average exactly, so sub_moe then differs from hc_smoe only by its clustering. The
  paper's multi-layer allocation of cluster counts and its intra-expert compression (Sub-MoE†) are not done.
- ``dern`` (Zhou et al. 2025): experts dropped by router statistics (importance = mean over tokens of
  1[j in top-k] g_{t,j}, the profile's ``gate_sum``; the most important kept); each dropped expert is split
  into neuron segments (gate row, up row, down column); a segment goes to the kept expert holding the neuron
  most similar to it (cosine of the [up row; down column] features, in float32) if that cosine exceeds ``threshold``
  (default 0.6), else it is discarded; there it is averaged into that neuron, weighted by its source expert's
  importance, so the kept expert keeps the stock width. DERN's method section could not be read here (only
  its abstract and secondary summaries): its width restoration is an iterated weighted spherical k-means over
  all segments, of which moekit does the assignment step with the kept expert's own neurons as the centres;
  the threshold and the feature choice follow the summaries and are unverified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.arch.experts import ExpertWeights
from moekit.arch.view import MoELayer, MoEModelView
from moekit.edit.keep import PlanError
from moekit.merge.card import merge_plan_record
from moekit.merge.combine import align_to
from moekit.merge.groups import Group, Member, ordered
from moekit.plan import PlanRequest, kept_count, plan_details, protections, routing_groups, set_weights_of
from moekit.profile.profile_file import Profile
from moekit.score.criteria import layer_stats
from moekit.summary import summarize

DERN_THRESHOLD = 0.6


def method_options(method: str, svd_rank: int | None, threshold: float) -> dict[str, Any]:
    """The request's ``extra`` for ``method``: sub_moe's SVD rank, dern's threshold, nothing for the others (one
    place for moekit merge's options and a recipe's merge: step)."""
    return {"svd_rank": svd_rank} if method == "sub_moe" else {"threshold": threshold} if method == "dern" else {}


@dataclass(frozen=True)
class MergeMethod:
    """One merging method: the profile statistics it reads, whether it reads the experts' weights, its grouping."""

    name: str
    reads: tuple[str, ...]
    weights: bool
    doc: str


MERGE_METHODS = {
    "m_smoe": MergeMethod("m_smoe", ("count", "router_logit_gram"), True,
                          "M-SMoE (MC-SMoE): most frequent experts dominant, the others grouped by router-logit "
                          "cosine, neurons aligned by weight matching, frequency-weighted average."),
    "hc_smoe": MergeMethod("hc_smoe", ("count", "expert_output_sum"), False,
                           "HC-SMoE: average-linkage hierarchical clustering of the experts' mean outputs over all "
                           "tokens, frequency-weighted average."),
    "sub_moe": MergeMethod("sub_moe", ("count", "expert_output_sum"), False,
                           "Sub-MoE: k-means of the experts' normalised mean outputs, joint-SVD merge of each "
                           "cluster (at full rank: the frequency-weighted average)."),
    "dern": MergeMethod("dern", ("gate_sum",), True,
                        "DERN: drop the experts of lowest router importance, move each of their neurons into the "
                        "most similar neuron of a kept expert (cosine above a threshold), average it there."),
}


@dataclass
class Budget:
    """One layer's candidates and quotas: the experts the method may group (not protected), split by routing group."""

    blocks: list[list[int]]  # candidate experts per routing block
    quotas: list[int]  # output experts each block's candidates make
    protected: dict[int, str]  # expert -> reason (kept alone)


def layer_budget(view: MoEModelView, kept: int, groups: int, protected: dict[int, str], layer: int) -> Budget:
    size = view.num_experts // groups
    blocks, quotas = [], []
    for block in range(groups):
        members = list(range(block * size, (block + 1) * size))
        must = [e for e in members if e in protected]
        quota = kept // groups - len(must)
        if quota < 0 or (quota == 0 and len(must) < len(members)):
            where = f"routing group {block} of layer {layer}" if groups > 1 else f"layer {layer}"
            raise PlanError(f"{where} has {len(must)} protected experts ({sorted(must)}) but keeps only "
                            f"{kept // groups}; merge fewer experts, protect fewer, or pass --no-protect-super")
        blocks.append([e for e in members if e not in protected])
        quotas.append(quota)
    return Budget(blocks, quotas, protected)


def _frequency_group(members: list[int], frequency: torch.Tensor) -> tuple[int, list[int], list[float]]:
    """(router expert, members kept in the average, their weights) of one cluster: the most frequent member routes;
    weights by frequency, members of frequency 0 left out (all of them, uniformly weighted, if none was routed to)."""
    router = max(members, key=lambda e: (float(frequency[e]), -e))
    total = sum(float(frequency[e]) for e in members)
    if total <= 0:
        return router, sorted(members), [1.0 / len(members)] * len(members)
    used = [e for e in members if float(frequency[e]) > 0]
    return router, used, [float(frequency[e]) / total for e in used]


def _normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    shares = [w / total for w in weights]
    shares[-1] = 1.0 - sum(shares[:-1])  # exactly 1 in floating point, as the plan reader checks to 1e-9
    return shares


class LayerPlan:
    """The groups of one layer as they are decided, and each expert's reason."""

    def __init__(self, num_experts: int, scores: list[float]) -> None:
        self.groups: list[Group] = []
        self.reasons: dict[int, str] = {}
        self.scores = scores
        self.num_experts = num_experts

    def add(self, router: int, members: list[Member], why_router: str, why_member: Callable[[Member], str]) -> None:
        shares = _normalised([m.weight for m in members])
        members = [Member(m.expert, share, m.neurons) for m, share in zip(members, shares, strict=True)]
        self.groups.append(Group(router, tuple(sorted(members, key=lambda m: (m.expert != router, m.expert)))))
        for member in members:
            if member.expert == router:
                self.reasons[router] = why_router
            elif member.expert not in self.reasons:
                self.reasons[member.expert] = why_member(member)

    def entries(self) -> list[dict[str, Any]]:
        ordered_groups = ordered(self.groups)
        into = {g.router: o for o, g in enumerate(ordered_groups)}
        rank = {e: r + 1 for r, e in enumerate(sorted(range(self.num_experts), key=lambda j: (-self.scores[j], j)))}
        out = []
        for expert in range(self.num_experts):
            homes = [(o, g) for o, g in enumerate(ordered_groups) if expert in g.experts]
            decision = "keep" if expert in into else ("merge" if homes else "drop")
            reason = self.reasons.get(expert, "dropped: in no group")
            out.append({"expert": expert, "score": self.scores[expert], "rank": rank[expert], "decision": decision,
                        "reason": reason.format(into=homes[0][0] if homes else -1,
                                                **({"self": into[expert]} if expert in into else {}))})
        return out


def _stats(profile: Profile, layer: int, request: PlanRequest, reads: tuple[str, ...]) -> dict[str, torch.Tensor]:
    stats = layer_stats(profile, layer, set_weights_of(profile, request), request.seed, reads=reads)
    return {name: stats.get(name) for name in reads}


def _protect(plan: LayerPlan, protected: dict[int, str]) -> None:
    for expert, why in sorted(protected.items()):
        plan.add(expert, [Member(expert, 1.0)], f"kept alone as output expert {{self}}, {why}", lambda m: "")


def _m_smoe(layer: MoELayer, stats: dict[str, torch.Tensor], budget: Budget, weights: WeightsOf) -> LayerPlan:
    frequency, gram = stats["count"], stats["router_logit_gram"]
    diag = gram.diagonal().clamp(min=1e-300).sqrt()
    cosine = gram / (diag[:, None] * diag[None, :])
    plan = LayerPlan(layer.num_experts, [float(f) for f in frequency])
    _protect(plan, budget.protected)
    for candidates, quota in zip(budget.blocks, budget.quotas, strict=True):
        if quota == 0:
            continue
        by_usage = sorted(candidates, key=lambda e: (-float(frequency[e]), e))
        dominants = by_usage[:quota]
        members: dict[int, list[int]] = {d: [d] for d in dominants}
        for expert in by_usage[quota:]:
            best = max(dominants, key=lambda d: (float(cosine[expert, d]), float(frequency[d]), -d))
            members[best].append(expert)
        for rank, dominant in enumerate(dominants):
            group = members[dominant]
            total = sum(float(frequency[e]) for e in group)
            reference = weights(dominant)
            chosen = []
            for expert in group:
                share = float(frequency[expert]) / total if total > 0 else 1.0 / len(group)
                if share <= 0:
                    plan.reasons[expert] = (f"dropped: never routed to on the calibration data (frequency weight 0 "
                                            f"in its group, router-logit cosine {float(cosine[expert, dominant]):.2f} "
                                            f"to dominant {dominant})")
                    continue
                neurons = None if expert == dominant else tuple(align_to(reference, weights(expert)))
                chosen.append(Member(expert, share, neurons))
            plan.add(dominant, chosen,
                     f"dominant (frequency rank {rank + 1} among the merged experts): output expert {{self}}, "
                     f"keeps its router row; {len(group)} experts in its group",
                     lambda m, d=dominant: f"merged into output expert {{into}} (dominant {d}) with weight "
                                           f"{m.weight:.2f}: router-logit cosine {float(cosine[m.expert, d]):.2f}; "
                                           f"neurons aligned to {d}'s by weight matching")
    return plan


def _clustered(layer: MoELayer, frequency: torch.Tensor, budget: Budget, cluster: Callable[[list[int], int],
               list[list[int]]], describe: Callable[[int, list[int]], str],
               reconstruct: dict[str, Any] | None = None) -> LayerPlan:
    plan = LayerPlan(layer.num_experts, [float(f) for f in frequency])
    _protect(plan, budget.protected)
    for candidates, quota in zip(budget.blocks, budget.quotas, strict=True):
        if quota == 0:
            continue
        for cluster_members in cluster(candidates, quota):
            router, members, shares = _frequency_group(cluster_members, frequency)
            for expert in cluster_members:
                if expert not in members:
                    plan.reasons[expert] = "dropped: never routed to on the calibration data (frequency weight 0)"
            group_members = [Member(e, w) for e, w in zip(members, shares, strict=True)]
            plan.add(router, group_members,
                     f"output expert {{self}}: the most frequent of its cluster of {len(cluster_members)}, keeps its "
                     f"router row; {describe(router, cluster_members)}",
                     lambda m, r=router, ms=cluster_members: f"merged into output expert {{into}} (router expert {r}) "
                                                             f"with weight {m.weight:.2f}: {describe(m.expert, ms)}")
        if reconstruct is not None:
            plan.groups = [Group(g.router, g.members, reconstruct if len(g.members) > 1 else None)
                           for g in plan.groups]
    return plan


def _hierarchical(points: torch.Tensor) -> Callable[[list[int], int], list[list[int]]]:
    def cluster(candidates: list[int], quota: int) -> list[list[int]]:
        if quota >= len(candidates):
            return [[e] for e in candidates]
        if quota == 1:
            return [list(candidates)]
        from scipy.cluster.hierarchy import cut_tree, linkage

        tree = linkage(points[candidates].numpy(), method="average", metric="euclidean")
        labels = cut_tree(tree, n_clusters=[quota]).reshape(-1)
        return _by_label(candidates, [int(x) for x in labels])
    return cluster


def _by_label(candidates: list[int], labels: list[int]) -> list[list[int]]:
    clusters: dict[int, list[int]] = {}
    for expert, label in zip(candidates, labels, strict=True):
        clusters.setdefault(label, []).append(expert)
    return sorted(clusters.values(), key=min)


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 100) -> list[int]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007) into exactly ``k`` non-empty clusters: an
    emptied cluster takes the point farthest from its centre (as scikit-learn does). Written here because scipy's
    ``kmeans2`` may return empty clusters and scikit-learn is not a dependency."""
    generator = torch.Generator().manual_seed(seed)
    x = points.double()
    n = x.shape[0]
    centres = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, k):
        d2 = torch.cdist(x, x[centres]).min(dim=1).values.square()
        if float(d2.sum()) <= 0:
            rest = [i for i in range(n) if i not in centres]
            centres.append(rest[0])
            continue
        centres.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=generator)))
    centre = x[centres].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):  # a few whole-tensor operations per step (no loop over clusters)
        distance = torch.cdist(x, centre)
        new = distance.argmin(dim=1)
        own = distance.gather(1, new[:, None]).squeeze(1).clone()
        sizes = torch.bincount(new, minlength=k)
        for c in (sizes == 0).nonzero().flatten().tolist():  # refill an emptied cluster with the point farthest
            movable = sizes[new] > 1                          # from its centre, of a cluster of 2+
            far = int(own.masked_fill(~movable, -torch.inf).argmax())
            sizes[new[far]] -= 1
            sizes[c] += 1
            new[far], own[far] = c, -torch.inf
        if torch.equal(new, labels):
            break
        labels = new
        centre = torch.zeros_like(centre).index_add_(0, labels, x) / sizes[:, None].to(x.dtype)
    return [int(v) for v in labels]


def _kmeans(points: torch.Tensor, seed: int) -> Callable[[list[int], int], list[list[int]]]:
    def cluster(candidates: list[int], quota: int) -> list[list[int]]:
        if quota >= len(candidates):
            return [[e] for e in candidates]
        return _by_label(candidates, kmeans(points[candidates], quota, seed))
    return cluster


def _dern(layer: MoELayer, stats: dict[str, torch.Tensor], budget: Budget, weights: WeightsOf,
          threshold: float, device: str = "cpu") -> LayerPlan:
    importance = stats["gate_sum"]
    plan = LayerPlan(layer.num_experts, [float(s) for s in importance])
    _protect(plan, budget.protected)
    kept: list[int] = sorted(budget.protected)
    dropped: list[int] = []
    for candidates, quota in zip(budget.blocks, budget.quotas, strict=True):
        order = sorted(candidates, key=lambda e: (-float(importance[e]), e))
        kept += order[:quota]
        dropped += order[quota:]
    chosen = [e for e in kept if e not in budget.protected]
    features = {e: _segment_features(weights(e)) for e in chosen + dropped}
    size = layer.intermediate_size
    spec = layer.routing
    block = layer.num_experts // spec.n_group if spec.group_limited else layer.num_experts
    sent: dict[int, dict[int, list[int]]] = {k: {} for k in chosen}  # kept -> dropped -> neuron map
    best_cos: dict[int, list[float]] = {}
    pool_targets: list[int] | None = None  # the kept experts whose neurons ``pool`` holds
    pool = torch.empty(0)
    for d in dropped:
        targets = [k for k in chosen if k // block == d // block] or chosen
        if not targets:
            plan.reasons[d] = "dropped: no unprotected kept expert to receive its neurons"
            continue
        if targets != pool_targets:  # every kept neuron's features, [len(targets)*I, F], on the similarity device
            pool_targets, pool = targets, torch.cat([features[k] for k in targets]).to(device, torch.float32)
        cos = features[d].to(device, torch.float32) @ pool.T  # [I, len*I]
        value, where = (t.cpu() for t in cos.max(dim=1))
        best_cos[d] = [float(v) for v in value]
        for n in range(size):
            if float(value[n]) > threshold:
                k, m = targets[int(where[n]) // size], int(where[n]) % size
                sent[k].setdefault(d, [-1] * size)[n] = m
    rank = {e: r + 1 for r, e in enumerate(sorted(range(layer.num_experts), key=lambda j: (-float(importance[j]), j)))}
    for k in chosen:
        members = [Member(k, float(importance[k]) or 1e-12)]
        for d, neurons in sorted(sent[k].items()):
            members.append(Member(d, float(importance[d]) or 1e-12, tuple(neurons)))
        moved = sum(1 for neurons in sent[k].values() for n in neurons if n >= 0)
        plan.add(k, members, f"kept (importance rank {rank[k]}): output expert {{self}}; receives {moved} neurons "
                 f"of {len(sent[k])} dropped experts", lambda m: "")
    for d in dropped:
        homes = {k: sum(1 for n in sent[k][d] if n >= 0) for k in chosen if d in sent[k]}
        total = sum(homes.values())
        spread = ", ".join(f"{count} to {k}" for k, count in sorted(homes.items()))
        plan.reasons[d] = (f"dropped by importance; {total} of its {size} neurons merged into kept experts "
                           f"(cosine > {threshold:g}: {spread or 'none'}), the rest discarded"
                           + (f"; best neuron cosine median {sorted(best_cos[d])[size // 2]:.2f}"
                              if d in best_cos else ""))
    return plan


def _segment_features(w: ExpertWeights) -> torch.Tensor:
    """Each neuron's [up row; down column], unit-normalised (DERN's segment similarity, gate left out)."""
    features = torch.cat([w.up.detach().double(), w.down.detach().double().T], dim=1)
    return features / features.norm(dim=1, keepdim=True).clamp(min=1e-300)


WeightsOf = Callable[[int], ExpertWeights]


def _layers_with_weights(source: str | Path, view: MoEModelView, needed: bool) -> Iterator[tuple[MoELayer, Any]]:
    """Each MoE layer of ``view`` with a reader of its experts' weights (None when not ``needed``)."""
    if not needed:
        for layer in view.layers:
            yield layer, None
        return
    from moekit.layerwise import layers_with_expert_weights

    yield from layers_with_expert_weights(source, view)


def make_merge_plan(source: str | Path, view: MoEModelView, profile: Profile, request: PlanRequest,
                    profile_path: str | None = None, source_name: str | None = None,
                    progress: bool = False, device: str = "cpu") -> dict[str, Any]:
    """The merge plan record of ``request.method`` (a key of ``MERGE_METHODS``) for the model at ``source``.

    ``device``: where dern computes its neuron cosines (every dropped neuron against every kept neuron of the
    layer: (E-K)·I x K·I dot products of length 2H, ~20 TFLOP per Qwen3-30B-A3B layer at 50%; float32); "auto"
    means the first GPU. The weights are read on the CPU, one decoder layer at a time."""
    from tqdm.auto import tqdm

    if request.method not in MERGE_METHODS:
        raise PlanError(f"unknown merging method {request.method!r}; valid: {', '.join(sorted(MERGE_METHODS))}")
    method = MERGE_METHODS[request.method]
    profile.check_model(view)
    kept = kept_count(view.num_experts, request)
    supers, protected = protections(view, profile, request)
    blocks = routing_groups(view, kept, request.allow_regroup)
    threshold = float(request.extra.get("threshold", DERN_THRESHOLD))
    if not -1.0 <= threshold < 1.0:
        raise PlanError(f"--threshold {threshold:g} is a cosine: give a value from -1 up to (not including) 1")
    svd_rank = request.extra.get("svd_rank")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise PlanError(f"--svd-rank {svd_rank!r} must be a positive integer (the rank each merged projection is "
                        "rebuilt at)")
    reconstruct = {"method": "joint_svd", "rank": int(svd_rank)} if svd_rank is not None else None
    groups: dict[int, list[Group]] = {}
    details: dict[int, list[dict[str, Any]]] = {}
    layers = _layers_with_weights(source, view, method.weights)
    for layer, weights in tqdm(layers, total=len(view.layers), desc=f"{request.method} plan", unit="layer",
                               disable=not progress):
        stats = _stats(profile, layer.index, request, method.reads)
        budget = layer_budget(view, kept, blocks, {e: why for (i, e), why in protected.items() if i == layer.index},
                              layer.index)
        if request.method == "m_smoe":
            plan = _m_smoe(layer, stats, budget, weights)
        elif request.method == "dern":
            plan = _dern(layer, stats, budget, weights, threshold, "cuda" if device == "auto" else device)
        else:
            outputs = stats["expert_output_sum"]
            if request.method == "hc_smoe":
                cluster = _hierarchical(outputs)

                def describe(e: int, members: list[int], o: torch.Tensor = outputs) -> str:
                    centre = o[members].mean(0)
                    return f"mean-output distance {float((o[e] - centre).norm()):.3g} to its cluster's centre"
            else:
                unit = outputs / outputs.norm(dim=1, keepdim=True).clamp(min=1e-300)
                cluster = _kmeans(unit, request.seed)

                def describe(e: int, members: list[int], u: torch.Tensor = unit) -> str:
                    centre = u[members].mean(0)
                    cosine = float(u[e] @ centre / centre.norm().clamp(min=1e-300))
                    return f"mean-output cosine {cosine:.2f} to its cluster's centre"
            plan = _clustered(layer, stats["count"], budget, cluster, describe, reconstruct)
        if len(plan.groups) != kept:
            raise PlanError(f"layer {layer.index}: {request.method} made {len(plan.groups)} groups, not {kept}")
        groups[layer.index] = ordered(plan.groups)
        details[layer.index] = plan.entries()
    intact = {layer: {g.router for g in layer_groups if g.is_copy} for layer, layer_groups in groups.items()}
    record = plan_details(profile, request, kept, supers, profile_path, method.doc, intact)
    record["merge"] = {"router": "each output expert keeps its router expert's row",
                       **({"threshold": threshold} if request.method == "dern" else {}),
                       **({"svd_rank": svd_rank} if request.method == "sub_moe" else {})}
    return merge_plan_record(source_name or profile.meta["model"].get("source", ""), summarize(view), groups,
                             request.method, record, details, top_k=request.top_k)
