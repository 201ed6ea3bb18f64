"""Profiling: run calibration sets through a model with the capture attached, return a Profile.

    sets = [load_calibration_set(DataSpec("code", Path("code/")), tokenizer, seq_len=2048, max_tokens=2**20)]
    profile = collect_profile(model, sets, batch_size=8)
    profile.save("profile-dir")

or, from a model directory to a saved profile with every input checked before any weight loads:
``profile_model("model-dir", ["code=code/", "prose=prose.txt"], "profile-dir")``.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from moekit.arch.view import MoEModelView, config_value
from moekit.data import CalibrationSet, DataError, DataSpec, load_calibration_set
from moekit.data.tokenizer import load_tokenizer  # re-exported: callers import it from here
from moekit.distributed import data_parallel
from moekit.environment import versions
from moekit.layerwise import LayerwiseModel, layerwise_possible
from moekit.model_io import check_device, check_dtype, describe_source, load_config, load_model
from moekit.needs import format_bytes, profile_needs
from moekit.outputs import check_output
from moekit.profile.capture import capturing
from moekit.profile.profile_file import Profile, new_meta
from moekit.profile.resume import LayerwiseState, ResumeError, resume_dir, run_fingerprint

log = logging.getLogger("moekit")

MAX_POSITION_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length")


def max_positions(config: Any) -> int | None:
    for key in MAX_POSITION_KEYS:
        value = config_value(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_right_padded(cset: CalibrationSet) -> None:
    mask = cset.attention_mask
    if mask.shape != cset.input_ids.shape or mask.dim() != 2:
        raise DataError(f"calibration set {cset.name!r}: input_ids and attention_mask must both be "
                        "[sequences, seq_len]")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise DataError(f"calibration set {cset.name!r} is padded on the left; moekit needs padding on the right "
                        "(real tokens first), as pack_documents makes it")


def _forward_kwargs(model: PreTrainedModel) -> dict[str, Any]:
    """Skip what profiling does not need: the KV cache and the full-vocabulary logits."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _check_sets(sets: Sequence[CalibrationSet], batch_size: int) -> None:
    if not sets:
        raise DataError("no calibration sets given")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise DataError(f"calibration set names must be unique, got {names}")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    for cset in sets:
        _check_right_padded(cset)
        if cset.num_tokens == 0:
            raise DataError(f"calibration set {cset.name!r} has no tokens")


