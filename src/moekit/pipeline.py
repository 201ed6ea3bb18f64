"""The pipeline steps a user runs, as functions: make a plan, apply a plan, prune in one go.

    inputs = read_inputs(profile="profile-dir")                  # or data=["code=./src"], plan_file="keep.json"
    plan = make_plan("model-dir", PlanRequest("reap", ratio=0.5), inputs)
    write_plan(plan, "plan.json")
    prune_with_plan("model-dir", plan, "pruned-dir")

``make_plan`` is the one way from a request to a plan, for the command line, recipes and notebooks: a plan
file the user gave (``given_plan``), or the request's method from ``moekit.plan.methods.METHODS``, whose
needs are checked against the inputs first (``check_needs``). Each step checks everything it can before a
weight is loaded (profile against the model's structure, the budget, protections, group and top-k
constraints, the output path).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moekit.arch.view import MoEModelView
from moekit.edit import PruneResult, prune_to_checkpoint
from moekit.edit.card import MASK_PLAN_FORMAT, NEURON_PLAN_FORMAT, SPARSITY_PLAN_FORMAT, prune_plan_record
from moekit.edit.checkpoint import check_output_dir
from moekit.edit.keep import PlanError, check_plan_format, parse_keep, read_json_plan, validate_keep
from moekit.edit.prune import validate_top_k
from moekit.merge.apply import MergeResult
from moekit.model_io import describe_source, load_structure
from moekit.outputs import check_output, write_json_file
from moekit.plan import PlanRequest, plan_keep_map, plan_top_k
from moekit.plan.check import checked_plan, plan_groups
from moekit.plan.methods import (
    COMMAND_LINE,
    METHODS,
    PlanInputs,
    RunOptions,
    Spelling,
    check_kind,
    check_needs,
    naee_plan_from_data,
    plan_from_profile,
)
from moekit.profile import Profile
from moekit.profile.profile_file import config_sha256
from moekit.summary import summarize

__all__ = ["PlanInputs", "RunOptions", "apply_plan", "check_plan_source", "evaluate_model", "given_plan",
           "kept_per_layer", "make_plan", "naee_plan_from_data", "plan_from_profile", "prune_from_profile",
           "prune_with_plan", "read_inputs", "read_plan", "write_plan"]


def read_inputs(profile: str | Path | None = None, data: Sequence[str] = (), plan_file: str | Path | None = None,
                *, run: RunOptions | None = None, options: Mapping[str, Any] | None = None) -> PlanInputs:
    """The inputs a plan is made from, read (a profile is loaded and checked; no model is): a profile directory,
    calibration sets (``NAME=PATH``), or a plan file the user wrote (``--keep-json``: a keep map or a plan)."""
    if plan_file is not None and profile is not None:
        raise PlanError("give either --profile (moekit scores the experts) or --keep-json (you list them)")
    return PlanInputs(profile=Profile.load(profile) if profile is not None else None, profile_path=profile,
                      data=tuple(data), plan_file=Path(plan_file) if plan_file is not None else None,
                      run=run or RunOptions(), options=dict(options or {}))


def make_plan(source: str | Path, request: PlanRequest, inputs: PlanInputs,
              spelling: Spelling = COMMAND_LINE, kind: str | None = "prune") -> dict[str, Any]:
    """The plan for ``request`` on the model at ``source``: the plan file given (``given_plan``), else the one
    the request's method makes (``METHODS``) once ``check_needs`` found everything it needs in ``inputs``.
    ``spelling`` names the inputs in the errors (the command line's options by default); ``kind``: the kind of
    method asked for (``prune``: moekit prune's, ``merge``: moekit merge's; None: any)."""
    if inputs.plan_file is not None:
        return given_plan(source, inputs.plan_file, request)
    if kind is not None and request.method not in METHODS.names():  # list the methods of the kind asked for
        valid = ", ".join(m for m in METHODS.names() if METHODS.get(m).kind == kind)
        raise PlanError(f"unknown method {request.method!r}; valid: {valid}")
    method = METHODS.get(request.method)
    if kind is not None:
        check_kind(method, kind, f"moekit {kind}")
    where = f"the profile {inputs.profile_path}" if inputs.profile_path is not None else "the profile"
    check_needs(method, request, inputs.profile, inputs.data, spelling, where)
    return method.plan(source, request, inputs)


def given_plan(source: str | Path, path: str | Path, request: PlanRequest) -> dict[str, Any]:
    """The plan in a file the user wrote (``--keep-json``): a moekit plan as it is (applied and checked as
    ``moekit apply`` does; it holds its own top-k and regrouping), or a keep map ``{"<layer>": [expert ids to
    keep], ...}`` as a keep-list plan with the request's top-k and regrouping, checked against the model."""
    listed = read_json_plan(path, "keep file")
    if isinstance(listed, dict) and "format" in listed:
        if request.top_k is not None or request.allow_regroup:
            raise PlanError(f"{path} is a moekit plan, which holds its own top-k and regrouping; drop --top-k / "
                            "--allow-regroup or make a new plan")
        return listed
    keep = parse_keep(listed, f"keep file {path}")
    view = MoEModelView.from_model(load_structure(source))
    kept = validate_keep(view, keep, allow_regroup=request.allow_regroup)
    if request.top_k is not None:
        validate_top_k(view, request.top_k, kept)
    details: dict[str, Any] = {"keep_file": str(path)}
    if request.allow_regroup:  # recorded, so that moekit apply of the saved plan regroups too
        details["allow_regroup"] = True
    return prune_plan_record(describe_source(source), summarize(view), keep, "keep-list", details,
                             top_k=request.top_k)


def kept_per_layer(plan: dict[str, Any]) -> int:
    """The experts every MoE layer keeps under ``plan`` (a plan record or a keep map)."""
    return len(next(iter(plan_keep_map(plan).values())))


def write_plan(plan: dict[str, Any], path: str | Path, overwrite: bool = False,
               sources: Sequence[str | Path | None] = (), inputs: Sequence[str | Path | None] = ()) -> Path:
    """Write a plan as JSON (sorted keys: same plan, same bytes), atomically (``moekit.outputs`` rules). A plan
    file is a working file of this machine: its paths stay absolute (what ``moekit apply`` writes into the
    checkpoint is made portable there, relative to the checkpoint)."""
    checked = check_output(path, kind="file", overwrite=overwrite, sources=sources, inputs=inputs)
    return write_json_file(checked, plan, indent=2, sort_keys=True)


def read_plan(path: str | Path) -> dict[str, Any]:
    plan = read_json_plan(path)
    if not isinstance(plan, dict):
        raise PlanError(f"plan file {path} must hold a JSON object")
    return plan


def check_plan_source(plan: dict[str, Any], source: str | Path) -> None:
    """A plan made from a profile names its model's config; refuse to apply it to another model."""
    details = plan.get("details")
    profile = details.get("profile") if isinstance(details, dict) else None
    fingerprint = profile.get("fingerprint") if isinstance(profile, dict) else None
    if not fingerprint:
        return
    if not isinstance(fingerprint, dict):
        raise PlanError(f"plan: details profile fingerprint must be an object, got {fingerprint!r}")
    config = load_structure(source).config
    if fingerprint.get("config_sha256") != config_sha256(config):
        made_for = plan["source"].get("model") if isinstance(plan.get("source"), dict) else None
        raise PlanError(f"the plan was made for another model ({made_for}, {fingerprint.get('model_type')}); make a "
                        f"plan for {source} from its own profile")


def apply_plan(source: str | Path, plan: dict[str, Any], out: str | Path, *, overwrite: bool = False,
               dtype: str = "auto", reproduce: str | None = None,
               profile: Any | None = None) -> PruneResult | MergeResult:
    """Apply a plan (a pruning or merge plan record, or a plain keep map) and write the edited checkpoint.

    A planner's record (it has a ``format``) is checked completely against the model's structure
    before any weight loads (``moekit.plan.check``); the checked record is what the checkpoint's
    ``moekit_plan.json`` holds. A plain keep map gets a keep-list record. A merge plan is merged
    (``moekit.merge.merge_to_checkpoint``); a pruning plan is the merge plan of singleton groups, and is
    pruned (the same bytes); a neuron plan removes neurons inside the experts
    (``moekit.edit.neurons.neurons_to_checkpoint``); a sparsity plan zeroes weights inside them
    (``moekit.edit.sparsity.sparsity_to_checkpoint``), its masks computed from ``profile`` (a ``Profile``; default:
    the one at the path the plan records)."""
    check_output_dir(out, source, overwrite)
    if not isinstance(plan, dict):
        raise PlanError(f"a plan must be a JSON object, got {type(plan).__name__}")
    reproduce = reproduce or f"moekit apply {shlex.quote(describe_source(source))} moekit_plan.json --out OUT"
    if "format" not in plan:
        return prune_to_checkpoint(source, plan_keep_map(plan), out, overwrite=overwrite, dtype=dtype,
                                   method="keep-list", reproduce=reproduce)
    check_plan_format(plan)
    check_plan_source(plan, source)
    if plan.get("format") == NEURON_PLAN_FORMAT:  # neurons inside the experts (moekit.edit.neurons)
        from moekit.edit.neurons import neurons_to_checkpoint

        return neurons_to_checkpoint(source, plan, out, overwrite=overwrite, dtype=dtype, reproduce=reproduce)
    if plan.get("format") == SPARSITY_PLAN_FORMAT:  # weights zeroed inside the experts (moekit.edit.sparsity)
        from moekit.edit.sparsity import sparsity_to_checkpoint

        return sparsity_to_checkpoint(source, plan, out, overwrite=overwrite, dtype=dtype, reproduce=reproduce,
                                      profile=profile)
    if plan.get("format") == MASK_PLAN_FORMAT:  # experts never selected (moekit.edit.mask)
        from moekit.edit.mask import mask_to_checkpoint

        return mask_to_checkpoint(source, plan, out, overwrite=overwrite, dtype=dtype, reproduce=reproduce)
    checked = checked_plan(plan, MoEModelView.from_model(load_structure(source)))
    groups = plan_groups(checked)
    if groups is not None:
        from moekit.merge import merge_to_checkpoint

        return merge_to_checkpoint(source, groups, checked, out, overwrite=overwrite,
                                   allow_regroup=checked.get("details", {}).get("allow_regroup", False), dtype=dtype,
                                   top_k=plan_top_k(checked), reproduce=reproduce)
    return prune_to_checkpoint(
        source, plan_keep_map(checked), out, overwrite=overwrite,
        allow_regroup=checked.get("details", {}).get("allow_regroup", False), dtype=dtype, method=checked["method"],
        top_k=plan_top_k(checked), plan=checked, reproduce=reproduce,
    )


prune_with_plan = apply_plan  # its earlier name: it applies either kind of plan


def prune_from_profile(source: str | Path, profile: str | Path, request: PlanRequest, out: str | Path, *,
                       overwrite: bool = False, dtype: str = "auto", reproduce: str | None = None) -> PruneResult:
    """Plan from the profile and apply it in one step."""
    check_output_dir(out, source, overwrite)
    plan = make_plan(source, request, read_inputs(profile))
    return prune_with_plan(source, plan, out, overwrite=overwrite, dtype=dtype, reproduce=reproduce)


def evaluate_model(source: str | Path, tasks: list[str] | None = None, texts: dict[str, str | Path] | None = None,
                   *, limit: int | None = None, num_fewshot: int | None = None, max_length: int | None = None,
                   batch_size: int = 8, device: str = "cpu", dtype: str = "auto",
                   data_dir: str | Path | None = None, progress: bool = True, prompts: list[str] | None = None,
                   max_new_tokens: int = 48, stride: int | None = None,
                   tokenizer: str | Path | None = None, allow_task_data_outside: bool = False,
                   dry_run: bool = False, say: Callable[[str], None] | None = None,
                   lm_eval_include: str | Path | list[str | Path] | None = None) -> dict[str, Any] | None:
    """Benchmark tasks, perplexity on named texts and greedy generation samples for the model at ``source``
    (what ``moekit eval`` runs). Every task file, text and the tokenizer (``tokenizer``, else the model's
    own) is read and checked before the model loads. A task YAML's ``data_path`` must lie in the YAML's
    folder unless ``allow_task_data_outside``. Names that are not built-in tasks are lm-evaluation-harness's
    (``moekit.eval.harness``; with its YAMLs under ``lm_eval_include``), checked against its registry. The memory
    the run needs (``moekit.needs.eval_needs``) is given to ``say`` and checked before the model loads;
    ``dry_run`` stops there and returns None."""
    from moekit.data import DataError, load_tokenizer, read_documents
    from moekit.eval import EvalError, evaluate, perplexity, resolve_task
    from moekit.eval.custom import load_task_spec
    from moekit.model_io import check_device, check_dtype, load_config, load_model
    from moekit.needs import eval_needs
    from moekit.profile.collect import DEFAULT_SEQ_LEN, max_positions

    if not tasks and not texts and not prompts:
        raise EvalError("say what to measure: --task NAME, --text NAME=PATH and/or --prompt TEXT (each repeatable)")
    documents = {name: [d for d in read_documents(path) if d.strip()] for name, path in (texts or {}).items()}
    for name, docs in documents.items():
        if not docs:
            raise DataError(f"text set {name!r}: no text found")
    tasks = [load_task_spec(t, allow_outside=allow_task_data_outside) if str(t).endswith((".yaml", ".yml")) else t
             for t in tasks or []]
    from moekit.eval import TASKS, harness

    includes = harness.include_folders(lm_eval_include)  # checked even when no lm-eval task is named
    lm_eval_names = harness.lm_eval_names(tasks, TASKS)
    harness.check_harness_tasks(lm_eval_names, includes, TASKS.names())
    for name in tasks:
        if name not in lm_eval_names:
            resolve_task(name, data_dir=data_dir, num_fewshot=num_fewshot, limit=1)
    check_dtype(dtype)
    check_device(device)
    limit_positions = max_positions(load_config(source))
    needs = eval_needs(source, dtype=dtype, device=device, batch_size=batch_size,
                       seq_len=max_length or min(DEFAULT_SEQ_LEN, limit_positions or DEFAULT_SEQ_LEN))
    for line in needs.lines() if say is not None else ():
        say(line)
    needs.check()
    if dry_run:
        return None
    tok = load_tokenizer(tokenizer or source)
    model = load_model(source, dtype=dtype, device=device)
    results: dict[str, Any] = {"model": describe_source(source), "tasks": {}}
    if tasks:
        results.update(evaluate(model, tok, tasks, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot,
                                max_length=max_length, data_dir=data_dir, progress=progress,
                                lm_eval_include=lm_eval_include))
    results["perplexity"] = {}
    for name, docs in documents.items():
        result = perplexity(model, tok, docs, max_length=max_length, stride=stride, batch_size=batch_size,
                            progress=progress)
        results["perplexity"][name] = {"ppl": result.ppl, "tokens": result.tokens, "nll": result.nll,
                                       "bits_per_byte": result.bits_per_byte}
    if prompts:
        from moekit.eval import generation_samples

        pairs = generation_samples(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress)
        results["samples"] = [{"prompt": prompt, "completion": completion} for prompt, completion in pairs]
    return results
