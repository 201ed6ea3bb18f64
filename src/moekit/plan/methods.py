"""Editing methods: the one registry of what makes a plan, what each method needs, and the one check of those needs.

    method = METHODS.get("reap")
    inputs = PlanInputs(profile=Profile.load("prof"), profile_path="prof")
    check_needs(method, request, inputs.profile, inputs.data)    # before any weight loads
    plan = method.plan("model-dir", request, inputs)              # moekit.pipeline.make_plan does both

Every method declares what it reads (``Needs``): profile statistics by name (``moekit.profile.stats``),
calibration text, the model's weights, gradients. ``check_needs`` checks the inputs a user gave against
those needs before anything heavy runs, and names the input (``--profile``, ``--data``) or the
``moekit profile`` option (``--neuron-stats``) that is missing. The scoring criteria
(``moekit.score.CRITERIA``) are methods that read a profile: each is registered here with the statistics
it declares; NAEE runs the model on calibration text. A plan the user wrote (``--keep-json``) is an input,
not a method (``moekit.pipeline.given_plan``).

Kinds: ``prune`` (a plan of the experts each layer keeps; ``moekit prune``) and ``merge`` (a plan of groups of
experts, each group one output expert; ``moekit merge``, ``moekit.merge.methods``); neuron-level methods will
be a kind of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.arch.view import MoEModelView
from moekit.edit.keep import PlanError
from moekit.model_io import describe_source, load_structure
from moekit.plan import PlanRequest, make_prune_plan
from moekit.profile.profile_file import Profile, ProfileError
from moekit.profile.stats import COLLECTED_BY, profile_flag
from moekit.registry import Registry
from moekit.score.criteria import CRITERIA

KINDS = ("prune", "merge")


@dataclass(frozen=True)
class Needs:
    """What a method reads to make its plan."""

    profile: bool = False  # a profile of the model (moekit profile)
    statistics: tuple[str, ...] = ()  # the profile statistics it reads, by name (moekit.profile.stats)
    data: bool = False  # calibration text (NAME=PATH sets)
    weights: bool = False  # the model's weights: it runs the model (memory checked before they load)
    gradients: bool = False  # a backward pass (no method needs one yet)


@dataclass(frozen=True)
class RunOptions:
    """How a method that runs the model (``Needs.weights``) runs it on its calibration text."""

    device: str = "cpu"
    dtype: str = "auto"
    seq_len: int | None = None
    max_tokens: int | None = 65_536  # per set
    batch_size: int = 8
    tokenizer: str | Path | None = None
    sequential: bool | None = None  # one decoder layer at a time; None: when the whole model does not fit
    progress: bool = True
    say: Callable[[str], None] | None = None  # what the run chose (e.g. layer by layer), for the user


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is made from, as given: a profile, calibration text (``NAME=PATH`` sets), or a plan file the
    user wrote (``--keep-json``); how a method that runs the model runs it; the method's own options."""

    profile: Profile | None = None
    profile_path: str | Path | None = None  # where the profile came from (recorded in the plan)
    data: tuple[str, ...] = ()
    plan_file: Path | None = None
    run: RunOptions = field(default_factory=RunOptions)
    options: Mapping[str, Any] = field(default_factory=dict)  # NAEE: search, tokens, progressive

    @property
    def set_names(self) -> list[str]:
        """The named calibration sets a request may weigh: the profile's, else the data's."""
        from moekit.data import DataSpec

        return self.profile.set_names if self.profile is not None else [DataSpec.parse(d).name for d in self.data]

    def set_weights(self, text: str | None) -> dict[str, float] | None:
        """``code=2,prose=1`` as weights of the named sets given (``moekit.score.parse_set_weights``: sets left out
        weigh 0); None without text, or without sets to weigh (a plan file is not weighed)."""
        from moekit.score import parse_set_weights

        names = self.set_names
        return parse_set_weights(text, names) if text and names else None


