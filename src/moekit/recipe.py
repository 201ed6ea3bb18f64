"""Recipes: the whole pipeline (profile -> prune or merge -> eval -> report) from one validated YAML file.

    model: ./tiny-qwen3-moe
    out: runs/reap50                # profile/, model/ and recipe.resolved.yaml go here
    profile:
      data: {code: ./src, prose: README.md}
      seq_len: 128
      max_tokens: 20000
    prune:
      method: reap
      ratio: 0.5
    eval:                           # original and pruned, the same way; then report/
      tasks: [arc_easy]
      text: {code: ./held_out_code}
      limit: 200

Instead of ``prune:``, a ``merge:`` step merges experts (``moekit merge``'s methods and options; the profile
step then needs ``merge_stats: true`` for hc_smoe, m_smoe and sub_moe):

    merge:
      method: hc_smoe
      ratio: 0.5

Every key is checked before anything runs: unknown keys are errors (with their path), values have
types and ranges. The resolved recipe (every default filled in, plus moekit's version) is saved in
``out`` so the run can be repeated exactly.

Rerunning into an earlier run's ``out`` (``--overwrite``) reuses every finished step whose inputs are
unchanged instead of redoing it: ``steps.json`` records a key per step -- a hash of the step's settings,
moekit's version and its inputs (the model's and the data's files by path, size and modification time,
and the keys of the steps it reads) -- and a step whose key matches is taken over from the earlier run
(hard links where the file system allows, else copies); changing the prune ratio redoes the pruning and
the pruned model's evaluation, not the profile or the original model's evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import moekit
from moekit.errors import UserError

log = logging.getLogger("moekit")
STEPS_FILE = "steps.json"


class RecipeError(UserError):
    """A recipe file that cannot be read or is not valid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProfileStep(_Strict):
    data: dict[str, str] = Field(default_factory=dict, description="named calibration sets: NAME: PATH")
    path: str | None = Field(None, description="use this existing profile instead of profiling")
    seq_len: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(262_144, ge=1)
    batch_size: int = Field(8, ge=1)
    device: str = "cpu"
    dtype: str = "auto"
    neuron_stats: bool = False
    merge_stats: bool = False
    gradients: bool = False  # moekit profile --gradients (HEAPr's statistic; includes neuron_stats)
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _data_or_path(self) -> ProfileStep:
        if not self.data and self.path is None:
            raise ValueError("give profile.data (NAME: PATH sets) or profile.path (an existing profile)")
        return self


class NaeeOptions(_Strict):
    search: Literal["auto", "exhaustive", "greedy", "beam"] = "auto"
    tokens: int = Field(4096, ge=1)
    progressive: bool = False


class _EditStep(_Strict):
    """What a prune: and a merge: step share: the method, the budget, the protections, the output dtype."""

    KIND: ClassVar[str] = ""  # the kind of method (``moekit.plan.methods``) and the step's key in the recipe
    method: str
    ratio: float | None = Field(None, gt=0, lt=1)
    keep: int | None = Field(None, ge=1)
    set_weights: dict[str, float] | None = None
    protect: list[str] = Field(default_factory=list, description="LAYER:EXPERT pairs never removed or merged")
    protect_super: bool = True
    top_k: int | None = Field(None, ge=1)
    allow_regroup: bool = False
    dtype: str = "auto"

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from moekit.plan.methods import METHODS

        found = METHODS.get(method)  # an unknown name lists the valid ones
        if found.kind != cls.KIND:
            valid = ", ".join(m for m in METHODS.names() if METHODS.get(m).kind == cls.KIND)
            other = "merge" if found.kind == "merge" else "prune"
            raise ValueError(f"{method} is a {'merging' if found.kind == 'merge' else 'pruning'} method: use a "
                             f"{other}: step instead of {cls.KIND}:, or one of {valid}")
        return method

    @model_validator(mode="after")
    def _one_budget(self) -> _EditStep:
        if (self.ratio is None) == (self.keep is None):
            raise ValueError(f"give exactly one of {self.KIND}.ratio (fraction of experts removed) and "
                             f"{self.KIND}.keep")
        return self

    def extra(self) -> dict[str, Any]:
        """The method's own options (``PlanRequest.extra``)."""
        return {}


class PruneStep(_EditStep):
    KIND: ClassVar[str] = "prune"
    method: str = "easy_ep"  # moekit prune's default (its --help says why)
    naee: NaeeOptions = Field(default_factory=NaeeOptions)


