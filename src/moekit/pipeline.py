"""The pipeline steps a user runs, as functions: plan from a profile, apply a plan, prune in one go.

    plan = plan_from_profile("model-dir", "profile-dir", PlanRequest("reap", ratio=0.5))
    write_plan(plan, "plan.json")
    prune_with_plan("model-dir", plan, "pruned-dir")

Each checks everything it can before a weight is loaded (profile against the model's structure,
the budget, protections, group and top-k constraints, the output path).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moekit.arch.view import MoEModelView
from moekit.edit import PruneResult, prune_to_checkpoint
from moekit.edit.checkpoint import check_output_dir
from moekit.edit.keep import PlanError, check_plan_format, read_json_plan
from moekit.model_io import describe_source, load_structure
from moekit.outputs import check_output, write_json_file
from moekit.plan import PlanRequest, make_prune_plan, plan_keep_map, plan_top_k
from moekit.plan.check import checked_plan
from moekit.profile import Profile
from moekit.profile.profile_file import config_sha256


def plan_from_profile(source: str | Path, profile: str | Path | Profile, request: PlanRequest,
                      profile_path: str | Path | None = None) -> dict[str, Any]:
    """The pruning plan for ``request``, from a saved profile of the model at ``source``.

    ``profile`` is a profile directory or a loaded Profile (then ``profile_path`` says where it came from)."""
    loaded = profile if isinstance(profile, Profile) else Profile.load(profile)
    view = MoEModelView.from_model(load_structure(source))
    origin = profile_path if isinstance(profile, Profile) else profile
    path = str(Path(origin).resolve()) if origin is not None else None
    return make_prune_plan(view, loaded, request, profile_path=path, source=describe_source(source))


def write_plan(plan: dict[str, Any], path: str | Path, overwrite: bool = False,
               sources: Sequence[str | Path | None] = (), inputs: Sequence[str | Path | None] = ()) -> Path:
    """Write a plan as JSON (sorted keys: same plan, same bytes), atomically (``moekit.outputs`` rules)."""
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


def prune_with_plan(source: str | Path, plan: dict[str, Any], out: str | Path, *, overwrite: bool = False,
                    dtype: str = "auto", reproduce: str | None = None) -> PruneResult:
    """Apply a plan (a planner's record or a plain keep map) and write the pruned checkpoint.

    A planner's record (it has a ``format``) is checked completely against the model's structure
    before any weight loads (``moekit.plan.check``); the checked record is what the checkpoint's
    ``moekit_plan.json`` holds. A plain keep map gets a keep-list record."""
    check_output_dir(out, source, overwrite)
    if not isinstance(plan, dict):
        raise PlanError(f"a plan must be a JSON object, got {type(plan).__name__}")
    reproduce = reproduce or f"moekit apply {shlex.quote(describe_source(source))} moekit_plan.json --out OUT"
    if "format" not in plan:
        return prune_to_checkpoint(source, plan_keep_map(plan), out, overwrite=overwrite, dtype=dtype,
                                   method="keep-list", reproduce=reproduce)
    check_plan_format(plan)
    check_plan_source(plan, source)
    checked = checked_plan(plan, MoEModelView.from_model(load_structure(source)))
    return prune_to_checkpoint(
        source, plan_keep_map(checked), out, overwrite=overwrite,
        allow_regroup=checked.get("details", {}).get("allow_regroup", False), dtype=dtype, method=checked["method"],
        top_k=plan_top_k(checked), plan=checked, reproduce=reproduce,
    )


def prune_from_profile(source: str | Path, profile: str | Path, request: PlanRequest, out: str | Path, *,
                       overwrite: bool = False, dtype: str = "auto", reproduce: str | None = None) -> PruneResult:
    """Plan from the profile and apply it in one step."""
    check_output_dir(out, source, overwrite)
    plan = plan_from_profile(source, profile, request)
    return prune_with_plan(source, plan, out, overwrite=overwrite, dtype=dtype, reproduce=reproduce)


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


def evaluate_model(source: str | Path, tasks: list[str] | None = None, texts: dict[str, str | Path] | None = None,
                   *, limit: int | None = None, num_fewshot: int | None = None, max_length: int | None = None,
                   batch_size: int = 8, device: str = "cpu", dtype: str = "auto",
                   data_dir: str | Path | None = None, progress: bool = True, prompts: list[str] | None = None,
                   max_new_tokens: int = 48, stride: int | None = None,
                   tokenizer: str | Path | None = None, allow_task_data_outside: bool = False,
                   dry_run: bool = False, say: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Benchmark tasks, perplexity on named texts and greedy generation samples for the model at ``source``
    (what ``moekit eval`` runs). Every task file, text and the tokenizer (``tokenizer``, else the model's
    own) is read and checked before the model loads. A task YAML's ``data_path`` must lie in the YAML's
    folder unless ``allow_task_data_outside``. The memory the run needs (``moekit.needs.eval_needs``) is given
    to ``say`` and checked before the model loads; ``dry_run`` stops there and returns None."""
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
    for name in tasks:
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
                                max_length=max_length, data_dir=data_dir, progress=progress))
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