PlanFunction = Callable[[str | Path, PlanRequest, PlanInputs], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """One editing method: its name, kind, what it needs, and the function from a request and inputs to a plan."""

    name: str
    kind: str
    needs: Needs
    plan: PlanFunction
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.needs.statistics and not self.needs.profile:
            raise ValueError(f"method {self.name!r} reads profile statistics but does not declare a profile")


METHODS: Registry[Method] = Registry("method")


def plan_from_profile(source: str | Path, profile: str | Path | Profile, request: PlanRequest,
                      profile_path: str | Path | None = None) -> dict[str, Any]:
    """The pruning plan for ``request`` (a criterion), from a saved profile of the model at ``source``.

    ``profile`` is a profile directory or a loaded Profile (then ``profile_path`` says where it came from)."""
    loaded = profile if isinstance(profile, Profile) else Profile.load(profile)
    view = MoEModelView.from_model(load_structure(source))
    origin = profile_path if isinstance(profile, Profile) else profile
    path = str(Path(origin).resolve()) if origin is not None else None
    return make_prune_plan(view, loaded, request, profile_path=path, source=describe_source(source))


def _criterion_plan(source: str | Path, request: PlanRequest, inputs: PlanInputs) -> dict[str, Any]:
    assert inputs.profile is not None  # check_needs
    return plan_from_profile(source, inputs.profile, request, profile_path=inputs.profile_path)


for _name in CRITERIA:  # every scoring criterion is a method that reads the statistics it declares
    METHODS.register(_name)(Method(_name, "prune", Needs(profile=True, statistics=CRITERIA.get(_name).reads),
                                   _criterion_plan, doc=CRITERIA.get(_name).doc))
del _name


def _stun_plan(source: str | Path, request: PlanRequest, inputs: PlanInputs) -> dict[str, Any]:
    from moekit.plan.stun import stun_plan

    assert inputs.profile is not None  # check_needs
    path = str(Path(inputs.profile_path).resolve()) if inputs.profile_path is not None else None
    return stun_plan(source, inputs.profile, request, profile_path=path)


METHODS.register("stun")(Method(
    "stun", "prune", Needs(profile=True, statistics=("coactivation",)), _stun_plan,
    doc="STUN stage 1: experts clustered by co-activation (behaviour similarity), each cluster keeps the expert "
        "closest to its mean weights (reads the expert weights one layer at a time)"))


def naee_plan_from_data(source: str | Path, data: list[str], request: PlanRequest, *, seq_len: int | None = None,
                        max_tokens: int | None = 65_536, seed: int = 0, batch_size: int = 8, device: str = "cpu",
                        dtype: str = "auto", search: str = "auto", progressive: bool = False,
                        naee_tokens: int = 4096, tokenizer: str | Path | None = None,
                        progress: bool = True, sequential: bool | None = None,
                        say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """NAEE's plan for the model at ``source`` from calibration text (``NAME=PATH`` sets).

    ``sequential``: run the model one decoder layer at a time (``moekit.layerwise``; the same plan); None chooses
    it, and says so through ``say``, when the whole model does not fit the device."""
    from moekit.data import DataError, DataSpec, load_calibration_set, load_tokenizer
    from moekit.layerwise import LayerwiseModel, layerwise_possible
    from moekit.model_io import load_config, load_model
    from moekit.needs import format_bytes, profile_needs
    from moekit.plan import kept_count
    from moekit.plan.naee import check_search_options, make_naee_plan, make_naee_plan_layerwise
    from moekit.profile.collect import DEFAULT_SEQ_LEN, max_positions

    check_search_options(search, naee_tokens, batch_size)
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens must be at least 1, got {max_tokens}")
    if not data:
        raise PlanError("NAEE searches on calibration text: give --data NAME=PATH")
    structure = MoEModelView.from_model(load_structure(source))
    kept_count(structure.num_experts, request)  # budget errors before any weight loads
    limit = max_positions(load_config(source))
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    needs = profile_needs(source, None, dtype=dtype, device=device, batch_size=batch_size, seq_len=seq_len,
                          sets=len(data), neuron_stats=False, max_tokens=max_tokens)
    if sequential is None:
        sequential = not needs.fits_whole() and layerwise_possible(source, device)
        if sequential and say is not None:
            say(f"the whole model needs {format_bytes(needs.whole_bytes)} on {device} but "
                f"{format_bytes(needs.device_free_bytes)} are free: NAEE runs it layer by layer (as --sequential)")
    needs.check(layerwise=sequential)
    tok = load_tokenizer(tokenizer or source)
    sets = [load_calibration_set(DataSpec.parse(d), tok, seq_len, max_tokens, seed) for d in data]
    options = dict(search=search, progressive=progressive, max_tokens=naee_tokens, batch_size=batch_size,
                   source=describe_source(source), progress=progress)
    if sequential:
        with LayerwiseModel(source, dtype=dtype, device=device) as run:
            return make_naee_plan_layerwise(run, sets, request, **options)
    return make_naee_plan(load_model(source, dtype=dtype, device=device), sets, request, **options)


def _naee_plan(source: str | Path, request: PlanRequest, inputs: PlanInputs) -> dict[str, Any]:
    run, options = inputs.run, inputs.options
    return naee_plan_from_data(source, list(inputs.data), request, seq_len=run.seq_len, max_tokens=run.max_tokens,
                               seed=request.seed, batch_size=run.batch_size, device=run.device, dtype=run.dtype,
                               search=options.get("search", "auto"), progressive=options.get("progressive", False),
                               naee_tokens=options.get("tokens", 4096), tokenizer=run.tokenizer,
                               progress=run.progress, sequential=run.sequential, say=run.say)


METHODS.register("naee")(Method(
    "naee", "prune", Needs(data=True, weights=True), _naee_plan,
    doc="NAEE (Lu et al. 2024, \"Not All Experts are Equal\"): per layer, keep the experts whose block output best "
        "reconstructs the original on calibration text (moekit.plan.naee)."))


def _merge_plan(source: str | Path, request: PlanRequest, inputs: PlanInputs) -> dict[str, Any]:
    from moekit.merge.methods import make_merge_plan

    assert inputs.profile is not None  # check_needs
    view = MoEModelView.from_model(load_structure(source))
    path = str(Path(inputs.profile_path).resolve()) if inputs.profile_path is not None else None
    return make_merge_plan(source, view, inputs.profile, request, profile_path=path,
                           source_name=describe_source(source), progress=inputs.run.progress,
                           device=inputs.run.device)


def _register_merge_methods() -> None:
    from moekit.merge.methods import MERGE_METHODS

    for name, merge in MERGE_METHODS.items():  # weights: read layer by layer from the checkpoint while planning
        METHODS.register(name)(Method(name, "merge", Needs(profile=True, statistics=merge.reads, weights=merge.weights),
                                      _merge_plan, doc=merge.doc))


_register_merge_methods()


def check_kind(method: Method, kind: str, command: str = "moekit prune") -> None:
    """Refuse a method of another kind than the command makes (a merging method given to moekit prune, ...)."""
    if method.kind == kind:
        return
    valid = ", ".join(sorted(m for m in METHODS if METHODS.get(m).kind == kind))
    other = {"prune": "moekit prune", "merge": "moekit merge"}[method.kind]
    raise PlanError(f"{command}: {method.name} is a {'merging' if method.kind == 'merge' else 'pruning'} method "
                    f"(use {other}); the {command.split()[-1]} methods are {valid}")


@dataclass(frozen=True)
class Spelling:
    """How a front end names what ``check_needs`` asks for: the command line's options, a recipe's keys."""

    method: str  # "--method"
    profile: str  # "--profile"
    data: str  # "--data"
    data_example: str  # "--data NAME=PATH"
    nothing: str  # no input at all; {data_methods}: the methods that run the model on calibration text
    profile_option: Callable[[str], str]  # a moekit profile option -> how to ask for it ("--neuron-stats")
    collect: str  # how to collect a profile with {options}


COMMAND_LINE = Spelling(
    method="--method", profile="--profile", data="--data", data_example="--data NAME=PATH",
    nothing="say which experts to remove: --profile PROFILE with --method and --ratio (or --keep), --method "
            "{data_methods} with --data, or --keep-json FILE",
    profile_option=profile_flag,
    collect="profile the model again with {options} (moekit profile MODEL --data NAME=PATH {options} --out PROFILE)")


def statistics_needed(method: Method, request: PlanRequest) -> list[str]:
    """The profile statistics a plan by ``method`` for ``request`` reads: the method's own, each set's token count
    (``layer_stats`` weighs sets per token) and, when super experts are protected, their activation maxima."""
    if not method.needs.profile:
        return []
    planning = (["tokens"] if method.needs.statistics else []) + (["act_max"] if request.protect_super else [])
    return sorted({*method.needs.statistics, *planning})


def profile_statistics(profile: Profile) -> frozenset[str]:
    """The statistics every MoE layer of ``profile`` holds."""
    layers = list(profile.layers.values())
    return frozenset(set(layers[0]).intersection(*layers[1:])) if layers else frozenset()


def check_needs(method: Method, request: PlanRequest, profile: Profile | Collection[str] | None,
                data: Sequence[str], spelling: Spelling = COMMAND_LINE, where: str = "the profile") -> None:
    """Refuse a request whose method needs what was not given, before anything loads but configs.

    ``profile``: the profile given, or the names of the statistics that a profile still to be collected will
    hold (a recipe's), or None; ``data``: the calibration sets given (``NAME=PATH``). The errors name the input
    (``spelling``) or the ``moekit profile`` option that is missing; ``where`` names the profile in them."""
    needs, name = method.needs, f"{spelling.method} {method.name}"
    data_methods = " / ".join(m for m in METHODS if METHODS.get(m).needs.data) or "(none)"
    if needs.profile and profile is None:
        if not data:
            raise PlanError(spelling.nothing.format(data_methods=data_methods))
        raise PlanError(f"{name} scores experts from a profile: give {spelling.profile} PROFILE (written by moekit "
                        f"profile MODEL --data NAME=PATH --out PROFILE); {spelling.data} alone is for "
                        f"{spelling.method} {data_methods}")
    if not needs.profile and profile is not None:
        reads = f"runs the model on {spelling.data}" if needs.data else "reads only the model"
        raise PlanError(f"{name} {reads} and takes no {spelling.profile}")
    if needs.data and not data:
        raise PlanError(f"{name} runs the model on calibration text: give {spelling.data_example}")
    if profile is None:
        return
    held = profile_statistics(profile) if isinstance(profile, Profile) else frozenset(profile)
    missing = [stat for stat in statistics_needed(method, request) if stat not in held]
    if missing:
        if all(stat in COLLECTED_BY for stat in missing):  # statistics collected only when asked
            options = " ".join(spelling.profile_option(o) for o in sorted({COLLECTED_BY[s] for s in missing}))
            how = spelling.collect.format(options=options)
        else:  # statistics every profile of this moekit holds: an older or hand-made profile
            how = "profile the model again with this moekit (moekit profile MODEL --data NAME=PATH --out PROFILE)"
        raise ProfileError(f"{name} needs the profile statistic{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(missing)}, which {where} lacks: {how}")


__all__ = ["COMMAND_LINE", "METHODS", "Method", "Needs", "PlanInputs", "RunOptions", "Spelling", "check_kind",
           "check_needs",
           "naee_plan_from_data", "plan_from_profile", "statistics_needed"]