class MergeStep(_EditStep):
    KIND: ClassVar[str] = "merge"
    method: str = "hc_smoe"  # moekit merge's default
    svd_rank: int | None = Field(None, ge=1, description="sub_moe: rebuild each merged projection at this rank")
    threshold: float = Field(0.6, ge=-1, lt=1, description="dern: the neuron cosine a moved neuron must exceed")
    device: str = Field("cpu", description="dern: where its neuron cosines are computed")

    def extra(self) -> dict[str, Any]:
        from moekit.merge.methods import method_options

        return method_options(self.method, self.svd_rank, self.threshold)


class EvalStep(_Strict):
    tasks: list[str] = Field(default_factory=list, description="benchmark tasks or task YAML files")
    text: dict[str, str] = Field(default_factory=dict, description="perplexity sets: NAME: PATH")
    prompts: list[str] = Field(default_factory=list, description="fixed prompts, completed greedily by both models")
    max_new_tokens: int = Field(48, ge=1)
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    max_length: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    device: str = "cpu"
    dtype: str = "auto"

    @model_validator(mode="after")
    def _something(self) -> EvalStep:
        if not self.tasks and not self.text and not self.prompts:
            raise ValueError("give eval.tasks, eval.text and/or eval.prompts")
        return self


class Recipe(_Strict):
    model: str
    out: str
    seed: int = 0
    profile: ProfileStep
    prune: PruneStep | None = None
    merge: MergeStep | None = None
    eval: EvalStep | None = None
    report: bool = True

    @model_validator(mode="after")
    def _one_edit(self) -> Recipe:
        if self.prune is not None and self.merge is not None:
            raise ValueError("give a prune: or a merge: step, not both (one run edits the model once)")
        return self

    @property
    def edit(self) -> PruneStep | MergeStep | None:
        """The step that edits the model: prune: or merge: (or None: profile and evaluate only)."""
        return self.prune if self.prune is not None else self.merge


