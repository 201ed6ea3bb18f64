"""NAEE expert pruning (Lu et al. 2024, "Not All Experts are Equal"): per layer, keep the experts whose
block output best reconstructs the original.

For MoE layer l with inputs X (hidden states entering the block on calibration tokens), choose the
retained set R, |R| = E - r, minimising  sum over chunks of ||F(X) - F_R(X)||_F,  where F_R is the
block with the dropped experts' router logits set to -inf before the model's own selection and
normalisation (``moekit.arch.routing_override``), shared experts included as the model has them.

Search (as in the paper, plus the usual relaxations for large E):

- ``exhaustive``: every subset of the allowed size (C(E, r) block evaluations; the paper's method,
  feasible for E up to about 16);
- ``greedy``: backward elimination, removing one expert at a time, the one whose removal raises
  the loss least (``beam`` keeps the ``beam_width`` best partial removals instead of one);
- ``auto``: exhaustive when C(E, r) <= ``exhaustive_limit``, else beam.

Progressive mode (the paper's option): layer l's candidates run on the inputs the model gives it once
the earlier layers are pruned (their experts masked), and are compared with the original block's
output on the original inputs, computed from the unpruned model -- so a layer's choice can make up
for the drift its predecessors caused. Protected experts are never removed; group-limited routers
remove the same number from every group unless regrouping is allowed.

Evaluating a candidate: where every expert's output on every calibration token of the layer fits in
``CACHE_BYTES`` (2 GiB), they are computed once (``ExpertOutputCache``) and a candidate costs the family's
routing of the cached router logits with its experts masked plus a weighted sum of the chosen experts' cached
outputs -- not a block forward; the losses agree with block forwards to float round-off (tested on every family).
The search scores its candidates from the cache in lists -- the single removals, each beam or greedy step's
candidates, the exhaustive search's subsets in slabs of ``EXHAUSTIVE_SLAB`` -- through
``ExpertOutputCache.losses``, which routes a batch of candidates at once (one availability mask per candidate)
within a memory budget (``LOSSES_BYTES``, 256 MiB) and syncs with the host once per list instead of once per
candidate; the losses equal one ``ExpertOutputCache.loss`` call per candidate to float round-off, and the
search's candidates, order and choice are unchanged (``search_layer(..., batched=False)`` scores them one by one).
Without a cache (and for Llama-4) the block runs per candidate. Lu et al.'s code runs the model per candidate;
the result is the same search.

Calibration tokens: ``max_tokens`` in all, split over the named sets by their weights (``--set-weights``;
equal by default), each set's first tokens in order; the tokens used per set are recorded.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moekit.arch.view import MoELayer, MoEModelView, routing_override
from moekit.data import CalibrationSet
from moekit.edit.card import prune_plan_record
from moekit.edit.keep import KeepMap, PlanError, validate_keep
from moekit.layerwise import LayerwiseModel
from moekit.plan import PlanRequest, kept_count, layer_entries, plan_details, protections, routing_groups
from moekit.profile import collect_profile
from moekit.profile.collect import collect_profile_layerwise
from moekit.score.criteria import check_set_weights
from moekit.summary import summarize

SEARCHES = ("auto", "exhaustive", "greedy", "beam")


@dataclass(frozen=True)
class LayerSearchResult:
    layer: int
    kept: list[int]
    loss: float  # reconstruction loss of the retained set
    single_removal_loss: list[float]  # loss when each expert alone is removed (its importance)
    search: str
    evaluated: int  # subsets evaluated
    evaluation: str = "block forward"  # or "cached expert outputs" (ExpertOutputCache)


def collect_block_inputs(model: nn.Module, view: MoEModelView, sets: Sequence[CalibrationSet], max_tokens: int,
                         batch_size: int = 8, masks: dict[int, torch.Tensor] | None = None,
                         layers: Iterable[int] | None = None,
                         weights: dict[str, float] | None = None) -> dict[int, torch.Tensor]:
    """Hidden states entering each MoE block on ``max_tokens`` real calibration tokens split over the sets by
    ``weights`` (``token_budgets``): ``{layer: [T, H]}``.

    ``masks`` routes earlier layers with experts masked (progressive mode)."""
    wanted = set(layers) if layers is not None else {layer.index for layer in view.layers}
    device = model.get_input_embeddings().weight.device
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    handles = []
    for layer in view.layers:
        if layer.index in wanted:
            def hook(_module: nn.Module, args: tuple, index: int = layer.index) -> None:
                hidden = args[0]
                inputs[index].append(hidden.reshape(-1, hidden.shape[-1]).detach())
            handles.append(layer.block.register_forward_pre_hook(hook))
    batches, selection = _naee_batches(sets, token_budgets(sets, max_tokens, weights), batch_size)
    try:
        with routing_override(view, masks or {}), torch.inference_mode():
            for ids, _ in batches:
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(chunks)[selection.to(chunks[0].device)] for i, chunks in inputs.items()}


def _block_output(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden[None])
    return (out[0] if isinstance(out, tuple) else out).reshape(hidden.shape)


def reconstruction_loss(view: MoEModelView, layer: MoELayer, inputs: torch.Tensor, reference: torch.Tensor,
                        dropped: Sequence[int], chunk: int = 4096) -> float:
    """sum over chunks of ||F(X) - F_R(X)||_F with ``dropped`` experts masked out of routing."""
    mask = torch.ones(layer.num_experts, dtype=torch.bool, device=inputs.device)
    mask[list(dropped)] = False
    total = 0.0
    with routing_override(view, {layer.index: mask}), torch.inference_mode():
        for start in range(0, inputs.shape[0], chunk):
            out = _block_output(layer.block, inputs[start:start + chunk])
            total += float((out.float() - reference[start:start + chunk].float()).norm())
    return total


CACHE_BYTES = 2 << 30  # largest cache of every expert's output on every token of one layer (else block forwards)
LOSSES_BYTES = 256 << 20  # ExpertOutputCache.losses: intermediates of one batch of candidates


class ExpertOutputCache:
    """One layer's block output for any retained set without running the block: every expert's output on every
    calibration token (``[T, E, H]``), the router logits, and what the block adds that does not depend on routing
    (shared experts: the unpruned block's output minus its routed part). A candidate's output is then the
    family's routing of the cached logits with the dropped experts masked, a gather and a weighted sum -- the
    same arithmetic as the block's (``moekit.profile.capture.expert_outputs`` is the profiler's replica of the
    experts' forward), in another order, so losses agree with block forwards to float round-off (tested).

    Not built (``build`` returns None; NAEE then runs the block per candidate) for Llama-4, whose gate scales each
    expert's input rather than its output, for expert layouts other than the stacked and DBRX ones, and when the
    cache would exceed ``max_bytes``."""

    def __init__(self, layer: MoELayer, logits: torch.Tensor, outputs: torch.Tensor, rest: torch.Tensor) -> None:
        self.layer, self.logits, self.outputs, self.rest = layer, logits, outputs, rest

    @staticmethod
    def fits(layer: MoELayer, inputs: torch.Tensor, max_bytes: int = CACHE_BYTES) -> bool:
        """Whether a cache can be built for ``layer`` on ``inputs`` (``[T, H]``) within ``max_bytes``."""
        from moekit.arch.experts import DbrxLayout, StackedLayout

        tokens, hidden = inputs.shape
        return (layer.call.kind != "llama4" and isinstance(layer.layout, (StackedLayout, DbrxLayout))
                and 0 < tokens * layer.num_experts * hidden * inputs.element_size() <= max_bytes)

    @classmethod
    def build(cls, layer: MoELayer, inputs: torch.Tensor, unpruned: torch.Tensor,
              max_bytes: int = CACHE_BYTES) -> ExpertOutputCache | None:
        if not cls.fits(layer, inputs, max_bytes):
            return None
        from moekit.profile.capture import expert_outputs

        tokens, hidden = inputs.shape
        experts = layer.num_experts
        with torch.inference_mode():
            logits = torch.cat([layer.router_logits(inputs[s:s + 4096]) for s in range(0, tokens, 4096)])
            outputs = torch.empty(tokens, experts, hidden, dtype=inputs.dtype, device=inputs.device)
            chunk = max(1, 4096 // experts)
            ids = torch.arange(experts, device=inputs.device)
            for start in range(0, tokens, chunk):
                x = inputs[start:start + chunk]
                t = x.shape[0]
                offsets = torch.cumsum(torch.full((experts,), t, dtype=torch.int32, device=x.device), 0,
                                       dtype=torch.int32)
                out, _ = expert_outputs(layer.experts, layer.layout, x.repeat(experts, 1),
                                        ids.repeat_interleave(t), offsets)
                outputs[start:start + t] = out.view(experts, t, hidden).transpose(0, 1).to(inputs.dtype)
            cache = cls(layer, logits, outputs, torch.zeros_like(inputs))
            cache.rest = unpruned - cache.routed(None)
        return cache

    def routed(self, available: torch.Tensor | None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The routed experts' part of the block output for tokens ``start:stop``, ``available`` experts only."""
        routing = self.layer.route_logits(self.logits[start:stop], available, self.outputs.dtype)
        rows = torch.arange(routing.index.shape[0], device=routing.index.device)[:, None]
        chosen = self.outputs[start:stop][rows, routing.index]  # [t, k, H]
        return (chosen * routing.weights.to(chosen.dtype)[..., None]).sum(dim=1).to(self.outputs.dtype)

    def loss(self, dropped: Sequence[int], reference: torch.Tensor, chunk: int = 4096) -> float:
        """``reconstruction_loss`` of the retained set, from the cache (same chunks, same norm)."""
        mask = torch.ones(self.layer.num_experts, dtype=torch.bool, device=self.logits.device)
        mask[list(dropped)] = False
        total = 0.0
        with torch.inference_mode():
            for start in range(0, reference.shape[0], chunk):
                stop = start + chunk
                out = self.routed(mask, start, stop) + self.rest[start:stop]
                total += float((out.float() - reference[start:stop].float()).norm())
        return total


    def losses(self, candidates: Sequence[Sequence[int]], reference: torch.Tensor, chunk: int = 4096,
               max_bytes: int = LOSSES_BYTES) -> list[float]:
        """``loss(dropped, reference)`` of every dropped set in ``candidates``, scored many at a time.

        A batch of C candidates on t tokens routes the cached logits expanded to ``[C, t, E]`` with one
        availability mask per candidate (``[C, 1, E]``, the family's own ``route_logits``), sums the chosen
        experts' cached outputs with their gate weights in one ``embedding_bag`` per batch (no ``[C, t, k, H]``
        gather), adds ``rest`` and takes the norm of the difference per candidate. C and t are chosen so that a
        batch's intermediates (``_row_bytes`` per candidate-token, an estimate) stay within ``max_bytes``
        (default ``LOSSES_BYTES``, 256 MiB); t never crosses the loss's ``chunk`` boundaries, and where even one
        candidate on a whole chunk exceeds the budget the chunk's norm is assembled from its pieces' squared
        norms. The losses stay on the device until the end: one host sync per call. Agrees with ``loss`` for
        each candidate to float round-off (the same chunks and norms, summed in another order)."""
        experts, top_k = self.layer.num_experts, self.layer.top_k
        if not candidates:
            return []
        dropped = [list(d) for d in candidates]
        rows = torch.repeat_interleave(torch.arange(len(dropped)), torch.tensor([len(d) for d in dropped]))
        mask = torch.ones(len(dropped), experts, dtype=torch.bool)
        mask[rows, torch.tensor([e for d in dropped for e in d], dtype=torch.long)] = False  # as loss() indexes
        fewest = int(mask.sum(dim=1).min())
        if fewest < top_k:
            raise ValueError(f"only {fewest} experts available but top_k={top_k}")
        device = self.logits.device
        mask = mask.to(device)
        tokens = reference.shape[0]
        budget = max(1, max_bytes // self._row_bytes())
        block = min(chunk, tokens, budget)  # tokens per batch
        width = max(1, budget // block)  # candidates per batch
        total = torch.zeros(len(dropped), dtype=torch.float64, device=device)
        with torch.inference_mode():
            for first in range(0, len(dropped), width):
                available = mask[first:first + width, None, :]  # [C, 1, E]
                for start in range(0, tokens, chunk):
                    stop = min(start + chunk, tokens)
                    norms = [self._batch_norms(available, b, min(b + block, stop), reference)
                             for b in range(start, stop, block)]
                    norm = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum(dim=0).sqrt()
                    total[first:first + width] += norm.double()
        return total.tolist()

    def _row_bytes(self) -> int:
        """Estimated bytes of ``losses``' intermediates per candidate and token: the routing's ``[E]`` rows
        (masked logits, probabilities, selection scores, group masks), the top-k index and weights, and the
        ``[H]`` output, its sum with ``rest``, the float32 difference and its square."""
        experts, top_k = self.layer.num_experts, self.layer.top_k
        hidden, size = self.outputs.shape[-1], self.outputs.element_size()
        return 20 * experts + 48 * top_k + hidden * (2 * size + 12)

    def _batch_norms(self, available: torch.Tensor, start: int, stop: int, reference: torch.Tensor
                     ) -> torch.Tensor:
        """``[C]``: ||out - reference||_F on tokens ``start:stop`` for each candidate mask of ``available``."""
        t, experts = stop - start, self.layer.num_experts
        logits = self.logits[start:stop].expand(available.shape[0], t, experts)
        routing = self.layer.route_logits(logits, available, self.outputs.dtype)  # index, weights [C, t, k]
        table = self.outputs[start:stop].reshape(t * experts, -1)  # row i * E + e: expert e on token i
        flat = routing.index + (torch.arange(t, device=table.device) * experts)[:, None]
        top_k = flat.shape[-1]
        routed = F.embedding_bag(flat.reshape(-1, top_k), table, mode="sum",
                                 per_sample_weights=routing.weights.to(table.dtype).reshape(-1, top_k))
        out = routed.view(available.shape[0], t, -1) + self.rest[start:stop]
        return torch.linalg.vector_norm(out.float() - reference[start:stop].float(), dim=(1, 2))


def _allowed(dropped: tuple[int, ...], groups: int, size: int, quota: int) -> bool:
    if groups <= 1:
        return True
    per = [0] * groups
    for expert in dropped:
        per[expert // size] += 1
    return all(count <= quota for count in per)


def block_outputs(layer: MoELayer, inputs: torch.Tensor) -> torch.Tensor:
    """The unpruned block's output on ``inputs`` (``[T, H]``), in chunks."""
    with torch.inference_mode():
        return torch.cat([_block_output(layer.block, inputs[s:s + 4096]) for s in range(0, len(inputs), 4096)])


def search_layer(view: MoEModelView, layer: MoELayer, inputs: torch.Tensor, remove: int, *, search: str = "auto",
                 protected: Iterable[int] = (), groups: int = 1, exhaustive_limit: int = 5000,
                 beam_width: int = 4, reference: torch.Tensor | None = None,
                 cache_bytes: int = CACHE_BYTES, batched: bool = True) -> LayerSearchResult:
    """Choose ``remove`` experts of ``layer`` to drop, minimising the reconstruction loss on ``inputs`` against
    ``reference`` (default: the unpruned block's output on ``inputs``; progressive mode passes the original
    model's block output on the original inputs). Candidates are scored from an ``ExpertOutputCache`` when one
    fits in ``cache_bytes`` (0: always run the block): each list of candidates (the single removals, a slab of
    the exhaustive search's subsets, one beam step's) at once through ``ExpertOutputCache.losses``, or, with
    ``batched=False``, one ``ExpertOutputCache.loss`` call per candidate (the same search, for comparison)."""
    if search not in SEARCHES:
        raise ValueError(f"unknown NAEE search {search!r}; valid: {', '.join(SEARCHES)}")
    num_experts = layer.num_experts
    cached = ExpertOutputCache.fits(layer, inputs, cache_bytes)
    # the unpruned block's output: the reference by default, and what the cache subtracts its routed part from
    unpruned = block_outputs(layer, inputs) if reference is None or cached else None
    if reference is None:
        reference = unpruned
    if reference.shape != inputs.shape:
        raise ValueError(f"NAEE reference {list(reference.shape)} does not match the inputs {list(inputs.shape)}")
    candidates = [e for e in range(num_experts) if e not in set(protected)]
    size, quota = num_experts // groups, remove // groups
    evaluated = 0

    cache = ExpertOutputCache.build(layer, inputs, unpruned, cache_bytes) if cached else None

    def losses(subsets: list[tuple[int, ...]]) -> list[float]:
        nonlocal evaluated
        evaluated += len(subsets)
        if cache is not None:
            if batched:
                return cache.losses(subsets, reference)
            return [cache.loss(d, reference) for d in subsets]
        return [reconstruction_loss(view, layer, inputs, reference, d) for d in subsets]

    single = losses([(e,) for e in range(num_experts)])
    if search == "auto":
        search = "exhaustive" if math.comb(len(candidates), remove) <= exhaustive_limit else "beam"
    if search == "exhaustive":  # in slabs of subsets, so that a forced exhaustive search holds few at a time
        allowed = (d for d in itertools.combinations(candidates, remove) if _allowed(d, groups, size, quota))
        best = min(min(zip(losses(slab), slab, strict=True)) for slab in _slabs(allowed, EXHAUSTIVE_SLAB))
    else:
        width = 1 if search == "greedy" else beam_width
        beam: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
        for _ in range(remove):
            grown = {tuple(sorted((*d, e))) for _, d in beam for e in candidates if e not in d}
            step = [d for d in grown if _allowed(d, groups, size, quota)]
            beam = sorted(zip(losses(step), step, strict=True))[:width]
        best = beam[0]
    dropped = set(best[1])
    return LayerSearchResult(layer.index, [e for e in range(num_experts) if e not in dropped], best[0], single,
                             search, evaluated, "cached expert outputs" if cache is not None else "block forward")


EXHAUSTIVE_SLAB = 4096  # subsets of the exhaustive search scored per ``losses`` call


def _slabs(items: Iterable[tuple[int, ...]], size: int) -> Iterable[list[tuple[int, ...]]]:
    """``items`` in consecutive lists of ``size`` (the last shorter)."""
    iterator = iter(items)
    while slab := list(itertools.islice(iterator, size)):
        yield slab


def check_search_options(search: str, max_tokens: int, batch_size: int, beam_width: int = 4) -> None:
    """The search settings, checked before a model runs: a budget below one token collects no block inputs
    (and would fail deep inside the search), a zero batch or beam runs nothing."""
    if search not in SEARCHES:
        raise PlanError(f"unknown NAEE search {search!r}; valid: {', '.join(SEARCHES)}")
    for what, value in (("--naee-tokens", max_tokens), ("the NAEE batch size", batch_size),
                        ("the NAEE beam width", beam_width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{what} {value} must be at least 1"
                            + (" (calibration tokens per layer in NAEE's loss)" if what == "--naee-tokens" else ""))


def token_budgets(sets: Sequence[CalibrationSet], max_tokens: int,
                  weights: dict[str, float] | None = None) -> list[int]:
    """How many of ``max_tokens`` each set gives NAEE: split by the sets' weights (equal when None), rounded down,
    the remainder to the heaviest sets first; never more than a set has."""
    w = [float((weights or {}).get(s.name, 0.0 if weights else 1.0)) for s in sets]
    total = sum(w)
    if total <= 0:
        raise PlanError("NAEE's set weights are all zero: give at least one calibration set a positive weight")
    budgets = [int(max_tokens * x / total) for x in w]
    for i in sorted(range(len(sets)), key=lambda i: -w[i])[: max_tokens - sum(budgets)]:
        if w[i] > 0:
            budgets[i] += 1
    return [min(b, s.num_tokens) for b, s in zip(budgets, sets, strict=True)]


def _naee_batches(sets: Sequence[CalibrationSet], budgets: Sequence[int],
                  batch_size: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The batches NAEE runs -- each set's, in order, until its budget of real tokens is reached -- and the
    ``[tokens]`` bool selection of the real tokens used (each set's first ``budget``), over the batches' tokens
    in order."""
    chosen, selection = [], []
    for cset, budget in zip(sets, budgets, strict=True):
        taken = 0
        for first in range(0, cset.num_sequences, batch_size):
            if taken >= budget:
                break
            mask = cset.attention_mask[first:first + batch_size]
            chosen.append((cset.input_ids[first:first + batch_size], mask))
            valid = mask.reshape(-1).bool()
            keep = valid & (torch.cumsum(valid.long(), 0) + taken <= budget)
            selection.append(keep)
            taken += int(valid.sum())
    return chosen, torch.cat(selection) if selection else torch.zeros(0, dtype=torch.bool)


class _Search:
    """NAEE's per-layer decisions and what the plan records of them (shared by the whole-model and the
    layer-by-layer runs)."""

    def __init__(self, view: MoEModelView, profile: Any, request: PlanRequest, search: str, exhaustive_limit: int,
                 beam_width: int, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache_bytes = cache_bytes
        self.view, self.profile, self.request = view, profile, request
        self.search, self.exhaustive_limit, self.beam_width = search, exhaustive_limit, beam_width
        self.kept = kept_count(view.num_experts, request)
        self.supers, self.protected = protections(view, profile, request)
        self.groups = routing_groups(view, self.kept, request.allow_regroup)
        self.decided: dict[int, torch.Tensor] = {}
        self.keep: KeepMap = {}
        self.details: dict[int, list[dict[str, Any]]] = {}
        self.searches: list[dict[str, Any]] = []
        self.tokens_per_set: dict[str, int] = {}
        self.weights = check_set_weights(request.set_weights, profile.set_names) if request.set_weights else None

    def budgets(self, sets: Sequence[CalibrationSet], max_tokens: int) -> list[int]:
        budgets = token_budgets(sets, max_tokens, self.weights)
        self.tokens_per_set = {s.name: b for s, b in zip(sets, budgets, strict=True)}
        return budgets

    def decide(self, layer: MoELayer, inputs: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        reasons = {e: why for (i, e), why in self.protected.items() if i == layer.index}
        result = search_layer(self.view, layer, inputs, self.view.num_experts - self.kept, search=self.search,
                              protected=reasons, groups=self.groups, exhaustive_limit=self.exhaustive_limit,
                              beam_width=self.beam_width, reference=reference, cache_bytes=self.cache_bytes)
        self.keep[layer.index] = result.kept
        mask = torch.zeros(layer.num_experts, dtype=torch.bool, device=layer.router_weight.device)
        mask[result.kept] = True
        self.decided[layer.index] = mask
        how = f"NAEE {result.search} search ({result.evaluated} subsets), retained-set loss {result.loss:.6g}"
        self.details[layer.index] = layer_entries(result.single_removal_loss, set(result.kept), reasons,
                                                  f"kept: in the retained set of lowest loss; {how}",
                                                  f"dropped: outside the retained set of lowest loss; {how}")
        self.searches.append({"layer": layer.index, "search": result.search, "evaluated": result.evaluated,
                              "evaluation": result.evaluation, "loss": result.loss, "tokens": int(inputs.shape[0])})

    def record(self, progressive: bool, max_tokens: int, source: str, **extra: Any) -> dict[str, Any]:
        validate_keep(self.view, self.keep, allow_regroup=self.request.allow_regroup)
        record = plan_details(self.profile, self.request, self.kept, self.supers, None, __doc__.split("\n\n")[0],
                              {layer: set(experts) for layer, experts in self.keep.items()})
        record["naee"] = {"search": self.search, "progressive": progressive, "max_tokens": max_tokens,
                          "tokens_per_set": self.tokens_per_set,
                          "objective": "pruned block on the inputs after the earlier layers were pruned vs the "
                          "original block on the original inputs" if progressive else
                          "pruned vs unpruned block on the original inputs",
                          "exhaustive_limit": self.exhaustive_limit, "beam_width": self.beam_width,
                          "layers": self.searches, "score": "reconstruction loss when the expert alone is removed",
                          **extra}
        return prune_plan_record(source, summarize(self.view), self.keep, "naee", record, self.details,
                                 top_k=self.request.top_k)


def make_naee_plan(model: nn.Module, sets: Sequence[CalibrationSet], request: PlanRequest, *,
                   search: str = "auto", progressive: bool = False, max_tokens: int = 4096, batch_size: int = 8,
                   exhaustive_limit: int = 5000, beam_width: int = 4, source: str = "",
                   progress: bool = True, cache_bytes: int = CACHE_BYTES) -> dict[str, Any]:
    """A complete plan record (``moekit_plan.json``) chosen by NAEE's reconstruction-loss search.

    The calibration sets are also profiled (one forward pass) to find super experts to protect and to
    record the data in the plan. An expert's ``score`` is the loss when it alone is removed."""
    check_search_options(search, max_tokens, batch_size, beam_width)
    view = MoEModelView.from_model(model)
    profile = collect_profile(model, sets, batch_size, progress=progress)
    searcher = _Search(view, profile, request, search, exhaustive_limit, beam_width, cache_bytes)
    searcher.budgets(sets, max_tokens)
    original = collect_block_inputs(model, view, sets, max_tokens, batch_size, weights=searcher.weights)
    for layer in tqdm(view.layers, desc="NAEE search", unit="layer", disable=not progress):
        if progressive:  # the drifted inputs, against the original block on the original inputs
            drifted = collect_block_inputs(model, view, sets, max_tokens, batch_size, searcher.decided, [layer.index],
                                           weights=searcher.weights)[layer.index]
            searcher.decide(layer, drifted, block_outputs(layer, original.pop(layer.index)))
        else:
            searcher.decide(layer, original.pop(layer.index))
    return searcher.record(progressive, max_tokens, source)


class _BlockReached(Exception):
    """Raised by the hook that recorded a block's input: the rest of the layer need not run."""


def _layer_block_inputs(run: LayerwiseModel, index: int, layer: MoELayer, batches: Sequence[int]) -> torch.Tensor:
    """``[T, H]``: what enters the MoE block of loaded decoder layer ``index``, for ``batches`` in turn (each stops
    at the block)."""
    chunks: list[torch.Tensor] = []

    def record(_module: nn.Module, args: tuple) -> None:
        chunks.append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())
        raise _BlockReached

    handle = layer.block.register_forward_pre_hook(record)
    try:
        for b in batches:
            with contextlib.suppress(_BlockReached):
                run.forward(index, b, keep=False)
    finally:
        handle.remove()
    return torch.cat(chunks)


def make_naee_plan_layerwise(run: LayerwiseModel, sets: Sequence[CalibrationSet], request: PlanRequest, *,
                             search: str = "auto", progressive: bool = False, max_tokens: int = 4096,
                             batch_size: int = 8, exhaustive_limit: int = 5000, beam_width: int = 4,
                             source: str = "", progress: bool = True) -> dict[str, Any]:
    """:func:`make_naee_plan` with the model run one decoder layer at a time (``moekit.layerwise``): the same plan.

    Two passes over the layers: the profile (``collect_profile_layerwise``), then, per decoder layer, NAEE's
    batches through it -- an MoE layer first runs up to its block to record the block's inputs, is searched
    while its weights are loaded, then runs whole to give the next layer its inputs. In progressive mode two
    streams of hidden states go through the layers: the original model's (for the reference outputs) and the
    pruned one's (earlier layers' experts masked: the inputs the candidates run on)."""
    check_search_options(search, max_tokens, batch_size, beam_width)
    view = run.view
    profile = collect_profile_layerwise(run, sets, batch_size, progress=progress, source=source)
    searcher = _Search(view, profile, request, search, exhaustive_limit, beam_width)
    batches, selection = _naee_batches(sets, searcher.budgets(sets, max_tokens), batch_size)
    original = list(range(len(batches)))
    drifted = list(range(len(batches), 2 * len(batches))) if progressive else original
    moe_layers = {layer.index: layer for layer in view.layers}
    run.embed([ids for ids, _ in batches] * (2 if progressive else 1))
    with torch.inference_mode():
        for index in tqdm(run.layer_indices, desc="NAEE search", unit="layer", disable=not progress):
            with run.loaded(index):
                layer = moe_layers.get(index)
                if layer is not None:
                    with routing_override(view, {}):
                        inputs = _layer_block_inputs(run, index, layer, original)
                    inputs = inputs[selection.to(inputs.device)]
                    if progressive:
                        reference = block_outputs(layer, inputs)
                        with routing_override(view, searcher.decided):
                            inputs = _layer_block_inputs(run, index, layer, drifted)
                        searcher.decide(layer, inputs[selection.to(inputs.device)], reference)
                        del reference
                    else:
                        searcher.decide(layer, inputs)
                    del inputs
                with routing_override(view, {}):  # the original stream
                    for b in original:
                        run.forward(index, b)
                if progressive:  # the pruned stream: this layer's experts masked now too
                    with routing_override(view, searcher.decided):
                        for b in drifted:
                            run.forward(index, b)
    return searcher.record(progressive, max_tokens, source, layer_by_layer=True)
