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
from moekit.profile.stats import reduction
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
        if reduction(stat) == "max":
            out[stat] = profile.stat(layer, stat, used).double()
        else:
            out[stat] = sum(profile.stat(layer, stat, name).double() * (weights[name] / total_weight) / tokens[name]
                            for name in used) * all_tokens
    return out


# What a criterion reads about the routed experts' neurons -> the same quantity for the shared-expert MLP's neurons,
# which every token runs through with weight 1 (g = 1, X = every token): a criterion scores the shared neurons with
# its own formula, the shared MLP taken as one more expert.
SHARED_EQUIVALENTS = {"neuron_energy": "shared_neuron_energy", "neuron_max": "shared_neuron_max",
                      "output_grad_energy": "shared_output_grad_energy", "count": "tokens"}


def shared_reads(criterion: NeuronCriterion) -> tuple[str, ...] | None:
    """The profile statistics ``criterion`` reads to score shared-expert neurons (None: it cannot score them)."""
    if not all(stat in SHARED_EQUIVALENTS for stat in criterion.reads):
        return None
    return tuple(SHARED_EQUIVALENTS[stat] for stat in criterion.reads)


def shared_neuron_scores(profile: Profile, layer: int, weights: dict[str, float] | None, criterion: NeuronCriterion,
                         shared: ExpertWeights) -> torch.Tensor:
    """[J]: ``criterion``'s score of every neuron of layer ``layer``'s shared-expert MLP (``shared``: its weights),
    the named sets combined as for the routed experts (:func:`neuron_layer_stats`)."""
    reads = shared_reads(criterion)
    if reads is None:
        raise ValueError(f"{criterion.name} reads {criterion.reads}, which have no shared-expert equivalent")
    stats = neuron_layer_stats(profile, layer, weights, reads)
    # one expert: [J] -> [1, J], the token count (a scalar) -> [1]
    as_expert = {name: stats[shared_name].reshape(1, *stats[shared_name].shape)
                 for name, shared_name in zip(criterion.reads, reads, strict=True)}
    return criterion.score(as_expert, [shared])[0]


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


def heapr(stats: dict[str, torch.Tensor], experts: Sequence[ExpertWeights]) -> torch.Tensor:
    """HEAPr (Li et al. 2025), the estimated loss increase of removing atomic expert n of expert j:
    S_{j,n} = 1/2 sum_{t in X_j} c_{t,n}^2 * w^T H_j w, with c_{t,n} = g_{t,j} a_{j,t,n} the atomic expert's
    coefficient on token t, w = W_down_j[:, n] its output direction (removing it changes the layer output by
    -c w), and H_j the loss Hessian in the output space, estimated by the empirical Fisher over the expert's
    tokens, H_j = mean_{t in X_j} d_t d_t^T with d_t = dL/dy_t (one backward pass: ``moekit profile
    --gradients``). Both factors are sums the profile holds: neuron_energy = sum c^2, output_grad_energy =
    sum (d_t . w)^2, count = |X_j|.

    HEAPr's paper moves the Optimal-Brain-Surgeon term from the atomic expert's parameters to its output (a d x d
    Hessian instead of one over parameters); its reference code does not publish the scoring, so this is our
    reading of the paper: H is estimated per expert over the tokens the expert processes, and, since every
    atomic expert's output lies along its own column w, the quadratic form w^T H_j w is accumulated directly
    (no d x d matrix is stored). Where the paper runs two forward passes and one backward, moekit collects both
    sums in one forward and one backward pass. The scale is a loss (summed over calibration tokens), so scores
    compare across layers."""
    energy, grad_energy = stats["neuron_energy"], stats["output_grad_energy"]
    tokens = stats["count"].to(energy.dtype).clamp(min=1.0)[:, None]
    return 0.5 * energy * grad_energy / tokens


NEURON_CRITERIA.register("heapr")(NeuronCriterion(
    "heapr", ("neuron_energy", "output_grad_energy", "count"), heapr,
    "HEAPr: 1/2 sum_t (g a_n)^2 x mean_t (dL/dy_t . W_down[:, n])^2 over the expert's tokens (needs --gradients)"))

__all__ = ["CAMERA_RHO", "NEURON_CRITERIA", "SHARED_EQUIVALENTS", "NeuronCriterion", "camera_p", "down_column_energy",
           "heapr", "neuron_layer_stats", "shared_neuron_scores", "shared_reads"]