def _where(error: dict[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "recipe"


def read_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; every problem is listed with its key path."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text (a binary file?); a recipe is a YAML file") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping with at least 'model', 'out' and 'profile'")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            message = "unknown key (not part of a recipe)" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"{_where(e)}: {message}")
        raise RecipeError(f"recipe {path} is not valid:\n  " + "\n  ".join(problems)) from None
    base = path.resolve().parent  # relative paths in a recipe are relative to the recipe file
    return recipe.model_copy(update={
        "model": _resolve(recipe.model, base), "out": str(base / recipe.out),
        "profile": recipe.profile.model_copy(update={
            "data": {k: _resolve(v, base) for k, v in recipe.profile.data.items()},
            "path": _resolve(recipe.profile.path, base) if recipe.profile.path else None}),
        "eval": recipe.eval.model_copy(update={
            "text": {k: _resolve(v, base) for k, v in recipe.eval.text.items()},
            "tasks": [_resolve(t, base) if t.endswith((".yaml", ".yml")) else t for t in recipe.eval.tasks]})
        if recipe.eval else None,
    })


def _resolve(value: str, base: Path) -> str:
    """``value`` relative to the recipe's folder if it exists there; else as given (a hub id, say)."""
    if Path(value).is_absolute():
        return value
    return str(base / value) if (base / value).exists() else value


def resolved_yaml(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    data["moekit_version"] = moekit.__version__
    return yaml.safe_dump(data, sort_keys=False)


def check_recipe_inputs(recipe: Recipe) -> None:
    """Everything every step will need, checked before the first step runs (nothing is loaded but configs,
    the tokenizer and an existing profile): the model is a supported MoE, data and text paths exist, dtypes
    and devices exist, the budget, protections, top-k and set weights fit the model, tasks resolve."""
    from moekit.arch.view import MoEModelView
    from moekit.data import DataError, DataSpec
    from moekit.edit.prune import validate_top_k
    from moekit.eval import resolve_task
    from moekit.model_io import check_device, check_dtype, load_structure
    from moekit.plan import check_protect, kept_count
    from moekit.plan.methods import METHODS, check_needs
    from moekit.profile import Profile
    from moekit.profile.stats import collected_statistics
    from moekit.score import parse_set_weights

    view = MoEModelView.from_model(load_structure(recipe.model))
    step = recipe.profile
    for name, path in step.data.items():
        DataSpec.parse(f"{name}={path}")
        if not Path(path).exists():
            raise DataError(f"profile.data.{name}: {path} does not exist")
    runs = [(step.dtype, step.device)] + ([(recipe.eval.dtype, recipe.eval.device)] if recipe.eval else [])
    for dtype, device in runs:
        check_dtype(dtype)
        check_device(device)
    prune = recipe.edit
    if prune is not None:
        check_dtype(prune.dtype)
        if isinstance(prune, MergeStep):
            check_device(prune.device)
        request = _plan_request(recipe)
        kept = kept_count(view.num_experts, request)
        if prune.top_k is not None:
            validate_top_k(view, prune.top_k, kept)
        check_protect(view, request.protect)
    existing = Profile.load(step.path) if step.path else None
    if existing is not None:
        existing.check_model(view)
    if prune is not None:  # what the method needs: the existing profile or what the profile step collects, data
        method = METHODS.get(prune.method)
        profile: Profile | frozenset[str] | None = None
        if method.needs.profile:
            profile = existing if existing is not None else collected_statistics(neuron_stats=step.neuron_stats,
                                                                                  merge_stats=step.merge_stats,
                                                                                  gradients=step.gradients)
        check_needs(method, _plan_request(recipe), profile, _data_args(recipe) if method.needs.data else [],
                    _spelling(prune.KIND), where="profile.path" if existing is not None else "the recipe's profile")
        if prune.set_weights:  # the sets the method weighs: the profile's, else the data's
            names = existing.set_names if existing is not None and method.needs.profile else list(step.data)
            parse_set_weights(",".join(f"{k}={v}" for k, v in prune.set_weights.items()), names)
    if recipe.eval is not None:
        for name, path in recipe.eval.text.items():
            if not Path(path).exists():
                raise DataError(f"eval.text.{name}: {path} does not exist")
        from moekit.eval import TASKS, harness

        harness_names = harness.lm_eval_names(recipe.eval.tasks, TASKS)
        harness.check_harness_tasks(harness_names, None, TASKS.names())  # lm-evaluation-harness's, when installed
        for task in recipe.eval.tasks:
            if task not in harness_names:
                resolve_task(task, num_fewshot=recipe.eval.num_fewshot, limit=1)


def _spelling(kind: str = "prune") -> Any:
    """How ``moekit.plan.methods.check_needs`` names a recipe's keys in its errors (``kind``: the editing step)."""
    from moekit.plan.methods import Spelling

    return Spelling(method=f"{kind}.method", profile="profile.path", data="profile.data", data_example="profile.data",
                    nothing="give profile.data (NAME: PATH sets) or profile.path (an existing profile)",
                    profile_option=lambda option: f"profile.{option}: true",
                    collect="set {options} (with profile.data: an existing profile.path lacks them)")


def _plan_request(recipe: Recipe) -> Any:
    from moekit.plan import PlanRequest, parse_protect

    prune = recipe.edit
    assert prune is not None
    return PlanRequest(method=prune.method, ratio=prune.ratio, keep=prune.keep,
                       protect_super=prune.protect_super, protect=parse_protect(",".join(prune.protect)),
                       seed=recipe.seed, top_k=prune.top_k, allow_regroup=prune.allow_regroup, extra=prune.extra())


def recipe_paths(recipe: Recipe) -> tuple[list[str | None], list[str | None]]:
    """(sources, inputs) of a recipe, in the sense of ``moekit.outputs.check_output``."""
    step = recipe.profile
    inputs: list[str | None] = [*step.data.values(), step.path, step.tokenizer]
    if recipe.eval is not None:
        inputs += [*recipe.eval.text.values(), *(t for t in recipe.eval.tasks if t.endswith((".yaml", ".yml")))]
    return [recipe.model], inputs


def input_fingerprint(path: str | None) -> Any:
    """What identifies an input without reading it through: a local file or folder by its resolved path and every
    file's relative path, size and modification time (a stat per file, cheap for a 700 GB checkpoint); anything
    else (a hub id) as it is."""
    if path is None:
        return None
    local = Path(path)
    if not local.exists():
        return str(path)
    files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
    return [str(local.resolve()), *([str(f.relative_to(local)) if local.is_dir() else f.name, f.stat().st_size,
                                     f.stat().st_mtime_ns] for f in files)]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def step_keys(recipe: Recipe) -> dict[str, str]:
    """A key per step the recipe runs (``profile``, ``model``, ``eval/original.json``, ``eval/pruned.json``): equal
    keys mean the same settings, moekit version and inputs, so the earlier result can be reused."""
    version = moekit.__version__
    model = input_fingerprint(recipe.model)
    step = recipe.profile
    data = {name: input_fingerprint(path) for name, path in step.data.items()}
    keys = {"profile": _key("profile", version, model, step.model_dump(), data, input_fingerprint(step.path),
                            input_fingerprint(step.tokenizer), recipe.seed)}
    edit = recipe.edit
    if edit is not None:  # a merge: step's key differs from a prune: step's of the same settings (its kind)
        dumped = edit.model_dump() if isinstance(edit, PruneStep) else {"kind": edit.KIND, **edit.model_dump()}
        keys["model"] = _key("model", version, keys["profile"], dumped, recipe.seed)
    if recipe.eval is not None and edit is not None:
        settings = recipe.eval.model_dump()
        inputs = {name: input_fingerprint(path) for name, path in recipe.eval.text.items()}
        tasks = [input_fingerprint(t) for t in recipe.eval.tasks if t.endswith((".yaml", ".yml"))]
        keys["eval/original.json"] = _key("eval", version, model, settings, inputs, tasks)
        keys[f"eval/{_edited(recipe)}.json"] = _key("eval", version, keys["model"], settings, inputs, tasks)
    return keys


class _Reuse:
    """The steps of an earlier run in the same ``out`` whose keys match this run's."""

    def __init__(self, previous: Path | None, keys: dict[str, str]) -> None:
        self.previous, self.keys = previous, keys
        recorded: dict[str, str] = {}
        if previous is not None and (previous / STEPS_FILE).is_file():
            try:
                recorded = json.loads((previous / STEPS_FILE).read_text())
            except (OSError, ValueError):
                recorded = {}
        self.matching = {name for name, key in keys.items() if recorded.get(name) == key
                         and previous is not None and (previous / name).exists()}

    def take(self, name: str, out: Path) -> bool:
        """Bring step ``name``'s result from the earlier run into ``out`` if it matches; whether it did."""
        if name not in self.matching or self.previous is None:
            return False
        source, target = self.previous / name, out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)
        log.info("reused %s from the earlier run (its settings and inputs are unchanged)", name)
        return True


def _link_or_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def run_recipe(recipe: Recipe, overwrite: bool = False, progress: bool = True,
               recipe_file: str | Path | None = None) -> dict[str, Any]:
    """Run the recipe's steps into ``recipe.out``; return what was written.

    Every step's inputs are checked first (:func:`check_recipe_inputs`); the steps then write into a
    temporary directory that becomes ``recipe.out`` only when every step has finished, so a failed or
    interrupted run leaves nothing behind (``moekit.outputs``). ``recipe_file`` (the YAML read) is never
    replaced. With ``overwrite`` over an earlier run, its finished steps whose inputs are unchanged are reused
    (module docstring)."""
    from moekit.outputs import check_output, writing_directory

    sources, inputs = recipe_paths(recipe)
    out = check_output(recipe.out, kind="run", overwrite=overwrite, sources=sources, inputs=[*inputs, recipe_file])
    check_recipe_inputs(recipe)
    keys = step_keys(recipe)
    reuse = _Reuse(out if out.is_dir() else None, keys)
    with writing_directory(out, "run") as tmp:
        written = _run_steps(recipe, tmp, out, progress, reuse)
        (tmp / STEPS_FILE).write_text(json.dumps(keys, indent=1) + "\n")
        written["reused"] = sorted(reuse.matching)
    return {key: value.replace(str(tmp), str(out)) if isinstance(value, str) else value
            for key, value in written.items()}


def _run_steps(recipe: Recipe, out: Path, final: Path, progress: bool, reuse: _Reuse) -> dict[str, Any]:
    """The steps, written into ``out`` (a temporary directory that becomes ``final``); ``reuse`` takes over the
    earlier run's steps whose keys match."""
    from moekit.profile import profile_model

    (out / "recipe.resolved.yaml").write_text(resolved_yaml(recipe))
    written: dict[str, Any] = {"out": str(out), "recipe": str(out / "recipe.resolved.yaml")}
    step = recipe.profile
    prune = recipe.edit
    profile_path = Path(step.path) if step.path else out / "profile"
    if not step.path and (prune is None or _method(prune).needs.profile):
        if not reuse.take("profile", out):
            profile_model(recipe.model, _data_args(recipe), profile_path, seq_len=step.seq_len,
                          max_tokens=step.max_tokens, seed=recipe.seed, batch_size=step.batch_size,
                          device=step.device, dtype=step.dtype, neuron_stats=step.neuron_stats,
                          merge_stats=step.merge_stats, gradients=step.gradients, tokenizer=step.tokenizer,
                          progress=progress)
        written["profile"] = str(profile_path)
    if prune is None:
        return written
    if reuse.take("model", out):
        plan = json.loads((out / "model" / "moekit_plan.json").read_text())
    else:
        plan = _prune_step(recipe, out, final, profile_path, progress)
    written["model"] = str(out / "model")
    if recipe.eval is not None:
        written.update(_evaluate_and_report(recipe, out, plan, profile_path if profile_path.exists() else None,
                                            progress, reuse))
    return written


def _data_args(recipe: Recipe) -> list[str]:
    return [f"{name}={path}" for name, path in recipe.profile.data.items()]


def _edited(recipe: Recipe) -> str:
    """The edited model's name in the run's evaluation: pruned or merged."""
    return "merged" if recipe.merge is not None else "pruned"


def _method(prune: PruneStep | MergeStep) -> Any:
    from moekit.plan.methods import METHODS

    return METHODS.get(prune.method)


def _prune_step(recipe: Recipe, out: Path, final: Path, profile_path: Path, progress: bool) -> dict[str, Any]:
    """Plan (``moekit.pipeline.make_plan``: the method's needs from the profile step or its data) and write the
    pruned or merged model into ``out/model``; the plan."""
    from moekit.pipeline import PlanInputs, RunOptions, apply_plan, make_plan
    from moekit.profile import Profile

    step, prune = recipe.profile, recipe.edit
    assert prune is not None
    needs = _method(prune).needs
    device = prune.device if isinstance(prune, MergeStep) else step.device
    run = RunOptions(device=device, dtype=step.dtype, seq_len=step.seq_len, max_tokens=step.max_tokens,
                     batch_size=step.batch_size, tokenizer=step.tokenizer, progress=progress)
    inputs = PlanInputs(profile=Profile.load(profile_path) if needs.profile else None,
                        profile_path=(Path(step.path) if step.path else final / "profile") if needs.profile else None,
                        data=tuple(_data_args(recipe)) if needs.data else (), run=run,
                        options={"search": prune.naee.search, "tokens": prune.naee.tokens,
                                 "progressive": prune.naee.progressive} if isinstance(prune, PruneStep) else {})
    text = ",".join(f"{k}={v}" for k, v in prune.set_weights.items()) if prune.set_weights else None
    request = replace(_plan_request(recipe), set_weights=inputs.set_weights(text))
    plan = make_plan(recipe.model, request, inputs, _spelling(prune.KIND), kind=prune.KIND)
    apply_plan(recipe.model, plan, out / "model", dtype=prune.dtype,
                    reproduce=f"moekit run {final / 'recipe.resolved.yaml'}")
    return plan


def _evaluate_and_report(recipe: Recipe, out: Path, plan: dict[str, Any], profile: Path | None,
                         progress: bool, reuse: _Reuse) -> dict[str, Any]:
    """Evaluate the original and the pruned (or merged) model the same way; report both."""
    from moekit.eval import EvalError
    from moekit.pipeline import evaluate_model
    from moekit.report import build_report, result_point

    step = recipe.eval
    assert step is not None
    written: dict[str, Any] = {}
    (out / "eval").mkdir(exist_ok=True)
    points = []
    samples: list[dict[str, Any]] = []
    ratio = 1 - plan["num_experts"]["after"] / plan["num_experts"]["before"]
    for name, source, method, removed in (("original", recipe.model, "original", 0.0),
                                          (_edited(recipe), str(out / "model"), str(plan.get("method")), ratio)):
        path = out / "eval" / f"{name}.json"
        if reuse.take(f"eval/{name}.json", out):
            results = json.loads(path.read_text())
        else:
            try:
                results = evaluate_model(source, step.tasks, dict(step.text), limit=step.limit,
                                         num_fewshot=step.num_fewshot, max_length=step.max_length,
                                         batch_size=step.batch_size, device=step.device, dtype=step.dtype,
                                         progress=progress, prompts=step.prompts or None,
                                         max_new_tokens=step.max_new_tokens)
            except EvalError as err:  # say which model of the run it was
                raise EvalError(f"evaluating the {name} model ({recipe.model if name == 'original' else 'model/'})"
                                f": {err}") from None
            path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        for index, sample in enumerate(results.get("samples", [])):
            if len(samples) <= index:
                samples.append({"prompt": sample["prompt"], "completions": {}})
            samples[index]["completions"][name] = sample["completion"]
        written[f"eval_{name}"] = str(path)
        points.append(result_point(name, method, removed, results))
    if recipe.report:
        md, _ = build_report(out / "report", profile=profile, plans=[plan], results=points, samples=samples or None,
                             title=f"moekit run: {Path(recipe.model).name}")
        written["report"] = str(md)
    return written


__all__ = ["Recipe", "RecipeError", "read_recipe", "run_recipe"]
