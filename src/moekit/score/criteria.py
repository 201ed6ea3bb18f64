"""Expert importance criteria: pure functions of one MoE layer's profile statistics.

Each criterion maps :class:`ExpertStats` (one layer, the chosen calibration sets combined) to a
score per expert, ``[E]`` float64; higher = more important. Notation as in ``METHODS.md``: X_j the
tokens routed to expert j, g_{t,j} the model's final gate weight, f_j the expert's output before
gating, p_t = softmax(z_t) over all experts.

    scores = CRITERIA.get("reap")(layer_stats(profile, layer))

Combining named sets (``layer_stats``): each set's sums are divided by the set's token count and
weighted (default weight 1), then added, so every set has the influence its weight gives it,
whatever its size; maxima take the max over sets with a positive weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.profile.profile_file import Profile, ProfileError
from moekit.registry import Registry


@dataclass(frozen=True)
class ExpertStats:
    """One layer's statistics, sets combined; every tensor ``[E]``."""

    layer: int
    count: torch.Tensor  # |X_j| (token-normalised when sets are combined)
    gate_sum: torch.Tensor
    router_prob_sum: torch.Tensor
    norm_sum: torch.Tensor
    gated_norm_sum: torch.Tensor
    easy_ep_sum: torch.Tensor
    act_max: torch.Tensor
    seed: int = 0

    @property
    def num_experts(self) -> int:
        return int(self.count.numel())


Criterion = Callable[[ExpertStats], torch.Tensor]
CRITERIA: Registry[Criterion] = Registry("criterion")


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, 0 where the expert was never routed to."""
    return torch.where(count > 0, total / count.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(total))


@CRITERIA.register("frequency")
def frequency(stats: ExpertStats) -> torch.Tensor:
    """|X_j|: how many tokens chose expert j. The usual baseline (e.g. in REAP)."""
    return stats.count.double()


@CRITERIA.register("router_mass")
def router_mass(stats: ExpertStats) -> torch.Tensor:
    """sum_t p_{t,j}: soft frequency, the router's probability mass over all tokens, selected or not, with the
    family's own probabilities (softmax, or each expert's sigmoid score for sigmoid-scored routers such as
    DeepSeek-V3's and GLM-4-MoE's). PreMoe's task-conditioned selection score is a variant of it (mean top-1
    raw logit)."""
    return stats.router_prob_sum.double()


@CRITERIA.register("ean_sum")
def ean_sum(stats: ExpertStats) -> torch.Tensor:
    """sum_{t in X_j} ||f_j(x_t)||_2: expert activation norm summed over the tokens routed to j -- the EAN
    baseline REAP compares against (a sum, so it also grows with how often j is used)."""
    return stats.norm_sum.double()


@CRITERIA.register("ean_mean")
def ean_mean(stats: ExpertStats) -> torch.Tensor:
    """(1/|X_j|) sum_{t in X_j} ||f_j(x_t)||_2: EAN per routed token, 0 if unused. Not REAP's EAN (that is
    ``ean_sum``): moekit's variant that separates output size from usage, as REAP does with the gate."""
    return _mean(stats.norm_sum.double(), stats.count.double())


@CRITERIA.register("weighted_ean_sum")
def weighted_ean_sum(stats: ExpertStats) -> torch.Tensor:
    """sum_{t in X_j} g_{t,j} ||f_j(x_t)||_2: gate-weighted activation norm, summed (REAP's baselines)."""
    return stats.gated_norm_sum.double()


@CRITERIA.register("reap")
def reap(stats: ExpertStats) -> torch.Tensor:
    """REAP (Lasby et al. 2025, "REAP the Experts"): (1/|X_j|) sum_{t in X_j} g_{t,j} ||f_j(x_t)||_2, 0 if X_j is
    empty. g is the model's true final gate weight (its reference takes top-k on raw logits, which is wrong for
    sigmoid-plus-bias routers; ours comes from the model's own routing)."""
    return _mean(stats.gated_norm_sum.double(), stats.count.double())


@CRITERIA.register("easy_ep")
def easy_ep(stats: ExpertStats) -> torch.Tensor:
    """EASY-EP (Dong et al. 2025, domain-specific pruning from few-shot demonstrations):
    sum_t g_{t,j} ||f_j(x_t)|| * max(0, 1 - cos(h_t^in, h_t^out)), h^in the residual stream entering the MoE
    sub-layer, h^out = h^in + routed output. The paper calibrates on the 25 longest demonstrations; here the
    calibration data is whatever was profiled."""
    return stats.easy_ep_sum.double()


@CRITERIA.register("random")
def random(stats: ExpertStats) -> torch.Tensor:
    """Seeded uniform scores: a sanity baseline. The same (seed, layer) gives the same scores."""
    gen = torch.Generator().manual_seed(stats.seed * 1_000_003 + stats.layer)
    return torch.rand(stats.num_experts, generator=gen, dtype=torch.float64)


def parse_set_weights(text: str | None, names: list[str]) -> dict[str, float]:
    """``"code=2,prose=1"`` -> weights per set; sets not named get 0 when some are named, else all 1."""
    if not text:
        return {name: 1.0 for name in names}
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not sep or not math.isfinite(weight) or weight < 0:
            raise ProfileError(f"set weights {text!r}: expected NAME=WEIGHT,... with finite weights >= 0, "
                               "e.g. code=2,prose=1")
        if name not in names:
            raise ProfileError(f"set weights name {name!r}, which is not a set of the profile ({', '.join(names)})")
        weights[name] = weight
    if not any(w > 0 for w in weights.values()):
        raise ProfileError(f"set weights {text!r}: at least one weight must be positive")
    return check_set_weights({name: weights.get(name, 0.0) for name in names}, names)


def check_set_weights(weights: dict[str, float], names: list[str]) -> dict[str, float]:
    """``weights`` checked against the profile's set ``names``: known sets, finite numbers >= 0, one positive.

    An infinite weight would make every other set's statistics vanish (or turn sums into NaN), so
    the combined scores would be garbage; ``parse_set_weights`` output always passes."""
    for name, weight in weights.items():
        if name not in names:
            raise ProfileError(f"set weights name {name!r}, which is not a set of the profile ({', '.join(names)})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise ProfileError(f"set weights: the weight of {name!r} is {weight!r}; weights must be finite "
                               "numbers >= 0, e.g. code=2,prose=1")
    if not any(w > 0 for w in weights.values()):
        raise ProfileError(f"set weights {weights}: at least one weight must be positive")
    return {name: float(weight) for name, weight in weights.items()}


def layer_stats(profile: Profile, layer: int, weights: dict[str, float] | None = None, seed: int = 0) -> ExpertStats:
    """One layer's statistics with the named sets combined by ``weights`` (see the module docstring)."""
    weights = weights or {name: 1.0 for name in profile.set_names}
    used = [name for name, w in weights.items() if w > 0]

    def combined(name: str) -> torch.Tensor:
        total = None
        for set_name in used:
            tokens = float(profile.stat(layer, "tokens", set_name))
            value = profile.stat(layer, name, set_name).double() * (weights[set_name] / max(tokens, 1.0))
            total = value if total is None else total + value
        assert total is not None
        return total

    return ExpertStats(
        layer=layer, count=combined("count"), gate_sum=combined("gate_sum"),
        router_prob_sum=combined("router_prob_sum"), norm_sum=combined("norm_sum"),
        gated_norm_sum=combined("gated_norm_sum"), easy_ep_sum=combined("easy_ep_sum"),
        act_max=profile.stat(layer, "act_max", used).double(), seed=seed,
    )
