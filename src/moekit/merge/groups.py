"""Merge plans: per MoE layer, groups of source experts, each group becoming one output expert.

A merge plan (``moekit_plan.json``, format ``MERGE_PLAN_FORMAT``) is a pruning plan whose layers also say
what goes into each kept slot::

    "layers": {"0": {"kept": [1, 4], "removed": [0, 2, 3, 5],
                     "groups": [{"into": 0, "router": 1, "members": [
                                    {"expert": 1, "weight": 0.6},
                                    {"expert": 3, "weight": 0.4, "neurons": [2, 0, 1, ...]}]},
                                {"into": 1, "router": 4, "members": [...]}],
                     "experts": [... per-expert reasons ...]}}

- ``kept`` lists each group's ``router`` expert (ascending): the output expert ``into`` = o takes the
  router row (router bias, correction bias) of the o-th kept expert, and its slot, exactly as pruning
  keeps it; ``removed`` is every other expert. So a plan of singleton groups *is* the pruning plan of
  its ``kept`` lists, and is applied byte for byte as one.
- an expert in no group is dropped (pruning's fate); an expert is in one group, or, with ``neurons`` maps that
  send disjoint parts of it, in several (DERN);
- a group's weights are the members' shares (positive, summing to 1 to 1e-9);
- ``neurons`` (optional): for each of the member's I neurons (gate row, up row, down column), the output
  neuron it is averaged into, or -1 to leave it out (``M-SMoE``'s permutation alignment, ``DERN``'s segment
  reassignment). Without it, neuron n goes into output neuron n. Output neuron m is the weighted average
  of the neurons sent to it, each weighted by its member's weight (renormalised over those neurons); every
  output neuron must receive at least one. Down-projection biases are averaged with the member weights;
- ``reconstruct`` (optional): ``{"method": "joint_svd", "rank": r}`` (Sub-MoE): the group's averaged
  projections are replaced by their projection onto the top-r left singular vectors of the members'
  concatenated projections (``moekit.merge.combine``).

Each layer has the same number of groups (stock configs hold one expert count), and a group-limited router's
groups stay whole (``check_groups``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moekit.arch.view import MoEModelView
from moekit.edit.card import MERGE_PLAN_FORMAT
from moekit.edit.keep import KeepMap, PlanError

__all__ = ["MERGE_PLAN_FORMAT", "Group", "GroupMap", "Member", "check_groups", "check_neuron_maps", "keep_of",
           "ordered", "parse_groups", "singleton_groups"]

RECONSTRUCTIONS = ("joint_svd",)


@dataclass(frozen=True)
class Member:
    """One source expert of a group: its share and, optionally, where each of its neurons goes."""

    expert: int
    weight: float
    neurons: tuple[int, ...] | None = None  # output neuron of each source neuron, -1: left out

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"expert": self.expert, "weight": self.weight}
        if self.neurons is not None:
            out["neurons"] = list(self.neurons)
        return out


@dataclass(frozen=True)
class Group:
    """The source experts that become one output expert, and whose router row it keeps."""

    router: int
    members: tuple[Member, ...]
    reconstruct: dict[str, Any] | None = None

    @property
    def experts(self) -> list[int]:
        return [m.expert for m in self.members]

    @property
    def is_copy(self) -> bool:
        """A singleton group without a neuron map or reconstruction: the expert itself, as pruning keeps it."""
        return (len(self.members) == 1 and self.members[0].neurons is None and self.reconstruct is None
                and self.members[0].expert == self.router)

    def record(self, into: int) -> dict[str, Any]:
        out: dict[str, Any] = {"into": into, "router": self.router, "members": [m.record() for m in self.members]}
        if self.reconstruct is not None:
            out["reconstruct"] = dict(self.reconstruct)
        return out


GroupMap = dict[int, list[Group]]  # MoE layer -> its groups, in output order (router ids ascending)


def singleton_groups(keep: KeepMap) -> GroupMap:
    """The merge plan's form of a pruning plan: each kept expert a group of itself."""
    return {layer: [Group(e, (Member(e, 1.0),)) for e in sorted(ids)] for layer, ids in keep.items()}


def keep_of(groups: GroupMap) -> KeepMap:
    """The experts whose slots and router rows the output keeps: each group's router expert."""
    return {layer: [g.router for g in layer_groups] for layer, layer_groups in groups.items()}


def ordered(groups: list[Group]) -> list[Group]:
    """Groups in output order: by their router expert (so output expert o is the o-th kept expert, as in pruning)."""
    return sorted(groups, key=lambda g: g.router)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _member(entry: Any, where: str) -> Member:
    if not isinstance(entry, dict):
        raise PlanError(f"{where}: a member must be an object {{\"expert\": id, \"weight\": share}}, got {entry!r}")
    expert, weight, neurons = entry.get("expert"), entry.get("weight"), entry.get("neurons")
    if not is_int(expert) or expert < 0:
        raise PlanError(f"{where}: 'expert' must be an expert id, got {expert!r}")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
        raise PlanError(f"{where}: expert {expert}'s 'weight' must be a positive number, got {weight!r}")
    if neurons is not None:
        if not isinstance(neurons, list) or not all(is_int(n) and n >= -1 for n in neurons):
            raise PlanError(f"{where}: expert {expert}'s 'neurons' must list, for each of its neurons, the output "
                            "neuron it goes into (or -1 to leave it out)")
        neurons = tuple(neurons)
    return Member(expert, float(weight), neurons)


