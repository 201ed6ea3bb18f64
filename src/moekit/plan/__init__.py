"""Pruning plans: which experts each MoE layer keeps, from scores, protections and a budget, and why.

    request = PlanRequest(method="reap", ratio=0.5)
    plan = make_prune_plan(view, profile, request)      # a JSON-ready dict, same inputs -> same bytes
    keep = plan_keep_map(plan)                          # {layer: kept expert ids}

Rules, per MoE layer (every layer keeps the same number, as stock configs need):

- the budget: ``ratio`` = fraction of experts removed (E * ratio rounded half up), or ``keep`` = experts kept;
- protected experts are kept first: super experts (``moekit.profile.analyze.super_experts``) unless
  ``protect_super`` is off, the user's ``protect`` list ((layer, expert) pairs), and with ``protect_contrast``
  (A, B, N) the N experts of every layer that set A routes to most more than set B (``moekit.profile.contrast``);
- the rest are kept by score, highest first; ties go to the lower expert id;
- group-limited routers (``n_group > 1``): the same number is kept in every group (each group's
  best), unless ``allow_regroup``, so routing groups stay intact.

Every expert's entry says its score, its rank in the layer and the reason for the decision.

The contrast audit: a plan made from a profile with both a ``harmful`` and a ``harmless`` set (or with
``protect_contrast``) records, in ``details.contrast_audits``, which of the top experts of that contrast (top-k of
the model per layer, or N) it removes or merges; the command line warns and the card says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moekit.arch.routing import router_scoring
from moekit.arch.view import MoEModelView
from moekit.edit.card import prune_plan_record
from moekit.edit.keep import KeepMap, PlanError, parse_keep, validate_keep
from moekit.profile.analyze import super_experts
from moekit.profile.profile_file import Profile
from moekit.score.criteria import CRITERIA, check_set_weights, layer_stats
from moekit.summary import summarize


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for. Exactly one of ``ratio`` (fraction removed) and ``keep`` (experts kept)."""

    method: str
    ratio: float | None = None
    keep: int | None = None
    protect_super: bool = True
    protect: tuple[tuple[int, int], ...] = ()
    set_weights: dict[str, float] | None = None
    seed: int = 0
    top_k: int | None = None
    allow_regroup: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    protect_contrast: tuple[str, str, int] | None = None  # (set A, set B, experts kept per layer)


# The two named sets of a safety contrast: every plan from a profile that has both is audited against it.
SAFETY_CONTRAST = ("harmful", "harmless")


def parse_protect_contrast(text: str | None) -> tuple[str, str, int] | None:
    """``"harmful:harmless:4"`` -> ("harmful", "harmless", 4)."""
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip() for p in parts[:2]) or not parts[2].strip().isdigit() or \
            int(parts[2]) < 1:
        raise PlanError(f"--protect-contrast {text!r}: expected SET_A:SET_B:N (the N experts per layer that set A "
                        "routes to most more than set B are kept), e.g. harmful:harmless:4")
    return parts[0].strip(), parts[1].strip(), int(parts[2])


def contrast_protections(view: MoEModelView, profile: Profile, request: PlanRequest) -> dict[tuple[int, int], str]:
    """{(layer, expert): reason} of ``request.protect_contrast`` (checked: sets in the profile, N below E)."""
    if request.protect_contrast is None:
        return {}
    from moekit.profile.contrast import check_contrast_sets, top_contrast_experts

    a, b, per_layer = request.protect_contrast
    check_contrast_sets(profile, a, b)
    if per_layer >= view.num_experts:
        raise PlanError(f"--protect-contrast {a}:{b}:{per_layer} would protect every expert of a layer (it has "
                        f"{view.num_experts}): give fewer")
    why = f"protected: one of the {per_layer} experts of its layer that {a!r} routes to most more than {b!r}"
    return {(layer, e): why for layer, experts in top_contrast_experts(profile, a, b, per_layer).items()
            for e in experts}


