"""Neuron criteria: a score for every neuron n of every routed expert j of a layer (higher = keep).

A criterion reads the profile's per-neuron statistics (``moekit profile --neuron-stats``: ``neuron_energy`` =
sum over the tokens routed to j of (g_{t,j} a_{j,t,n})^2, ``neuron_max`` = max over them of |g_{t,j} a_{j,t,n}|)
and the experts' weights (``ExpertWeights`` of each expert, canonical shapes), and returns ``[E, I]`` float64.

Named sets are combined as expert criteria combine them, except that the sum keeps CAMERA's scale (a sum over
calibration tokens, not a mean): energy = N * sum_s w_s energy_s / N_s with weights w normalised to 1 over the
sets used and N their total tokens, which is the plain sum over all tokens when the sets are weighed by their
sizes; maxima are taken over the sets used (weight > 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moekit.arch.experts import ExpertWeights
from moekit.profile.profile_file import Profile
from moekit.registry import Registry

CAMERA_RHO = 0.9


@dataclass(frozen=True)
class NeuronCriterion:
    name: str
    reads: tuple[str, ...]  # profile statistics
    score: Callable[[dict[str, torch.Tensor], Sequence[ExpertWeights]], torch.Tensor]
    doc: str


NEURON_CRITERIA: Registry[NeuronCriterion] = Registry("neuron criterion")


def neuron_layer_stats(profile: Profile, layer: int, weights: dict[str, float] | None,
                       reads: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The layer's per-neuron statistics ``reads`` ([E, I] each), the named sets combined (module docstring)."""
    weights = weights or {name: 1.0 for name in profile.set_names}
    used = [name for name, w in weights.items() if w > 0]
    total_weight = sum(weights[name] for name in used)
    tokens = {name: max(float(profile.stat(layer, "tokens", name)), 1.0) for name in used}
    all_tokens = sum(tokens.values())
    out = {}
    for stat in reads:
        if stat == "neuron_max":
            out[stat] = profile.stat(layer, stat, used).double()
        else:
            out[stat] = sum(profile.stat(layer, stat, name).double() * (weights[name] / total_weight) / tokens[name]
                            for name in used) * all_tokens
    return out


def down_column_energy(experts: Sequence[ExpertWeights]) -> torch.Tensor:
    """[E, I]: ||W_down[:, n]||^2 of every neuron of every expert."""
    return torch.stack([w.down.detach().double().square().sum(0) for w in experts])


def camera_p(stats: dict[str, torch.Tensor], experts: Sequence[ExpertWeights], rho: float = CAMERA_RHO) -> torch.Tensor:
    """CAMERA-P (Xu et al. 2025): S_{j,n} = ||W_down[:, n]||^2 * [(1 - rho) sum_t (g_{t,j} a_{j,t,n})^2
    + rho max_t (g_{t,j} a_{j,t,n})^2], rho = 0.9 (``METHODS.md``): the neuron's output energy over the
    calibration tokens, its largest single contribution weighted most."""
    energy, peak = stats["neuron_energy"], stats["neuron_max"]
    return down_column_energy(experts).to(energy.device) * ((1 - rho) * energy + rho * peak.square())


NEURON_CRITERIA.register("camera_p")(NeuronCriterion(
    "camera_p", ("neuron_energy", "neuron_max"), camera_p,
    "CAMERA-P: ||W_down[:, n]||^2 x (0.1 sum_t (g a_n)^2 + 0.9 max_t (g a_n)^2)"))

__all__ = ["CAMERA_RHO", "NEURON_CRITERIA", "NeuronCriterion", "camera_p", "down_column_energy",
           "neuron_layer_stats"]
