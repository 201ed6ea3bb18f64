"""How alike a layer's experts are, from their weights: the pairwise cosine similarity of the experts' flattened
weights (gate, up and down projections and their biases, in the canonical ``ExpertWeights`` layout).

Upcycled experts start as copies (cosine 1); continued training makes them diverge -- the "expert divergence"
the upcycling papers track, and the similarity merging methods group experts by.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.arch.view import MoELayer, MoEModelView


def expert_weight_vectors(layer: MoELayer) -> torch.Tensor:
    """``[E, P]``: every expert's weights flattened in one order (gate, up, down, then biases), float64 (in
    float32 the cosine of two exact copies of a large expert reads ~0.9998, not 1)."""
    rows = []
    for expert in range(layer.num_experts):
        w = layer.expert_weights(expert)
        parts = [t for t in (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias) if t is not None]
        rows.append(torch.cat([t.detach().reshape(-1).double() for t in parts]))
    return torch.stack(rows)


def expert_weight_cosine(layer: MoELayer) -> torch.Tensor:
    """``[E, E]``: cosine similarity between every pair of the layer's experts' flattened weights."""
    vectors = torch.nn.functional.normalize(expert_weight_vectors(layer), dim=1)
    return vectors @ vectors.T


def expert_divergence(view: MoEModelView) -> dict[str, Any]:
    """Per MoE layer, the mean and the largest pairwise cosine between different experts; and over layers, the mean
    of the layer means and the largest of all (1.0: some two experts are still copies of each other)."""
    layers = []
    for layer in view.layers:
        cosine = expert_weight_cosine(layer)
        experts = cosine.shape[0]
        off = cosine[~torch.eye(experts, dtype=torch.bool, device=cosine.device)]
        layers.append({"layer": layer.index, "mean_pairwise_cosine": float(off.mean()) if experts > 1 else None,
                       "max_pairwise_cosine": float(off.max()) if experts > 1 else None})
    means = [row["mean_pairwise_cosine"] for row in layers if row["mean_pairwise_cosine"] is not None]
    maxima = [row["max_pairwise_cosine"] for row in layers if row["max_pairwise_cosine"] is not None]
    return {"mean_pairwise_cosine": sum(means) / len(means) if means else None,
            "max_pairwise_cosine": max(maxima) if maxima else None, "layers": layers}