def contrast_audits(profile: Profile, request: PlanRequest, intact: dict[int, set[int]],
                    top_k: int) -> list[dict[str, Any]]:
    """For the profile's safety contrast (``SAFETY_CONTRAST``, top ``top_k`` per layer) and the requested
    ``protect_contrast``: which of the contrast's top experts the plan does not leave ``intact`` (removed, or
    merged with others)."""
    from moekit.profile.contrast import top_contrast_experts

    wanted = []
    if request.protect_contrast is not None:
        wanted.append(request.protect_contrast)
    if all(name in profile.set_names for name in SAFETY_CONTRAST) and \
            not any((a, b) == SAFETY_CONTRAST for a, b, _ in wanted):
        wanted.append((*SAFETY_CONTRAST, top_k))
    audits = []
    for a, b, per_layer in wanted:
        top = top_contrast_experts(profile, a, b, per_layer)
        lost = [[layer, e] for layer, experts in top.items() for e in experts if e not in intact.get(layer, set())]
        audits.append({"a": a, "b": b, "per_layer": per_layer, "top_experts": {str(k): v for k, v in top.items()},
                       "not_kept": lost, "not_kept_count": len(lost),
                       "of": sum(len(v) for v in top.values())})
    return audits


def audit_warnings(plan: dict[str, Any]) -> list[str]:
    """One sentence per contrast audit of ``plan`` that loses some of the contrast's top experts."""
    out = []
    for audit in (plan.get("details") or {}).get("contrast_audits", []):
        if not audit["not_kept_count"]:
            continue
        shown = ", ".join(f"{layer}:{e}" for layer, e in audit["not_kept"][:8])
        more = f" and {audit['not_kept_count'] - 8} more" if audit["not_kept_count"] > 8 else ""
        out.append(f"this plan removes or merges {audit['not_kept_count']} of the {audit['of']} experts that "
                   f"{audit['a']!r} routes to most more than {audit['b']!r} (top {audit['per_layer']} per layer; "
                   f"layer:expert {shown}{more}); keep them with --protect-contrast "
                   f"{audit['a']}:{audit['b']}:{audit['per_layer']}")
    return out


def parse_protect(text: str | None) -> tuple[tuple[int, int], ...]:
    """``"3:17,5:2"`` (LAYER:EXPERT pairs) -> ((3, 17), (5, 2))."""
    if not text:
        return ()
    pairs = []
    for part in text.split(","):
        layer, sep, expert = part.strip().partition(":")
        if not sep or not layer.strip().isdigit() or not expert.strip().isdigit():
            raise PlanError(f"--protect {text!r}: expected LAYER:EXPERT pairs separated by commas, e.g. 3:17,5:2")
        pairs.append((int(layer), int(expert)))
    return tuple(sorted(set(pairs)))


def kept_count(num_experts: int, request: PlanRequest) -> int:
    """Experts every layer keeps under the request's budget (checked)."""
    if (request.ratio is None) == (request.keep is None):
        raise PlanError("give the budget as exactly one of --ratio (fraction of experts removed) or --keep N")
    if request.ratio is not None:
        if not 0 < request.ratio < 1:
            raise PlanError(f"--ratio {request.ratio} must be strictly between 0 and 1 (the fraction of experts "
                            "removed, e.g. 0.5)")
        kept = num_experts - math.floor(num_experts * request.ratio + 0.5)  # removed: E * ratio, half up
        if kept == num_experts:
            raise PlanError(f"--ratio {request.ratio} removes no expert out of {num_experts}; raise it")
        return kept
    assert request.keep is not None
    if not 1 <= request.keep < num_experts:
        raise PlanError(f"--keep {request.keep} must be at least 1 and below the {num_experts} experts per layer")
    return request.keep