def collect_profile(model: PreTrainedModel, sets: Sequence[CalibrationSet], batch_size: int = 8,
                    neuron_stats: bool = False, progress: bool = True, source: str | None = None,
                    options: dict[str, Any] | None = None, distributed: bool = False,
                    merge_stats: bool = False, gradients: bool = False, input_norms: bool = False) -> Profile:
    """Profile ``model`` on ``sets`` (each kept separately). ``neuron_stats``, ``merge_stats``, ``input_norms``:
    collect those optional statistics too (``moekit.profile.stats``). ``gradients``: every batch also runs backward
    from its summed next-token cross-entropy (no parameter gradient is kept), for HEAPr's output-gradient statistic; the
    neuron statistics come with it, and every other statistic is the one a plain run collects.

    Sequences are right-padded (padding only after the real tokens); since the models are causal,
    real tokens never see padding, so no attention mask is passed and padding is excluded from
    every statistic by the capture's mask.

    ``distributed``: data-parallel profiling under ``torch.distributed`` (e.g. ``torchrun``): every
    rank passes the same ``sets``, runs every world-size-th batch, and the accumulators are
    all-reduced at the end, so every rank returns the profile of all the data.
    """
    _check_sets(sets, batch_size)
    view = MoEModelView.from_model(model)
    device = model.get_input_embeddings().weight.device
    kwargs = _forward_kwargs(model)
    total = sum(s.num_tokens for s in sets)
    start = time.perf_counter()
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="profiling with gradients" if gradients else "profiling",
               disable=not progress)
    rank, world = _rank_and_world(distributed)
    mode = gradient_mode(model) if gradients else torch.inference_mode()
    with capturing(view, len(sets), neuron_stats, merge_stats, gradients, input_norms) as capture, mode:
        for set_index, ids, mask in _rank_batches(sets, batch_size, rank, world):
            bar.set_postfix_str(sets[set_index].name, refresh=False)
            capture.state.begin_batch(set_index, mask.to(device, non_blocking=True))
            if gradients:
                forward_backward(model, ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            else:
                model(input_ids=ids.to(device, non_blocking=True), **kwargs)
            bar.update(int(mask.sum()) * world)
        if world > 1:
            capture.all_reduce_()
    bar.close()
    return _finish(view, capture, sets, total, start, neuron_stats or gradients, batch_size, options,
                   source or getattr(model, "name_or_path", "") or "in-memory model", device, merge_stats, gradients,
                   input_norms)


@contextmanager
def gradient_mode(model: PreTrainedModel) -> Iterator[None]:
    """Gradients on, every parameter frozen (only activations get gradients: no parameter-sized buffer is
    allocated), the embedding's output made to require grad so the graph is built; all undone on exit."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    try:
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)


def forward_backward(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One forward and one backward pass from the batch's next-token cross-entropy summed over its real tokens
    (padding, right of the real tokens, is never a target)."""
    labels = ids.masked_fill(mask == 0, -100)
    targets = int((labels[:, 1:] != -100).sum())
    if targets == 0:  # sequences of one real token each: nothing to predict, nothing to differentiate
        return
    out = model(input_ids=ids, labels=labels, use_cache=False)
    (out.loss * targets).backward()  # the model's loss is the mean over its targets


def _rank_batches(sets: Sequence[CalibrationSet], batch_size: int, rank: int,
                  world: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(set index, input_ids, attention_mask) of this rank's batches: whole batches go to the ranks in turn, so that
    every batch is the one a single process runs (a float32 forward can round differently with another batch
    shape); only the order in which the float64 sums add up differs between world sizes."""
    return [(set_index, cset.input_ids[first:first + batch_size], cset.attention_mask[first:first + batch_size])
            for set_index, cset in enumerate(sets)
            for first in range(rank * batch_size, cset.num_sequences, world * batch_size)]


def collect_profile_layerwise(run: LayerwiseModel, sets: Sequence[CalibrationSet], batch_size: int = 8,
                              neuron_stats: bool = False, progress: bool = True, source: str | None = None,
                              options: dict[str, Any] | None = None, distributed: bool = False,
                              state: LayerwiseState | None = None, resume: bool = False,
                              merge_stats: bool = False, input_norms: bool = False) -> Profile:
    """:func:`collect_profile`, one decoder layer at a time (``moekit.layerwise``): the same statistics, with only
    one layer's weights and the batches' hidden states in memory. Data parallelism as in :func:`collect_profile`
    (each rank streams every layer over its share of the batches).

    ``state``: where the run saves what it needs to continue after an interruption (``moekit.profile.resume``);
    ``resume``: continue from it instead of starting at layer 0."""
    _check_sets(sets, batch_size)
    view, device = run.view, run.device
    total = sum(s.num_tokens for s in sets)
    start = time.perf_counter()
    rank, world = _rank_and_world(distributed)
    batches = _rank_batches(sets, batch_size, rank, world)
    first_layer, saved_at = 0, None
    with capturing(view, len(sets), neuron_stats, merge_stats, input_norms=input_norms) as capture, \
            torch.inference_mode():
        if resume and state is not None:
            saved = state.load()
            _same_on_every_rank(saved.done, world, device)
            for index, named in saved.stats.items():
                capture.layers[index].stats.tensors = {name: t.to(device) for name, t in named.items()}
                capture.layers[index].easy_ep_input = saved.easy_ep_input.get(index, "not run")
            run.embed([ids for _, ids, _ in batches], hidden=saved.hidden, first_layer=saved.done)
            first_layer = saved_at = saved.done
        else:
            run.embed([ids for _, ids, _ in batches])
        masks = [mask.to(device, non_blocking=True) for _, _, mask in batches]
        layers = run.layer_indices[first_layer:]
        bar = tqdm(layers, unit="layer", desc="profiling layer by layer", disable=not progress,
                   initial=first_layer, total=len(run.layer_indices))
        try:
            for index in layers:
                with run.loaded(index):
                    for b, (set_index, _, _) in enumerate(batches):
                        capture.state.begin_batch(set_index, masks[b])
                        run.forward(index, b)
                done = index + 1 - first_layer
                bar.set_postfix_str(f"{total * done / len(run.layer_indices) / (time.perf_counter() - start):.0f} "
                                    "tok/s")
                if state is not None and index + 1 < len(run.layer_indices) and state.due():
                    state.save(index + 1, {i: c.stats.tensors for i, c in capture.layers.items() if c.stats.tensors},
                               {i: c.easy_ep_input for i, c in capture.layers.items()}, run.hidden_states())
                    saved_at = index + 1
        except BaseException:
            if state is not None and saved_at is not None and rank == 0:
                log.warning("the state after %d of %d decoder layers is saved in %s: run the same command with "
                            "--resume to continue from there", saved_at, len(run.layer_indices), state.directory)
            raise
        finally:
            bar.close()
        if world > 1:
            capture.all_reduce_(device)
    profile = _finish(view, capture, sets, total, start, neuron_stats, batch_size, options,
                      source or str(run.source), device, merge_stats, input_norms=input_norms)
    if first_layer:
        profile.meta["timing"]["resumed_at_layer"] = first_layer
    return profile


def _same_on_every_rank(done: int, world: int, device: torch.device) -> None:
    """Every rank resumes from the same layer (a rank killed between two saves would not)."""
    if world == 1:
        return
    import torch.distributed as dist

    low = torch.tensor([done], device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if int(low) != int(high):
        raise ResumeError(f"the ranks saved different layers ({int(low)} to {int(high)}); the state cannot be "
                          "resumed: delete it and run again without --resume")

def _finish(view: MoEModelView, capture: Any, sets: Sequence[CalibrationSet], total: int, start: float,
            neuron_stats: bool, batch_size: int, options: dict[str, Any] | None, source: str,
            device: torch.device, merge_stats: bool = False, gradients: bool = False,
            input_norms: bool = False) -> Profile:
    results = capture.results()  # to the CPU, as ordinary tensors: the one synchronisation
    easy_ep_input = {i: c.easy_ep_input for i, c in capture.layers.items()}
    elapsed = time.perf_counter() - start
    set_meta = [{"name": s.name, "tokens": s.num_tokens, "sequences": s.num_sequences, "data": s.description}
                for s in sets]
    run = {"neuron_stats": neuron_stats, **({"shared_neuron_stats": True} if neuron_stats else {}),
           **({"merge_stats": True} if merge_stats else {}),
           **({"gradients": True, "shared_gradients": True,
               "loss": "next-token cross-entropy, summed over real tokens"} if gradients else {}),
           **({"input_norms": True} if input_norms else {}),
           "batch_size": batch_size, **(options or {})}
    meta = new_meta(view, source, set_meta, run, versions(), easy_ep_input)
    meta["timing"] = {"seconds": round(elapsed, 3), "tokens_per_second": round(total / max(elapsed, 1e-9), 1),
                      "device": str(device)}
    return Profile(meta, results)


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed profiling needs torch.distributed initialised (run under torchrun)")
    return dist.get_rank(), dist.get_world_size()


DEFAULT_SEQ_LEN = 2048


def profile_model(source: str | Path, data: Sequence[str | DataSpec], out: str | Path, *, seq_len: int | None = None,
                  max_tokens: int | None = 262_144, seed: int = 0, batch_size: int = 8, device: str = "cpu",
                  dtype: str = "auto", neuron_stats: bool = False, merge_stats: bool = False,
                  gradients: bool = False, input_norms: bool = False, overwrite: bool = False,
                  tokenizer: str | Path | None = None, progress: bool = True, dry_run: bool = False,
                  sequential: bool | None = None, resume: bool = False,
                  say: Callable[[str], None] | None = None) -> Profile | None:
    """Profile the model at ``source`` on named sets (``"NAME=PATH"``) and save to ``out``.

    Everything that can be checked before loading weights is: output directory, set names, the
    data (read, tokenised and packed first), sequence length against the model's maximum.
    ``seq_len`` defaults to 2048 or the model's maximum, whichever is smaller. What the run needs
    (``moekit.needs``: memory, disk) is given to ``say`` and checked before anything loads; ``dry_run``
    stops there and returns None. ``sequential``: run the model one decoder layer at a time from its shards
    (``moekit.layerwise``; same statistics, memory of one layer); None (default) chooses it, and says so, when the
    whole model does not fit the device's free memory. Launched by torchrun
    (``torchrun --nproc-per-node N -m moekit profile ...``), every rank runs its share of the sequences
    and rank 0 writes the profile of all of them (``moekit.distributed``). ``gradients``: also a backward pass per
    batch (HEAPr's statistic, with the neuron statistics); it needs the whole model on the device, with every
    layer's activations of a batch, so it cannot run layer by layer. ``input_norms``: Wanda's per-expert input
    norms (``moekit prune --sparsity``).
    """
    specs = [d if isinstance(d, DataSpec) else DataSpec.parse(d) for d in data]
    sources, inputs = [source], [tokenizer, *(spec.path for spec in specs)]
    out_path = check_output(out, kind="profile", overwrite=overwrite, sources=sources, inputs=inputs)
    check_dtype(dtype)
    check_device(device)
    if not specs:
        raise DataError("no calibration data: pass --data NAME=PATH (one or more)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataError(f"calibration set names must be unique, got {names}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens must be at least 1, got {max_tokens}")
    config = load_config(source)
    limit = max_positions(config)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    if seq_len < 1 or (limit is not None and seq_len > limit):
        raise DataError(f"--seq-len {seq_len} is outside what the model handles (1 to {limit} positions)")
    needs = profile_needs(source, out_path, dtype=dtype, device=device, batch_size=batch_size, seq_len=seq_len,
                          sets=len(specs), neuron_stats=neuron_stats, max_tokens=max_tokens,
                          merge_stats=merge_stats, gradients=gradients, input_norms=input_norms)
    if gradients and sequential:
        raise DataError("--gradients runs a backward pass through the whole model, which cannot run layer by layer: "
                        "drop --sequential (or profile without --gradients)")
    if sequential is None:  # layer by layer when the whole model does not fit and the checkpoint allows it
        sequential = not gradients and not needs.fits_whole() and layerwise_possible(source, device)
        if sequential and say is not None:
            say(f"the whole model needs {format_bytes(needs.whole_bytes)} on {device} but "
                f"{format_bytes(needs.device_free_bytes)} are free: profiling layer by layer (as --sequential)")
    for line in needs.lines(layerwise=sequential) if say is not None else ():
        say(line)
    needs.check(layerwise=sequential)
    saved = resume_dir(out_path)
    if resume and not sequential:
        raise ResumeError("--resume continues an interrupted layer-by-layer profile: add --sequential")
    if resume and not saved.exists():
        raise ResumeError(f"nothing to resume: {saved} does not exist (a layer-by-layer run keeps its state there "
                          "until it writes the profile); run without --resume")
    if sequential and not resume and saved.exists():
        raise ResumeError(f"an interrupted run of this profile left its state in {saved}; continue it with "
                          f"--resume, or delete {saved} to start over")
    if dry_run:
        return None
    tok = load_tokenizer(tokenizer or source)
    sets = [load_calibration_set(spec, tok, seq_len, max_tokens, seed) for spec in specs]
    with data_parallel(device) as rank:  # under torchrun: this rank's share of the sequences
        options = {"seq_len": seq_len, "max_tokens": max_tokens, "seed": seed, "dtype": dtype, "device": device,
                   "tokenizer": describe_source(tokenizer or source), "world_size": rank.world,
                   "sequential": sequential}
        if sequential:
            fingerprint = run_fingerprint(describe_source(source), sets,
                                          {**options, "batch_size": batch_size, "neuron_stats": neuron_stats,
                                           **({"merge_stats": True} if merge_stats else {}),
                                           **({"input_norms": True} if input_norms else {})})
            state = LayerwiseState(saved, fingerprint, rank.rank, interval=resume_interval())
            with LayerwiseModel(source, dtype=dtype, device=rank.device) as run:
                profile = collect_profile_layerwise(run, sets, batch_size, neuron_stats, progress and rank.writes,
                                                    describe_source(source), options, distributed=rank.world > 1,
                                                    state=state, resume=resume, merge_stats=merge_stats,
                                                    input_norms=input_norms)
        else:
            model = load_model(source, dtype=dtype, device=rank.device)
            profile = collect_profile(model, sets, batch_size, neuron_stats, progress and rank.writes,
                                      describe_source(source), options, distributed=rank.world > 1,
                                      merge_stats=merge_stats, gradients=gradients, input_norms=input_norms)
        if rank.writes:
            profile.save(out_path, overwrite=overwrite, sources=sources, inputs=inputs)
        if sequential:
            state.remove()
    return profile


def resume_interval() -> float:
    """Seconds between saves of a layer-by-layer run's state (``MOEKIT_RESUME_INTERVAL``, default 300)."""
    from moekit.profile.resume import DEFAULT_INTERVAL

    value = os.environ.get("MOEKIT_RESUME_INTERVAL")
    try:
        return float(value) if value else DEFAULT_INTERVAL
    except ValueError:
        raise DataError(f"MOEKIT_RESUME_INTERVAL={value!r} is not a number of seconds") from None