def _reconstruct(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("method") not in RECONSTRUCTIONS or not is_int(value.get("rank")) \
            or value["rank"] < 1:
        raise PlanError(f"{where}: 'reconstruct' must be {{\"method\": \"joint_svd\", \"rank\": r}} with r >= 1, "
                        f"got {value!r}")
    return {"method": value["method"], "rank": value["rank"]}


def parse_groups(plan: dict[str, Any], keep: KeepMap, origin: str = "plan") -> GroupMap:
    """The groups of a merge plan record whose ``kept``/``removed`` lists ``keep`` was read from, checked against
    each other (what needs no model): members are the layer's experts, weights sum to 1, each group's
    router expert is a member and is the layer's ``kept`` list in order (``_check_membership``)."""
    groups: GroupMap = {}
    for key, entry in plan["layers"].items():
        layer = int(key)
        where = f"{origin}: layer {layer}"
        raw = entry.get("groups")
        if not isinstance(raw, list) or not raw:
            raise PlanError(f"{where} has no 'groups' list: a merge plan says, for every MoE layer, which experts "
                            "go into each kept expert")
        parsed: list[Group] = []
        for position, item in enumerate(raw):
            at = f"{where}, group {position}"
            if not isinstance(item, dict) or not isinstance(item.get("members"), list) or not item["members"]:
                raise PlanError(f"{at}: a group must be an object with 'into', 'router' and a 'members' list")
            if item.get("into") != position:
                raise PlanError(f"{at}: 'into' must be {position} (groups are listed in output order), got "
                                f"{item.get('into')!r}")
            members = tuple(_member(m, at) for m in item["members"])
            ids = [m.expert for m in members]
            if len(set(ids)) != len(ids):
                raise PlanError(f"{at} lists expert(s) {sorted({i for i in ids if ids.count(i) > 1})} twice")
            total = sum(m.weight for m in members)
            if abs(total - 1.0) > 1e-9:
                raise PlanError(f"{at}: the members' weights sum to {total!r}, not 1")
            router = item.get("router")
            if router not in ids:
                raise PlanError(f"{at}: its 'router' {router!r} must be one of its members {ids} (the expert whose "
                                "router row the merged expert keeps)")
            parsed.append(Group(router, members, _reconstruct(item.get("reconstruct"), at)))
        if [g.router for g in parsed] != keep[layer]:
            raise PlanError(f"{where}: the groups' router experts {[g.router for g in parsed]} must be the layer's "
                            f"'kept' list {keep[layer]}, in that order")
        experts = len(entry["kept"]) + len(entry["removed"])
        _check_membership(parsed, experts, where)
        groups[layer] = parsed
    return groups


def _check_membership(groups: list[Group], experts: int, where: str) -> None:
    """An expert is in at most one group, unless every group it is in sends a disjoint part of its neurons
    (DERN splits a dropped expert's neurons over several kept experts); an expert in no group is dropped."""
    seen: dict[int, list[Member]] = {}
    for group in groups:
        for member in group.members:
            if not 0 <= member.expert < experts:
                raise PlanError(f"{where}: expert {member.expert} does not exist (the layer's experts are "
                                f"0..{experts - 1})")
            seen.setdefault(member.expert, []).append(member)
    for expert, members in seen.items():
        if len(members) == 1:
            continue
        if any(m.neurons is None for m in members):
            raise PlanError(f"{where}: expert {expert} is in {len(members)} groups; an expert merges into one group, "
                            "or sends disjoint sets of its neurons to several ('neurons' maps with -1 elsewhere)")
        used = [sum(1 for m in members if m.neurons[n] >= 0) for n in range(len(members[0].neurons))]
        if max(used) > 1:
            raise PlanError(f"{where}: expert {expert} sends neuron {used.index(max(used))} to more than one group")


def check_neuron_maps(groups: GroupMap, intermediate: int, origin: str = "plan") -> None:
    """Every neuron map has one entry per source neuron, targets below ``intermediate``, and every output neuron
    of a group receives at least one neuron."""
    for layer, layer_groups in groups.items():
        for into, group in enumerate(layer_groups):
            at = f"{origin}: layer {layer}, group {into}"
            hit = [False] * intermediate
            for member in group.members:
                neurons = member.neurons if member.neurons is not None else tuple(range(intermediate))
                if len(neurons) != intermediate or any(n >= intermediate for n in neurons):
                    raise PlanError(f"{at}: expert {member.expert}'s 'neurons' must give one output neuron in "
                                    f"-1..{intermediate - 1} for each of its {intermediate} neurons")
                for n in neurons:
                    if n >= 0:
                        hit[n] = True
            empty = [n for n, h in enumerate(hit) if not h]
            if empty:
                raise PlanError(f"{at}: output neuron(s) {empty[:8]} receive no neuron of any member")


def check_groups(view: MoEModelView, groups: GroupMap, allow_regroup: bool = False) -> None:
    """Against the model: every member exists, and with group-limited routing (``n_group > 1``) every merge group
    lies inside one routing group (unless ``allow_regroup``), so merging never moves an expert across groups.
    The kept lists (router experts) are checked as pruning checks them (``validate_keep``)."""
    spec = view.layers[0].routing
    size = view.num_experts // spec.n_group if spec.group_limited else view.num_experts
    for layer in view.layers:
        for into, group in enumerate(groups[layer.index]):
            bad = [e for e in group.experts if not 0 <= e < layer.num_experts]
            if bad:
                raise PlanError(f"layer {layer.index}, group {into}: expert id(s) {bad} do not exist (0.."
                                f"{layer.num_experts - 1})")
            blocks = {e // size for e in group.experts}
            if spec.group_limited and not allow_regroup and len(blocks) > 1:
                raise PlanError(f"layer {layer.index}, group {into} merges experts {group.experts} from routing "
                                f"groups {sorted(blocks)} of the model's group-limited router (n_group="
                                f"{spec.n_group}); merge only within a routing group, or pass --allow-regroup")
