"""``evaluate``: run tasks on a model and return JSON-serialisable results.

    results = evaluate(model, tokenizer, ["arc_easy", "piqa", "my_task.yaml"], limit=200, batch_size=16)
    results["tasks"]["arc_easy"]["metrics"]["acc_norm"]

Per task: ``metrics`` and their ``stderr`` (standard error of the mean over items; None where not
defined), ``n`` items, ``num_fewshot``, ``seconds``, the lm-eval task ``version`` the prompts follow,
per-group values (MMLU subjects) and, with ``samples=True``, per-item details. The result also
records the versions of moekit, torch, transformers and Python, the model and the settings.
All tasks are built (files read, specs checked) before the model runs, so bad input fails fast.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moekit.environment import versions
from moekit.eval import metrics
from moekit.eval.custom import TaskSpec, build_custom_task, load_task_spec
from moekit.eval.errors import EvalError
from moekit.eval.generate import generate_greedy
from moekit.eval.perplexity import perplexity
from moekit.eval.refusal import REFUSAL_RULE, answer_requests, is_refusal
from moekit.eval.scoring import encode_pair, model_device, resolve_max_length, score_pairs
from moekit.eval.tasks import TASKS, ChoiceItem, ContinuationItem, GenerationItem, Task, build_task

RESULTS_SCHEMA = 1
TaskRef = str | Path | TaskSpec | Task


def resolve_task(ref: TaskRef, *, data_dir: str | Path | None = None, num_fewshot: int | None = None,
                 limit: int | None = None) -> Task:
    """A registered name, a YAML path, a ``TaskSpec`` or a ready ``Task`` → a ``Task`` with ``limit`` items."""
    if isinstance(ref, Task):
        return ref if limit is None else replace(ref, items=ref.items[:limit])
    if isinstance(ref, TaskSpec):
        return build_custom_task(ref, limit)
    text = str(ref)
    if isinstance(ref, Path) or text.endswith((".yaml", ".yml")):
        return build_custom_task(load_task_spec(text), limit)
    if text not in TASKS:
        raise EvalError(f"unknown eval task {text!r}; valid: {', '.join(TASKS.names())} "
                        "(or the path of a task YAML file, or a TaskSpec)")
    return build_task(text, Path(data_dir) if data_dir is not None else None, num_fewshot, limit)


def _summary(per_item: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float | None]]:
    values = {name: metrics.mean(scores) for name, scores in per_item.items()}
    errors = {name: metrics.mean_stderr(scores) for name, scores in per_item.items()}
    return values, errors


def _run_choice(task: Task, model: Any, tokenizer: Any, opts: dict[str, Any], samples: bool) -> dict[str, Any]:
    items: list[ChoiceItem] = list(task.items)  # type: ignore[arg-type]
    pairs = [encode_pair(tokenizer, ctx, cont) for item in items for ctx, cont in item.requests]
    scores = score_pairs(model, pairs, desc=task.name, **opts)
    per_item: dict[str, list[float]] = defaultdict(list)
    groups: dict[str, list[float]] = defaultdict(list)
    details = []
    at = 0
    for item in items:
        lls = [ll for ll, _ in scores[at:at + len(item.requests)]]
        at += len(item.requests)
        item_scores = metrics.choice_scores(lls, item.choices, item.gold)
        for name in task.metrics:
            per_item[name].append(item_scores[name])
        if item.group:
            groups[item.group].append(item_scores["acc"])
        if samples:
            details.append({"logliks": lls, "gold": item.gold, "pred": metrics.argmax(lls), **item_scores})
    values, errors = _summary(per_item)
    out: dict[str, Any] = {"metrics": values, "stderr": errors}
    if groups:
        out["groups"] = {g: {"acc": metrics.mean(v), "n": len(v)} for g, v in sorted(groups.items())}
    if samples:
        out["samples"] = details
    return out


def _run_loglikelihood(task: Task, model: Any, tokenizer: Any, opts: dict[str, Any], samples: bool) -> dict[str, Any]:
    items: list[ContinuationItem] = list(task.items)  # type: ignore[arg-type]
    pairs = [encode_pair(tokenizer, item.context, item.continuation) for item in items]
    scores = score_pairs(model, pairs, desc=task.name, **opts)
    lls = [ll for ll, _ in scores]
    greedy = [float(g) for _, g in scores]
    out: dict[str, Any] = {
        "metrics": {"acc": metrics.mean(greedy), "perplexity": metrics.perplexity_of_logliks(lls)},
        "stderr": {"acc": metrics.mean_stderr(greedy), "perplexity": metrics.perplexity_stderr(lls)},
    }
    if samples:
        out["samples"] = [{"loglik": ll, "greedy": bool(g)} for ll, g in scores]
    return out


def _run_generation(task: Task, model: Any, tokenizer: Any, opts: dict[str, Any], samples: bool,
                    max_new_tokens: int | None) -> dict[str, Any]:
    items: list[GenerationItem] = list(task.items)  # type: ignore[arg-type]
    prompts = [item.prompt for item in items]
    limit, template = max_new_tokens or task.max_new_tokens, None
    if task.answer == "refusal":  # requests, put to the model as chat turns
        completions, template = answer_requests(model, tokenizer, prompts, max_new_tokens=limit, until=task.until,
                                                desc=task.name, **opts)
    else:
        completions = generate_greedy(model, tokenizer, prompts, until=task.until, max_new_tokens=limit,
                                      desc=task.name, **opts)
    per_item: dict[str, list[float]] = defaultdict(list)
    details = []
    for item, completion in zip(items, completions, strict=True):
        if task.answer == "gsm8k":
            item_scores = metrics.gsm8k_scores(completion, item.target)
        elif task.answer == "refusal":
            item_scores = {"refusal_rate": float(is_refusal(completion))}
        else:
            item_scores = {"exact_match": float(completion.strip() == item.target.strip())}
        for name in task.metrics:
            per_item[name].append(item_scores[name])
        if samples:
            details.append({"completion": completion, "target": item.target, **item_scores})
    values, errors = _summary(per_item)
    out: dict[str, Any] = {"metrics": values, "stderr": errors}
    if template is not None:  # what a refusal rate means depends on how the requests were put to the model
        out["prompt_template"] = template
        out["refusal_rule"] = REFUSAL_RULE
    if samples:
        out["samples"] = details
    return out


def _run_perplexity(task: Task, model: Any, tokenizer: Any, opts: dict[str, Any], max_length: int | None,
                    stride: int | None) -> dict[str, Any]:
    texts = [item.text for item in task.items]  # type: ignore[union-attr]
    result = perplexity(model, tokenizer, texts, max_length=max_length, stride=stride, **opts)
    values = {"word_perplexity": result.word_perplexity, "byte_perplexity": result.byte_perplexity,
              "bits_per_byte": result.bits_per_byte, "token_perplexity": result.ppl}
    return {"metrics": values, "stderr": dict.fromkeys(values), "counts": result.to_dict()}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: store them as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def evaluate(model: Any, tokenizer: Any = None, tasks: Sequence[TaskRef] = (), *,
             limit: int | None = None, batch_size: int = 8, device: str | torch.device | None = None,
             num_fewshot: int | dict[str, int] | None = None, max_length: int | None = None,
             stride: int | None = None, max_new_tokens: int | None = None, data_dir: str | Path | None = None,
             samples: bool = False, progress: bool = True,
             lm_eval_include: str | Path | Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Run ``tasks`` on ``model`` and return JSON-serialisable results (see module docstring).

    ``model``: a loaded causal LM, or a model directory (then ``tokenizer`` defaults to its own).
    ``tasks``: registered names (``moekit.eval.TASKS.names()``), task YAML paths, ``TaskSpec``s.
    ``limit``: the first N items of each task (of each subject for MMLU). ``num_fewshot``: one value
    for every registered task, or ``{task: n}``; None keeps each task's default (user tasks set theirs
    in their spec). ``max_length``: the window (default: the model's context). ``stride``: for
    perplexity tasks. ``max_new_tokens``: overrides generation tasks' limit. ``device``: moves the
    model there (default: where it is). ``samples``: add per-item details (log-likelihoods,
    completions). ``progress``: tqdm bars. A name that is not a built-in task is one of lm-evaluation-harness's
    registered tasks (or of its task YAMLs under ``lm_eval_include``), run by lm-eval itself on this model
    (``moekit.eval.harness``; needs ``moekit[lm-eval]``); ``num_fewshot`` (one value) and ``limit`` apply to them.
    """
    from moekit.eval import harness

    if isinstance(tasks, (str, Path, TaskSpec, Task)):
        tasks = [tasks]
    if not tasks:
        raise EvalError(f"no tasks given: name some of {', '.join(TASKS.names())}")
    lm_eval_names = harness.lm_eval_names(tasks, TASKS)
    tasks = [ref for ref in tasks if not (isinstance(ref, str) and ref in lm_eval_names)]
    if isinstance(num_fewshot, dict) and set(num_fewshot) & set(lm_eval_names):
        raise EvalError("num_fewshot per task is for built-in tasks; lm-eval tasks take one value for all")
    manager = harness.check_harness_tasks(lm_eval_names, lm_eval_include, TASKS.names())  # before weights load
    if isinstance(model, (str, Path)):
        from moekit.data import load_tokenizer
        from moekit.model_io import load_model

        source = model
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)  # checked before any weight loads
        model = load_model(source)
    if tokenizer is None:
        raise EvalError("a tokenizer is needed: pass tokenizer=moekit.data.load_tokenizer(<model dir>)")
    if isinstance(num_fewshot, dict):
        unknown = sorted(set(num_fewshot) - {str(ref) for ref in tasks})
        if unknown:
            raise EvalError(f"num_fewshot names {', '.join(unknown)}, which are not among the registered tasks "
                            "asked for (user tasks set num_fewshot in their spec)")
    built = [resolve_task(ref, data_dir=data_dir, limit=limit,
                          num_fewshot=num_fewshot.get(str(ref)) if isinstance(num_fewshot, dict) else num_fewshot)
             for ref in tasks]
    names = [task.name for task in built] + lm_eval_names
    if len(set(names)) != len(names):
        raise EvalError(f"task names must be unique, got {', '.join(names)}")
    if device is not None:
        model = model.to(device)
    model.eval()
    window = resolve_max_length(model, tokenizer, max_length)
    opts = {"batch_size": batch_size, "progress": progress, "max_length": window}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for task in built:
        t0 = time.perf_counter()
        if task.kind == "multiple_choice":
            out = _run_choice(task, model, tokenizer, opts, samples)
        elif task.kind == "loglikelihood":
            out = _run_loglikelihood(task, model, tokenizer, opts, samples)
        elif task.kind == "generation":
            out = _run_generation(task, model, tokenizer, opts, samples, max_new_tokens)
        else:
            out = _run_perplexity(task, model, tokenizer, {"batch_size": batch_size, "progress": progress},
                                  window, stride)
        results[task.name] = {"kind": task.kind, **out, "n": len(task.items), "num_fewshot": task.num_fewshot,
                              "version": task.version, "seconds": round(time.perf_counter() - t0, 3)}
    if lm_eval_names:
        t0 = time.perf_counter()
        entries = harness.run_harness(model, tokenizer, lm_eval_names, limit=limit, batch_size=batch_size,
                                      num_fewshot=num_fewshot if isinstance(num_fewshot, int) else None,
                                      max_length=window, task_manager=manager)
        clash = sorted(set(entries) & set(results))
        if clash:
            raise EvalError(f"lm-eval reported tasks named like built-in ones: {', '.join(clash)}")
        for entry in entries.values():
            entry["seconds_all_lm_eval_tasks"] = round(time.perf_counter() - t0, 3)
        results.update(entries)
    config = getattr(model, "config", None)
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), None)
    return _finite({
        "schema": RESULTS_SCHEMA,
        "versions": {**versions(), **({"lm_eval": harness.harness_version()} if lm_eval_names else {})},
        "model": {"name": str(getattr(config, "_name_or_path", "") or type(model).__name__),
                  "dtype": dtype, "device": str(model_device(model)), "max_length": window},
        "settings": {"limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot, "stride": stride,
                     "max_new_tokens": max_new_tokens},
        "tasks": results,
        "seconds": round(time.perf_counter() - started, 3),
    })
