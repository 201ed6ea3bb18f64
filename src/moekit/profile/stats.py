"""Per-layer accumulators of routing and expert statistics, kept on the device.

Notation as in ``METHODS.md``: for a non-padding token t of named set s, router logits z_t [E],
selected experts S_t, final gate weight g_{t,j}, p_t = softmax(z_t), expert output before gating
f_j(x_t) [H] (the down-projection output, biases and post-expert norm included), intermediate
activation a_{j,t} = act(W_gate x_t) * (W_up x_t) [I] (what enters the down projection).

p_{t,j} is the family's own router probability: softmax(z_t)_j, or sigmoid(z_{t,j}) for sigmoid-scored
routers (DeepSeek-V3, GLM-4-MoE, Llama-4; ``moekit.arch.routing.router_scoring``), whose scores do not
sum to 1 (the entropy is taken of them normalised).

Every statistic is a sum or a maximum over tokens, so profiles of disjoint data merge exactly
(sums add, maxima take the max) and data-parallel ranks all-reduce them. Sums are float64,
maxima float32. Leading dim: the named set.

=========================  ==========  ======================================================
name                       shape       value
=========================  ==========  ======================================================
tokens                     [S]         number of tokens
count                      [S,E]       |X_j|, tokens routed to expert j
gate_sum                   [S,E]       sum_t g_{t,j}
router_prob_sum            [S,E]       sum_t p_{t,j} (over all tokens, selected or not)
router_entropy_sum         [S]         sum_t H(p_t / sum_j p_{t,j}) (natural log)
norm_sum                   [S,E]       sum_{t in X_j} ||f_j(x_t)||
gated_norm_sum             [S,E]       sum_{t in X_j} g_{t,j} ||f_j(x_t)||
norm_max                   [S,E]       max_{t in X_j} ||f_j(x_t)||
act_max                    [S,E]       max_{t in X_j} max_h |f_j(x_t)_h| (super experts)
easy_ep_sum                [S,E]       sum_{t in X_j} g ||f_j|| max(0, 1 - cos(h_t^in, h_t^out))
coactivation               [S,E,E]     sum_t [i in S_t][j in S_t] (diagonal = count)
chunk_experts_sum          [S,C]       sum over chunks of length L_c of |union of S_t in chunk|
chunk_count                [S,C]       number of chunks of length L_c (all tokens real)
neuron_energy  (optional)  [S,E,I]     sum_{t in X_j} (g_{t,j} a_{j,t,n})^2
neuron_max     (optional)  [S,E,I]     max_{t in X_j} |g_{t,j} a_{j,t,n}|
router_logit_gram (opt.)   [S,E,E]     sum_t z_t z_t^T (M-SMoE's router-logit similarity)
expert_output_sum (opt.)   [S,E,H]     sum_t f_j(x_t) over every token, every expert run on it (HC-SMoE)
output_grad_energy (opt.)  [S,E,I]     sum_{t in X_j} (d_t . W_down_j[:, n])^2, d_t = dL/dy_t (HEAPr)
expert_input_energy (opt.) [S,E,H]     sum_{t in X_j} x_{j,t,h}^2, x_{j,t} what expert j's gate/up projections read
neuron_input_energy (opt.) [S,E,I]     sum_{t in X_j} a_{j,t,n}^2 (ungated: what the down projection reads)
shared_neuron_energy (opt.) [S,J]      sum_t b_{t,m}^2, b_t what the shared experts' down projection reads
shared_neuron_max (opt.)   [S,J]       max_t |b_{t,m}|
shared_output_grad_energy  [S,J]       sum_t (d^s_t . W_down^s[:, m])^2, d^s_t = dL/d(shared experts' output) (opt.)
=========================  ==========  ======================================================

The last two (``merge_stats``, ``moekit profile --merge-stats``) are for merging: the cosine between
experts' router-logit columns over all tokens is G_ij / sqrt(G_ii G_jj), and HC-SMoE's expert
representation is the mean output over all tokens, expert_output_sum / tokens. The second runs all E
experts on every token (E / k times the experts' usual work); both hold signed values.

The last one (``gradients``, ``moekit profile --gradients``, which also collects the neuron statistics) comes
from a backward pass: L is the summed next-token cross-entropy of the batch's real tokens, y_t the routed
experts' combined output for token t (what the layer's experts call returns) and d_t = dL/dy_t. Then
output_grad_energy / count is w^T H_j w for w = W_down_j[:, n], with H_j = mean over expert j's tokens of
d_t d_t^T: the empirical Fisher estimate of the loss Hessian in the experts' output space (HEAPr).

The last two (``input_norms``, ``moekit profile --input-norms``) are Wanda's input norms, per expert: the squared
norm over the expert's tokens of every input feature of its projections (x_{j,t} is the experts' input, scaled by
the gate where the family scales the input, Llama-4; a_{j,t} is not gate-weighted, unlike ``neuron_energy``).

The shared statistics (J = the width of the layer's shared-expert MLP, 0 where it has none; every token runs
through it, with weight 1) come with ``neuron_stats`` and ``gradients``: the shared experts' own neurons, for
neuron removal where the shared width follows the routed experts' (DeepSeek-V2/V3, GLM-4-MoE: moe_intermediate_size
x n_shared_experts). A family that gates the shared output (Qwen2-MoE's sigmoid gate) is recorded ungated.

EASY-EP's h^in is the residual stream entering the MoE sub-layer and h^out = h^in + the routed
experts' output (shared experts left out), as in its reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.profile.kernels import fused_or_none

CHUNK_SIZES = (8, 16, 32)

# name -> (shape after the set dim, using E / I / C, reduction)
STATS: dict[str, tuple[tuple[str, ...], str]] = {
    "tokens": ((), "sum"),
    "count": (("E",), "sum"),
    "gate_sum": (("E",), "sum"),
    "router_prob_sum": (("E",), "sum"),
    "router_entropy_sum": ((), "sum"),
    "norm_sum": (("E",), "sum"),
    "gated_norm_sum": (("E",), "sum"),
    "norm_max": (("E",), "max"),
    "act_max": (("E",), "max"),
    "easy_ep_sum": (("E",), "sum"),
    "coactivation": (("E", "E"), "sum"),
    "chunk_experts_sum": (("C",), "sum"),
    "chunk_count": (("C",), "sum"),
}
NEURON_STATS: dict[str, tuple[tuple[str, ...], str]] = {
    "neuron_energy": (("E", "I"), "sum"),
    "neuron_max": (("E", "I"), "max"),
}

MERGE_STATS: dict[str, tuple[tuple[str, ...], str]] = {
    "router_logit_gram": (("E", "E"), "sum"),
    "expert_output_sum": (("E", "H"), "sum"),
}
GRADIENT_STATS: dict[str, tuple[tuple[str, ...], str]] = {
    "output_grad_energy": (("E", "I"), "sum"),
}
INPUT_NORM_STATS: dict[str, tuple[tuple[str, ...], str]] = {
    "expert_input_energy": (("E", "H"), "sum"),
    "neuron_input_energy": (("E", "I"), "sum"),
}
SHARED_NEURON_STATS: dict[str, tuple[tuple[str, ...], str]] = {
    "shared_neuron_energy": (("J",), "sum"),
    "shared_neuron_max": (("J",), "max"),
}
SHARED_GRADIENT_STATS: dict[str, tuple[tuple[str, ...], str]] = {
    "shared_output_grad_energy": (("J",), "sum"),
}
SIGNED_STATS = frozenset(MERGE_STATS)  # sums of signed values; every other statistic is >= 0

# Statistics a profile holds only when asked, by the ``moekit profile`` option (as a keyword of ``profile_model``,
# and a recipe's profile key) that collects them. Every other statistic is in every profile.
OPTIONAL_STATS: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {"neuron_stats": NEURON_STATS,
                                                                     "merge_stats": MERGE_STATS,
                                                                     "gradients": GRADIENT_STATS,
                                                                     "input_norms": INPUT_NORM_STATS,
                                                                     "shared_neuron_stats": SHARED_NEURON_STATS,
                                                                     "shared_gradients": SHARED_GRADIENT_STATS}
# Options a profile records that no one asks for: they come with the option named (profiles written before they
# existed lack them, so they are options of their own).
IMPLIED_BY = {"shared_neuron_stats": "neuron_stats", "shared_gradients": "gradients"}
# statistic -> the option a user gives to collect it
COLLECTED_BY: dict[str, str] = {name: IMPLIED_BY.get(option, option) for option, stats in OPTIONAL_STATS.items()
                                for name in stats}
ALL_STATS: dict[str, tuple[tuple[str, ...], str]] = {**STATS, **NEURON_STATS, **MERGE_STATS, **GRADIENT_STATS,
                                                     **INPUT_NORM_STATS, **SHARED_NEURON_STATS, **SHARED_GRADIENT_STATS}


def collected_statistics(**options: bool) -> frozenset[str]:
    """The statistics a profile collected with ``options`` (``neuron_stats=True``, ...) holds (``gradients``
    collects the neuron statistics too)."""
    options = {**options, "neuron_stats": bool(options.get("neuron_stats") or options.get("gradients"))}
    return frozenset(STATS) | {name for name, option in COLLECTED_BY.items() if options.get(option)}


def profile_flag(option: str) -> str:
    """The ``moekit profile`` command-line flag of a profile option: ``neuron_stats`` -> ``--neuron-stats`` (an
    implied option: the flag that implies it)."""
    return "--" + IMPLIED_BY.get(option, option).replace("_", "-")


def reduction(name: str) -> str:
    return ALL_STATS[name][1]


@dataclass
class PairStats:
    """What one experts call computed, per (token, slot) pair, in the implementation's order: sorted by expert."""

    expert: torch.Tensor  # [P] expert id of each pair
    token: torch.Tensor  # [P] token index of each pair
    gate: torch.Tensor  # [P] float32 final gate weight
    norm: torch.Tensor  # [P] float32 ||f_j(x_t)||
    gated_norm: torch.Tensor  # [P] float32 ||g f_j(x_t)|| (the contribution's norm)
    act_max: torch.Tensor  # [P] float32 max_h |f_j(x_t)_h|
    intermediate: torch.Tensor | None  # [P, I] a_{j,t}, only when neuron statistics or input norms are on
    inputs: torch.Tensor | None = None  # [P, H] x_{j,t} as the expert's projections read it, only for input norms


