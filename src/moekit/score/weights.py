"""Weight criteria: a score for every weight of a routed expert's projections (higher = keep), for unstructured
sparsity (``moekit.edit.sparsity``, STUN's second stage).

A criterion reads one expert's canonical weights (``ExpertWeights``: gate and up ``[I, H]``, down ``[H, I]``) and
that expert's input statistics from the profile, and returns a score tensor of the same shape for each projection
(``{"gate": ..., "up": ..., "down": ...}``; no "gate" for experts without one). Biases are never scored or zeroed.

The input statistics are ``moekit profile --input-norms``'s, of expert j: ``expert_input_energy`` [H] =
sum over the tokens routed to j of x_h^2 (what gate and up read) and ``neuron_input_energy`` [I] = sum of a_n^2
(what down reads; not gate-weighted). Named sets combine as the neuron criteria's sums do
(``moekit.score.neurons.neuron_layer_stats``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.arch.experts import ExpertWeights
from moekit.registry import Registry

INPUT_NORMS = ("expert_input_energy", "neuron_input_energy")


@dataclass(frozen=True)
class WeightCriterion:
    name: str
    reads: tuple[str, ...]  # profile statistics
    score: Callable[[ExpertWeights, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    doc: str


WEIGHT_CRITERIA: Registry[WeightCriterion] = Registry("weight criterion")


def projections(weights: ExpertWeights) -> dict[str, torch.Tensor]:
    """The expert's weight matrices by name, each ``[outputs, inputs]`` (gate only where the experts have one)."""
    out = {"up": weights.up, "down": weights.down}
    if weights.gate is not None:
        out = {"gate": weights.gate, **out}
    return out


def wanda(weights: ExpertWeights, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wanda (Sun et al. 2024): S_ik = |W_ik| * ||X_k||_2, the weight's magnitude times the norm, over the calibration
    tokens, of the input feature it multiplies. For an expert the tokens are those routed to it: ||X_k||^2 is
    ``expert_input_energy`` for gate and up (k a hidden dimension) and ``neuron_input_energy`` for down (k a
    neuron). Wanda compares the scores within each output row (``moekit.edit.sparsity.row_zero_mask``)."""
    hidden = stats["expert_input_energy"].double().sqrt()
    neurons = stats["neuron_input_energy"].double().sqrt()
    return {name: w.detach().double().abs() * (neurons if name == "down" else hidden).to(w.device)[None, :]
            for name, w in projections(weights).items()}


def magnitude(weights: ExpertWeights, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Magnitude pruning: S_ik = |W_ik| (no calibration data; the baseline Wanda and OWL compare against)."""
    return {name: w.detach().double().abs() for name, w in projections(weights).items()}


WEIGHT_CRITERIA.register("wanda")(WeightCriterion(
    "wanda", INPUT_NORMS, wanda, "Wanda: |W| x its input's norm over the expert's tokens (needs --input-norms)"))
WEIGHT_CRITERIA.register("magnitude")(WeightCriterion(
    "magnitude", (), magnitude, "magnitude: |W| (reads no statistics)"))

__all__ = ["INPUT_NORMS", "WEIGHT_CRITERIA", "WeightCriterion", "magnitude", "projections", "wanda"]
