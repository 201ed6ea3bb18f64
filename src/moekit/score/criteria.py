"""Expert importance criteria: pure functions of one MoE layer's profile statistics.

Each criterion maps :class:`ExpertStats` (one layer, the chosen calibration sets combined) to a
score per expert, ``[E]`` float64; higher = more important. Notation as in ``METHODS.md``: X_j the
tokens routed to expert j, g_{t,j} the model's final gate weight, f_j the expert's output before
gating, p_t = softmax(z_t) over all experts.

    reap = CRITERIA.get("reap")
    scores = reap(layer_stats(profile, layer, reads=reap.reads))

Each criterion declares the profile statistics it reads (``@criterion("reap", reads=("gated_norm_sum",
"count"))``): ``moekit.plan.methods`` checks a profile for them before planning, and ``layer_stats`` takes
only those, so a criterion that read more would fail at once.

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
    """One layer's statistics, sets combined: the ones a criterion reads (``Criterion.reads``), each ``[E]``.

    Reading a statistic that was not taken from the profile is an error, so a criterion cannot read more
    than it declares (the declaration is what ``moekit.plan.methods.check_needs`` checks a profile for)."""

    layer: int
    num_experts: int
    values: dict[str, torch.Tensor]  # statistic name (moekit.profile.stats) -> [E]
    seed: int = 0

    def get(self, name: str) -> torch.Tensor:
        if name not in self.values:
            raise ProfileError(f"statistic {name!r} was not read from the profile (read: "
                               f"{', '.join(sorted(self.values)) or 'none'}); a criterion declares every statistic "
                               "it reads")
        return self.values[name]

    @property
    def count(self) -> torch.Tensor:
        return self.get("count")  # |X_j| (token-normalised when sets are combined)

    @property
    def gate_sum(self) -> torch.Tensor:
        return self.get("gate_sum")

    @property
    def router_prob_sum(self) -> torch.Tensor:
        return self.get("router_prob_sum")

    @property
    def norm_sum(self) -> torch.Tensor:
        return self.get("norm_sum")

    @property
    def gated_norm_sum(self) -> torch.Tensor:
        return self.get("gated_norm_sum")

    @property
    def easy_ep_sum(self) -> torch.Tensor:
        return self.get("easy_ep_sum")

    @property
    def act_max(self) -> torch.Tensor:
        return self.get("act_max")


EXPERT_STATS = ("count", "gate_sum", "router_prob_sum", "norm_sum", "gated_norm_sum", "easy_ep_sum", "act_max")
ScoreFunction = Callable[[ExpertStats], torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    """A scoring function and the profile statistics it reads (names in ``moekit.profile.stats``)."""

    score: ScoreFunction
    reads: tuple[str, ...]

    def __call__(self, stats: ExpertStats) -> torch.Tensor:
        return self.score(stats)

    @property
    def doc(self) -> str:
        return self.score.__doc__ or ""


CRITERIA: Registry[Criterion] = Registry("criterion")


def criterion(name: str, reads: tuple[str, ...]) -> Callable[[ScoreFunction], ScoreFunction]:
    """Register the decorated function as criterion ``name``, reading the statistics ``reads``."""
    def decorate(score: ScoreFunction) -> ScoreFunction:
        CRITERIA.register(name)(Criterion(score, reads))
        return score

    return decorate


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, 0 where the expert was never routed to."""
    return torch.where(count > 0, total / count.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(total))


@criterion("frequency", reads=("count",))
def frequency(stats: ExpertStats) -> torch.Tensor:
    """|X_j|: how many tokens chose expert j. The usual baseline (e.g. in REAP)."""
    return stats.count.double()


@criterion("router_mass", reads=("router_prob_sum",))
def router_mass(stats: ExpertStats) -> torch.Tensor:
    """sum_t p_{t,j}: soft frequency, the router's probability mass over all tokens, selected or not, with the
    family's own probabilities (softmax, or each expert's sigmoid score for sigmoid-scored routers such as
    DeepSeek-V3's and GLM-4-MoE's). PreMoe's task-conditioned selection score is a variant of it (mean top-1
    raw logit)."""
    return stats.router_prob_sum.double()


@criterion("ean_sum", reads=("norm_sum",))
def ean_sum(stats: ExpertStats) -> torch.Tensor:
    """sum_{t in X_j} ||f_j(x_t)||_2: expert activation norm summed over the tokens routed to j -- the EAN
    baseline REAP compares against (a sum, so it also grows with how often j is used)."""
    return stats.norm_sum.double()


@criterion("ean_mean", reads=("norm_sum", "count"))
def ean_mean(stats: ExpertStats) -> torch.Tensor:
    """(1/|X_j|) sum_{t in X_j} ||f_j(x_t)||_2: EAN per routed token, 0 if unused. Not REAP's EAN (that is
    ``ean_sum``): moekit's variant that separates output size from usage, as REAP does with the gate."""
    return _mean(stats.norm_sum.double(), stats.count.double())


@criterion("weighted_ean_sum", reads=("gated_norm_sum",))
def weighted_ean_sum(stats: ExpertStats) -> torch.Tensor:
    """sum_{t in X_j} g_{t,j} ||f_j(x_t)||_2: gate-weighted activation norm, summed (REAP's baselines)."""
    return stats.gated_norm_sum.double()


@criterion("reap", reads=("gated_norm_sum", "count"))
def reap(stats: ExpertStats) -> torch.Tensor:
    """REAP (Lasby et al. 2025, "REAP the Experts"): (1/|X_j|) sum_{t in X_j} g_{t,j} ||f_j(x_t)||_2, 0 if X_j is
    empty. g is the model's true final gate weight (its reference takes top-k on raw logits, which is wrong for
    sigmoid-plus-bias routers; ours comes from the model's own routing)."""
    return _mean(stats.gated_norm_sum.double(), stats.count.double())


@criterion("easy_ep", reads=("easy_ep_sum",))
def easy_ep(stats: ExpertStats) -> torch.Tensor:
    """EASY-EP (Dong et al. 2025, domain-specific pruning from few-shot demonstrations):
    sum_t g_{t,j} ||f_j(x_t)|| * max(0, 1 - cos(h_t^in, h_t^out)), h^in the residual stream entering the MoE
    sub-layer, h^out = h^in + routed output. The paper calibrates on the 25 longest demonstrations; here the
    calibration data is whatever was profiled."""
    return stats.easy_ep_sum.double()


@criterion("random", reads=())
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


def layer_stats(profile: Profile, layer: int, weights: dict[str, float] | None = None, seed: int = 0,
                reads: tuple[str, ...] = EXPERT_STATS) -> ExpertStats:
    """One layer's statistics ``reads`` with the named sets combined by ``weights`` (see the module docstring)."""
    weights = weights or {name: 1.0 for name in profile.set_names}
    used = [name for name, w in weights.items() if w > 0]

    def combined(name: str) -> torch.Tensor:
        if name == "act_max":  # a maximum: over the sets used, not weighed
            return profile.stat(layer, name, used).double()
        total = None
        for set_name in used:
            tokens = float(profile.stat(layer, "tokens", set_name))
            value = profile.stat(layer, name, set_name).double() * (weights[set_name] / max(tokens, 1.0))
            total = value if total is None else total + value
        assert total is not None
        return total

    layers = profile.fingerprint["moe_layers"]
    if layer not in layers:
        profile.stat(layer, "tokens")  # the error that lists the profile's layers
    experts = profile.fingerprint["num_experts"][layers.index(layer)]
    return ExpertStats(layer=layer, num_experts=experts, values={name: combined(name) for name in reads}, seed=seed)