def _rank(scores: list[float]) -> list[int]:
    """Expert ids best first (higher score first, then lower id)."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def set_weights_of(profile: Profile, request: PlanRequest) -> dict[str, float]:
    """The request's weight per named set (checked: the profile's sets, finite, >= 0, one positive); every set
    weight 1 when it gives none."""
    if request.set_weights is None:
        return {name: 1.0 for name in profile.set_names}
    return check_set_weights(request.set_weights, profile.set_names)


def check_protect(view: MoEModelView, protect: tuple[tuple[int, int], ...]) -> None:
    """Every protected (layer, expert) pair names an expert of an MoE layer of the model."""
    moe_layers = {layer.index for layer in view.layers}
    for layer_index, expert in protect:
        if layer_index not in moe_layers or not 0 <= expert < view.num_experts:
            raise PlanError(f"--protect {layer_index}:{expert} names no expert of this model (MoE layers "
                            f"{sorted(moe_layers)}, experts 0..{view.num_experts - 1})")


def protections(view: MoEModelView, profile: Profile, request: PlanRequest) -> tuple[set[tuple[int, int]], dict]:
    """(super experts to protect, {(layer, expert): reason}) after checking the user's list."""
    weights = set_weights_of(profile, request)
    supers = {(s.layer, s.expert) for s in super_experts(profile, [n for n, w in weights.items() if w > 0])} \
        if request.protect_super else set()
    check_protect(view, request.protect)
    reasons = {pair: "protected: super expert (extreme down-projection activation)" for pair in supers}
    reasons.update(contrast_protections(view, profile, request))
    reasons.update({pair: "protected: named by the user" for pair in request.protect})
    return supers, reasons


def routing_groups(view: MoEModelView, kept: int, allow_regroup: bool) -> int:
    """Groups whose sizes must stay equal (1 unless group-limited routing without --allow-regroup)."""
    spec = view.layers[0].routing
    groups = spec.n_group if spec.group_limited and not allow_regroup else 1
    if kept % groups:
        raise PlanError(f"group-limited routing with n_group={groups}: keep a multiple of {groups} experts per "
                        f"layer (asked for {kept}), or pass --allow-regroup")
    return groups


def layer_entries(scores: list[float], chosen: set[int], reasons: dict[int, str], why_kept: str,
                  why_dropped: str) -> list[dict[str, Any]]:
    """One record per expert: score, rank, decision and reason (``{rank}`` / ``{experts}`` filled in)."""
    rank = {expert: position + 1 for position, expert in enumerate(_rank(scores))}
    entries = []
    for expert, score in enumerate(scores):
        template = reasons.get(expert) or (why_kept if expert in chosen else why_dropped)
        entries.append({"expert": expert, "score": score, "rank": rank[expert],
                        "decision": "keep" if expert in chosen else "drop",
                        "reason": template.format(rank=rank[expert], experts=len(scores))})
    return entries


def plan_details(profile: Profile, request: PlanRequest, kept: int, supers: set[tuple[int, int]],
                 profile_path: str | None, criterion_doc: str,
                 intact: dict[int, set[int]] | None = None) -> dict[str, Any]:
    """The plan's ``details``; ``intact``: the experts each layer leaves as they are (for the contrast audits)."""
    weights = set_weights_of(profile, request)
    contrast = {}
    if request.protect_contrast is not None:
        a, b, per_layer = request.protect_contrast
        from moekit.profile.contrast import top_contrast_experts

        contrast = {"contrast": sorted([layer, e] for layer, experts in
                                       top_contrast_experts(profile, a, b, per_layer).items() for e in experts),
                    "contrast_sets": {"a": a, "b": b, "per_layer": per_layer}}
    audits = contrast_audits(profile, request, intact, int(profile.fingerprint["top_k"])) if intact is not None \
        else []
    return {
        "criterion": request.method, "criterion_doc": " ".join(criterion_doc.split()),
        "ratio": request.ratio, "keep": request.keep, "kept_per_layer": kept,
        "set_weights": weights, "seed": request.seed,
        "protections": {"super_experts": sorted([list(p) for p in supers]),
                        "user": [list(p) for p in request.protect], "protect_super": request.protect_super,
                        **contrast},
        **({"contrast_audits": audits} if audits else {}),
        "profile": {"path": profile_path, "sets": [{"name": s["name"], "tokens": s["tokens"], "data": s["data"]}
                                                   for s in profile.meta["sets"]],
                    "fingerprint": profile.fingerprint},
        "allow_regroup": request.allow_regroup, **request.extra,
    }