def expert_lengths(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 pairs of each expert, for pairs sorted by expert (the capture's order): the segment lengths of
    ``torch.segment_reduce`` (no host sync; ids outside 0..E-1 were clamped into it by the caller)."""
    on_cpu = expert.device.type in ("cpu", "mps")
    return torch.histc(expert.float() if on_cpu else expert.int(), bins=num_experts, min=0,
                       max=num_experts - 1).long()


class LayerStats:
    """The accumulators of one MoE layer for ``num_sets`` named sets; allocated on first use."""

    def __init__(self, num_sets: int, num_experts: int, intermediate: int, neuron_stats: bool,
                 merge_stats: bool = False, hidden: int = 0, gradients: bool = False,
                 input_norms: bool = False, shared_width: int = 0) -> None:
        self.num_sets, self.num_experts, self.intermediate = num_sets, num_experts, intermediate
        self.shared_width = shared_width
        self.neuron_stats, self.merge_stats, self.hidden = neuron_stats or gradients, merge_stats, hidden
        self.gradients, self.input_norms = gradients, input_norms
        self.tensors: dict[str, torch.Tensor] = {}

    def _allocate(self, device: torch.device) -> None:
        sizes = {"E": self.num_experts, "I": self.intermediate, "C": len(CHUNK_SIZES), "H": self.hidden,
                 "J": self.shared_width}
        specs = {**STATS, **(NEURON_STATS if self.neuron_stats else {}), **(MERGE_STATS if self.merge_stats else {}),
                 **(GRADIENT_STATS if self.gradients else {}), **(INPUT_NORM_STATS if self.input_norms else {}),
                 **(SHARED_NEURON_STATS if self.neuron_stats else {}),
                 **(SHARED_GRADIENT_STATS if self.gradients else {})}
        for name, (dims, reduce) in specs.items():
            dtype = torch.float64 if reduce == "sum" else torch.float32
            self.tensors[name] = torch.zeros((self.num_sets, *(sizes[d] for d in dims)), dtype=dtype, device=device)

    def _get(self, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.tensors:
            self._allocate(device)
        return self.tensors

    def add_router(self, set_index: int, logits: torch.Tensor, valid: torch.Tensor,
                   scoring: str = "softmax") -> None:
        """Router statistics of ``logits [T, E]``; ``valid [T]`` is 1 for real tokens, 0 for padding; ``scoring``
        the family's probabilities (``softmax`` or ``sigmoid``)."""
        acc = self._get(logits.device)
        if scoring == "sigmoid":
            scores = torch.sigmoid(logits.float())
            acc["router_prob_sum"][set_index] += (scores * valid[:, None]).sum(0, dtype=torch.float64)
            log_p = torch.log(scores) - torch.log(scores.sum(-1, keepdim=True))
        elif scoring == "softmax":
            log_p = torch.log_softmax(logits.float(), dim=-1)
            acc["router_prob_sum"][set_index] += (log_p.exp() * valid[:, None]).sum(0, dtype=torch.float64)
        else:
            raise ValueError(f"unknown router scoring {scoring!r}")
        if self.merge_stats:
            real = logits.double() * valid[:, None].double()
            acc["router_logit_gram"][set_index] += real.T @ real
        p = log_p.exp() * valid[:, None]
        entropy = -(p * log_p.nan_to_num(neginf=0.0)).sum(-1)
        acc["router_entropy_sum"][set_index] += entropy.sum(dtype=torch.float64)

    def add_routing(self, set_index: int, index: torch.Tensor, valid: torch.Tensor,
                    batch_shape: tuple[int, int]) -> None:
        """Counts, co-activation and chunk sparsity from the selected experts ``index [T, k]``."""
        acc = self._get(index.device)
        chosen = torch.zeros(index.shape[0], self.num_experts, device=index.device)
        chosen.scatter_(1, index.long().clamp(max=self.num_experts - 1), 1.0)  # [T, E] 0/1
        chosen = chosen * valid[:, None]
        acc["tokens"][set_index] += valid.sum(dtype=torch.float64)
        acc["count"][set_index] += chosen.sum(0, dtype=torch.float64)
        acc["coactivation"][set_index] += (chosen.T @ chosen).double()
        batch, length = batch_shape
        per_seq = chosen.view(batch, length, self.num_experts)
        valid_seq = valid.view(batch, length)
        for c, size in enumerate(CHUNK_SIZES):
            full = length // size * size
            if full == 0:
                continue
            union = per_seq[:, :full].view(batch, full // size, size, self.num_experts).amax(2)
            whole = valid_seq[:, :full].view(batch, full // size, size).amin(2)  # 1 if no padding in the chunk
            acc["chunk_experts_sum"][set_index, c] += (union.sum(-1) * whole).sum(dtype=torch.float64)
            acc["chunk_count"][set_index, c] += whole.sum(dtype=torch.float64)

    def add_pairs(self, set_index: int, pairs: PairStats, valid: torch.Tensor,
                  token_change: torch.Tensor) -> None:
        """Per-expert sums and maxima from one experts call; ``token_change [T]`` = max(0, 1 - cos)."""
        acc = self._get(pairs.gate.device)
        keep = valid[pairs.token]  # [P] 0/1
        expert = pairs.expert.long().clamp(max=self.num_experts - 1)
        gated = pairs.gated_norm * keep
        for name, values in (("gate_sum", pairs.gate * keep), ("norm_sum", pairs.norm * keep),
                             ("gated_norm_sum", gated), ("easy_ep_sum", gated * token_change[pairs.token])):
            acc[name][set_index].index_add_(0, expert, values.double())
        for name, values in (("norm_max", pairs.norm * keep), ("act_max", pairs.act_max * keep)):
            acc[name][set_index].scatter_reduce_(0, expert, values, reduce="amax")
        lengths = expert_lengths(expert, self.num_experts) if self.neuron_stats or self.input_norms else None
        if self.neuron_stats and pairs.intermediate is not None:
            fused = fused_or_none(pairs.intermediate, pairs.gate * keep, lengths)  # one read of a, on CUDA
            if fused is not None:
                energy, peak = fused
                peak.sqrt_()
            else:
                # [P, I] (g a)^2 in float32: one promoting multiply, squared in place (no float copy of a, no |g a|)
                squares = (pairs.intermediate * (pairs.gate * keep)[:, None]).square_()
                # the pairs are sorted by expert: one segmented reduction per statistic, no atomic adds into E rows
                energy = torch.segment_reduce(squares, "sum", lengths=lengths, axis=0)
                peak = torch.segment_reduce(squares, "max", lengths=lengths, axis=0, initial=0.0).sqrt_()
            acc["neuron_energy"][set_index] += energy.double()
            torch.maximum(acc["neuron_max"][set_index], peak, out=acc["neuron_max"][set_index])
        if self.input_norms and pairs.intermediate is not None and pairs.inputs is not None:
            for name, values in (("expert_input_energy", pairs.inputs), ("neuron_input_energy", pairs.intermediate)):
                fused = fused_or_none(values, keep, lengths)  # the same kernel, scale = the padding mask
                if fused is not None:
                    energy = fused[0]
                else:
                    squares = values.float().square() * keep[:, None]
                    energy = torch.segment_reduce(squares, "sum", lengths=lengths, axis=0)
                acc[name][set_index] += energy.double()

    def add_shared_neurons(self, set_index: int, activations: torch.Tensor, valid: torch.Tensor) -> None:
        """``activations [T, J]``: what the shared experts' down projection read for each token of the batch."""
        acc = self._get(activations.device)
        squares = (activations * valid[:, None]).square_()  # float32 (valid is), padding zeroed
        acc["shared_neuron_energy"][set_index] += squares.sum(0, dtype=torch.float64)
        peak = acc["shared_neuron_max"][set_index]
        torch.maximum(peak, squares.amax(0).sqrt_(), out=peak)

    def add_shared_gradients(self, set_index: int, projected: torch.Tensor, valid: torch.Tensor) -> None:
        """``projected [T, J]``: d^s_t . W_down^s[:, m] for each token (the shared experts' output gradient)."""
        acc = self._get(projected.device)
        acc["shared_output_grad_energy"][set_index] += (projected.float().square() * valid[:, None]).sum(
            0, dtype=torch.float64)

    def add_all_expert_outputs(self, set_index: int, expert: int, outputs: torch.Tensor, valid: torch.Tensor) -> None:
        """``outputs [T, H]``: expert ``expert`` run on every token of the batch (merge statistics)."""
        acc = self._get(outputs.device)
        acc["expert_output_sum"][set_index, expert] += (outputs.double() * valid[:, None].double()).sum(0)

    def add_output_gradients(self, set_index: int, expert: torch.Tensor, projected: torch.Tensor,
                             keep: torch.Tensor) -> None:
        """``projected [P, I]``: d_t . W_down_j[:, n] for each (token, expert) pair (``expert [P]``, sorted by expert
        as in :meth:`add_pairs`); ``keep [P]`` 1 for a real token's pair, 0 for padding."""
        acc = self._get(projected.device)
        squares = projected.float().square() * keep[:, None]
        lengths = expert_lengths(expert.long().clamp(max=self.num_experts - 1), self.num_experts)
        acc["output_grad_energy"][set_index] += torch.segment_reduce(squares, "sum", lengths=lengths, axis=0).double()

    def all_reduce_(self, device: torch.device, group: object | None = None) -> None:
        """Combine this layer's accumulators across ``torch.distributed`` ranks (data-parallel profiling):
        sums with SUM, maxima with MAX (a rank that saw no batch contributes zeros)."""
        import torch.distributed as dist

        for name, tensor in self._get(device).items():
            op = dist.ReduceOp.SUM if reduction(name) == "sum" else dist.ReduceOp.MAX
            dist.all_reduce(tensor, op=op, group=group)

    def result(self) -> dict[str, torch.Tensor]:
        """The accumulators on the CPU (zeros if the layer never ran)."""
        if not self.tensors:
            self._allocate(torch.device("cpu"))
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.tensors.items()}
