"""The arithmetic of merging: experts' canonical weights (``moekit.arch.experts.ExpertWeights``) in, one expert out.

Every expert is I neurons; neuron n is the triple (gate row n, up row n, down column n) with its gate/up bias
entries. ``merge_group`` averages neurons: output neuron m is

    Σ_{(i, n) -> m} w_i · neuron_{i,n}  /  Σ_{(i, n) -> m} w_i

over the members' neurons sent to m (by each member's ``neurons`` map, identity without one), w_i the member's
weight. With identity maps this is the plain weighted average Σ_i w_i W_i of every projection (HC-SMoE's
frequency-weighted merge); with permutation maps it is M-SMoE's merge of aligned experts. Down-projection
biases are averaged with the members' weights. Arithmetic runs in float64 and the result is cast back.

``align_to`` finds the permutation of one expert's neurons that best matches another's (weight matching, as
MC-SMoE's M-SMoE and Git Re-Basin do): the assignment maximising Σ_n <u_n, v_π(n)> over the neurons' concatenated
[gate row; up row; down column] features, solved exactly by ``scipy.optimize.linear_sum_assignment``.

``joint_svd`` (Sub-MoE): for each projection, the members' matrices laid side by side along the input axis
(gate and up: [I, H] each, stacked to [I, k·H]; down: [H, k·I]) share one left basis U; each member's right
factor V_i is merged by the weights and the expert rebuilt at rank r, U_r Σ_r (Σ_i w_i V_i) = U_r U_rᵀ (Σ_i w_i W_i).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moekit.arch.experts import ExpertWeights
from moekit.merge.groups import Group


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def neuron_features(w: ExpertWeights) -> torch.Tensor:
    """[I, F] float64: each neuron's gate row, up row and down column side by side (what alignment compares)."""
    parts = [w.up, w.down.T] if w.gate is None else [w.gate, w.up, w.down.T]
    return torch.cat([p.detach().to(torch.float64) for p in parts], dim=1)


def align_to(reference: ExpertWeights, other: ExpertWeights) -> list[int]:
    """For each neuron of ``other``, the neuron of ``reference`` it is matched with: the permutation maximising the
    summed inner products of matched neurons' features (weight matching), exact by linear assignment."""
    from scipy.optimize import linear_sum_assignment

    ref, oth = neuron_features(reference), neuron_features(other)
    similarity = (oth @ ref.T).cpu().numpy()  # [I_other, I_ref]
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    target = np.empty(len(rows), dtype=np.int64)
    target[rows] = cols
    return [int(t) for t in target]


def merge_group(weights: Sequence[ExpertWeights], group: Group) -> ExpertWeights:
    """The one expert ``group`` makes of its members' weights (``weights[i]`` is member i's), in the members' dtype."""
    first = weights[0]
    size = first.up.shape[0]
    dtype, device = first.up.dtype, first.up.device
    gate = torch.zeros_like(first.gate, dtype=torch.float64) if first.gate is not None else None
    up = torch.zeros_like(first.up, dtype=torch.float64)
    down = torch.zeros_like(first.down, dtype=torch.float64)
    gate_bias = torch.zeros(size, dtype=torch.float64, device=device) if first.gate_bias is not None else None
    up_bias = torch.zeros(size, dtype=torch.float64, device=device) if first.up_bias is not None else None
    down_bias = torch.zeros_like(first.down_bias, dtype=torch.float64) if first.down_bias is not None else None
    total = torch.zeros(size, dtype=torch.float64, device=device)
    for member, w in zip(group.members, weights, strict=True):
        neurons = torch.tensor(member.neurons if member.neurons is not None else range(size), dtype=torch.long,
                               device=device)
        used = neurons >= 0
        source, target = torch.arange(size, device=device)[used], neurons[used]
        share = torch.full((len(target),), member.weight, dtype=torch.float64, device=device)
        total.index_add_(0, target, share)
        up.index_add_(0, target, member.weight * _f64(w.up)[source])
        down.index_add_(1, target, member.weight * _f64(w.down)[:, source])
        if gate is not None:
            gate.index_add_(0, target, member.weight * _f64(w.gate)[source])
        if gate_bias is not None:
            gate_bias.index_add_(0, target, member.weight * _f64(w.gate_bias)[source])
        if up_bias is not None:
            up_bias.index_add_(0, target, member.weight * _f64(w.up_bias)[source])
        if down_bias is not None:
            down_bias += member.weight * _f64(w.down_bias)
    if bool((total <= 0).any()):
        raise ValueError("an output neuron receives no neuron (check_neuron_maps refuses such plans)")
    up, down = up / total[:, None], down / total[None, :]
    gate = gate / total[:, None] if gate is not None else None
    gate_bias = gate_bias / total if gate_bias is not None else None
    up_bias = up_bias / total if up_bias is not None else None
    if down_bias is not None:
        down_bias = down_bias / sum(m.weight for m in group.members)
    if group.reconstruct is not None:
        rank = int(group.reconstruct["rank"])
        aligned = [_aligned(w, m, size) for w, m in zip(weights, group.members, strict=True)]
        up = _project(up, [a.up for a in aligned], rank, axis=1)
        down = _project(down, [a.down for a in aligned], rank, axis=1)
        if gate is not None:
            gate = _project(gate, [a.gate for a in aligned], rank, axis=1)
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    return ExpertWeights(cast(gate), cast(up), cast(down), cast(gate_bias), cast(up_bias), cast(down_bias))


def _aligned(w: ExpertWeights, member, size: int) -> ExpertWeights:
    """A member's weights with its neurons moved to their output positions (a permutation map; identity without)."""
    if member.neurons is None:
        return ExpertWeights(_f64(w.gate), _f64(w.up), _f64(w.down))
    device = w.up.device
    order = torch.empty(size, dtype=torch.long, device=device)
    neurons = torch.tensor(member.neurons, dtype=torch.long, device=device)
    if sorted(member.neurons) != list(range(size)):
        raise ValueError("joint_svd reconstruction needs permutation neuron maps (or none)")
    order[neurons] = torch.arange(size, device=device)
    gate = _f64(w.gate)[order] if w.gate is not None else None
    return ExpertWeights(gate, _f64(w.up)[order], _f64(w.down)[:, order])


def _project(average: torch.Tensor, parts: Sequence[torch.Tensor | None], rank: int, axis: int) -> torch.Tensor:
    """``average`` projected onto the top-``rank`` left singular vectors of ``parts`` concatenated along ``axis``."""
    joint = torch.cat([p for p in parts if p is not None], dim=axis)
    u, _, _ = torch.linalg.svd(joint, full_matrices=False)
    basis = u[:, :rank]
    return basis @ (basis.T @ average)