def check_router_probabilities(view: MoEModelView, profile: Profile, method: str) -> None:
    """``router_mass`` needs the family's own router probabilities; profiles written before moekit recorded them
    (no ``router_probabilities`` in profile.json) summed softmax probabilities even for sigmoid-scored routers."""
    if method != "router_mass" or "router_probabilities" in profile.meta:
        return
    sigmoid = [layer.index for layer in view.layers if router_scoring(layer.routing) == "sigmoid"]
    if sigmoid:
        raise PlanError(f"this profile was written by an older moekit, which summed softmax probabilities for "
                        f"{view.model_type}'s sigmoid-scored router; router_mass needs the sigmoid scores: profile "
                        "the model again (the other criteria can use this profile)")


def make_prune_plan(view: MoEModelView, profile: Profile, request: PlanRequest,
                    profile_path: str | None = None, source: str | None = None) -> dict[str, Any]:
    """A complete, deterministic plan record (``moekit_plan.json``) for ``request`` on ``view``'s model."""
    profile.check_model(view)
    criterion = CRITERIA.get(request.method)
    check_router_probabilities(view, profile, request.method)
    kept = kept_count(view.num_experts, request)
    supers, protected = protections(view, profile, request)
    groups = routing_groups(view, kept, request.allow_regroup)
    weights = set_weights_of(profile, request)
    in_group = " within its group" if groups > 1 else ""
    keep: KeepMap = {}
    details: dict[int, list[dict[str, Any]]] = {}
    for layer in view.layers:
        stats = layer_stats(profile, layer.index, weights, request.seed, reads=criterion.reads)
        scores = [float(s) for s in criterion(stats)]
        reasons = {e: why for (i, e), why in protected.items() if i == layer.index}
        chosen = _choose(_rank(scores), reasons, kept, view.num_experts, groups, layer.index)
        keep[layer.index] = sorted(chosen)
        details[layer.index] = layer_entries(scores, chosen, reasons, "score rank {rank} of {experts}" + in_group,
                                             "score rank {rank} of {experts}: below the cut" + in_group)
    validate_keep(view, keep, allow_regroup=request.allow_regroup)
    record = plan_details(profile, request, kept, supers, profile_path, criterion.doc,
                          {layer: set(experts) for layer, experts in keep.items()})
    return prune_plan_record(source or profile.meta["model"].get("source", ""), summarize(view), keep,
                             request.method, record, details, top_k=request.top_k)


def _choose(order: list[int], protected: dict[int, str], kept: int, num_experts: int, groups: int,
            layer: int) -> set[int]:
    """Protected experts first, then by rank; with groups, the same number from every group."""
    size = num_experts // groups
    quota = kept // groups
    chosen: set[int] = set()
    for group in range(groups):
        members = [e for e in order if e // size == group] if groups > 1 else order
        must = [e for e in members if e in protected]
        if len(must) > quota:
            where = f"group {group} of layer {layer}" if groups > 1 else f"layer {layer}"
            raise PlanError(f"{where} has {len(must)} protected experts ({sorted(must)}) but keeps only {quota}; "
                            "remove fewer experts, protect fewer, or pass --no-protect-super")
        chosen.update(must)
        chosen.update([e for e in members if e not in protected][: quota - len(must)])
    return chosen


def plan_keep_map(plan: dict[str, Any]) -> KeepMap:
    """The experts a plan record (or a plain keep map) keeps per layer; checks what needs no model
    (``moekit.plan.check.checked_plan`` checks a record against the model)."""
    return parse_keep(plan, origin="plan")


def plan_top_k(plan: dict[str, Any]) -> int | None:
    """The plan's new experts-per-token count, or None if it keeps the model's (no ``top_k``, or after = before)."""
    top_k = plan.get("top_k")
    if top_k is None:
        return None
    after, before = (top_k.get("after"), top_k.get("before")) if isinstance(top_k, dict) else (None, None)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (after, before)):
        raise PlanError(f"plan: 'top_k' must be {{\"before\": int, \"after\": int}} (experts per token), got {top_k!r}")
    return None if after == before else after
