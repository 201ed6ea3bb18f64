"""Report inputs: read and check plans, evaluation results and a demo directory.

A *result point* is one model's metrics placed on the compression axis::

    ResultPoint(label="reap 50%", method="reap", ratio=0.5,
                metrics={"perplexity/code": 3.1, "arc_easy/acc_norm": 0.41})

``ratio`` is the fraction of experts removed (0 for the original model). Metric names are
``task/metric`` for benchmark tasks and ``perplexity/NAME`` for perplexity on named text, as
``flatten_eval_results`` makes them from a ``moekit eval --json`` file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.report.errors import ReportError

PLAN_FORMAT_PREFIX = "moekit.expert_prune_plan/"
MERGE_PLAN_FORMAT_PREFIX = "moekit.expert_merge_plan/"
NEURON_PLAN_FORMAT_PREFIX = "moekit.neuron_prune_plan/"
SPARSITY_PLAN_FORMAT_PREFIX = "moekit.sparsity_plan/"
PLAN_FORMAT_PREFIXES = (PLAN_FORMAT_PREFIX, MERGE_PLAN_FORMAT_PREFIX, NEURON_PLAN_FORMAT_PREFIX,
                        SPARSITY_PLAN_FORMAT_PREFIX)
ORIGINAL_METHOD = "original"


@dataclass(frozen=True)
class ResultPoint:
    """One model's metric values at one compression ratio (fraction of experts removed)."""

    label: str
    method: str
    ratio: float
    metrics: dict[str, float | None] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)  # standard errors, where the evaluation gave them


def read_json(path: str | Path, what: str) -> Any:
    """The parsed JSON of ``path``; a ReportError naming ``what`` if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{what} {path} does not exist (or is not a file)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{what} {path} cannot be read as JSON: {err}") from None


def check_plan(plan: Any, where: str = "plan") -> dict[str, Any]:
    """``plan`` if it is a moekit pruning, merge or neuron plan (``moekit_plan.json``), else a ReportError."""
    if not isinstance(plan, Mapping) or not str(plan.get("format", "")).startswith(PLAN_FORMAT_PREFIXES):
        raise ReportError(f"{where} is not a moekit plan (moekit prune and moekit merge write moekit_plan.json, "
                          f"with format {PLAN_FORMAT_PREFIX}N, {MERGE_PLAN_FORMAT_PREFIX}N, "
                          f"{NEURON_PLAN_FORMAT_PREFIX}N or {SPARSITY_PLAN_FORMAT_PREFIX}N)")
    layers = plan.get("layers")
    if not isinstance(layers, Mapping) or not layers:
        raise ReportError(f"{where} has no layers: it is not a complete moekit pruning plan")
    for name, layer in layers.items():
        if not isinstance(layer, Mapping) or not isinstance(layer.get("kept"), list):
            raise ReportError(f"{where}: layer {name} has no list of kept experts (corrupted plan)")
    return dict(plan)


def load_plan(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A plan from a dict, a ``moekit_plan.json`` file, or a pruned checkpoint directory holding one."""
    if isinstance(source, Mapping):
        return check_plan(source)
    path = Path(source)
    if path.is_dir():
        path = path / "moekit_plan.json"
    return check_plan(read_json(path, "plan file"), str(path))


def plan_title(plan: Mapping[str, Any]) -> str:
    """A short name for a plan: criterion, ratio or kept count, and weighted sets if not all equal (a sparsity plan:
    its expert stage's, then the sparsity)."""
    details = plan.get("details") or {}
    if str(plan.get("format", "")).startswith(SPARSITY_PLAN_FORMAT_PREFIX):
        experts = details.get("experts")
        first = plan_title({"details": experts.get("details") or {}, "method": experts.get("method"),
                            "num_experts": plan.get("num_experts")}) + ", then " if experts else ""
        measured = (plan.get("measured_sparsity") or {}).get("routed_expert_weights")
        return (f"{first}{details.get('weight_criterion')} sparsity {details.get('sparsity')} of the kept experts' "
                f"weights ({details.get('allocation')}, {details.get('pattern')}"
                + (f"; measured {100 * measured:.1f}%" if measured is not None else "") + ")")
    method = details.get("criterion") or plan.get("method") or "plan"
    experts = plan.get("num_experts") or {}
    if details.get("ratio") is not None:
        budget = f"{100 * float(details['ratio']):g}% removed"
    else:
        budget = f"{experts.get('after', '?')} of {experts.get('before', '?')} kept"
    weights = details.get("set_weights") or {}
    sets = "" if len(set(weights.values())) <= 1 else ", sets " + ", ".join(f"{k}={v:g}" for k, v in weights.items())
    return f"{method}, {budget}{sets}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def flatten_eval_results(results: Any, where: str = "results") -> dict[str, float | None]:
    """``{"task/metric": value, "perplexity/NAME": ppl}`` from a ``moekit eval --json`` dict."""
    if not isinstance(results, Mapping) or not ({"tasks", "perplexity"} & set(results)):
        raise ReportError(f"{where} is not a moekit eval result (moekit eval --json writes one, with "
                          "'tasks' and 'perplexity')")
    flat: dict[str, float | None] = {}
    for task, entry in (results.get("tasks") or {}).items():
        for metric, value in ((entry or {}).get("metrics") or {}).items():
            flat[f"{task}/{metric}"] = _number(value)
    for name, entry in (results.get("perplexity") or {}).items():
        flat[f"perplexity/{name}"] = _number(entry.get("ppl") if isinstance(entry, Mapping) else entry)
    return flat


def flatten_eval_stderr(results: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"task/metric": standard error}`` from a ``moekit eval --json`` dict (tasks that report one)."""
    flat: dict[str, float | None] = {}
    for task, entry in (results.get("tasks") or {}).items():
        for metric, value in ((entry or {}).get("stderr") or {}).items():
            flat[f"{task}/{metric}"] = _number(value)
    return flat


def load_eval_results(path: str | Path) -> dict[str, Any]:
    """A ``moekit eval --json`` file, checked."""
    data = read_json(path, "results file")
    flatten_eval_results(data, str(path))
    return data


def result_point(label: str, method: str, ratio: float, results: str | Path | Mapping[str, Any]) -> ResultPoint:
    """A ResultPoint from a ``moekit eval --json`` file or dict."""
    data = results if isinstance(results, Mapping) else load_eval_results(results)
    return ResultPoint(label, method, float(ratio), flatten_eval_results(data, label), flatten_eval_stderr(data))


def coerce_result(item: ResultPoint | Mapping[str, Any]) -> ResultPoint:
    """Accept a ResultPoint or a dict with label, method, ratio and metrics (or an eval ``results`` dict)."""
    if isinstance(item, ResultPoint):
        point = item
    elif isinstance(item, Mapping):
        missing = [key for key in ("label", "ratio") if key not in item]
        if missing or not ({"metrics", "results"} & set(item)):
            raise ReportError(f"a result needs label, ratio and metrics (or results); got keys {sorted(item)}")
        if "results" in item:
            point = result_point(str(item["label"]), str(item.get("method") or ORIGINAL_METHOD), item["ratio"],
                                 item["results"])
        else:
            if not isinstance(item["metrics"], Mapping):
                raise ReportError(f"result {item['label']!r}: metrics must be a mapping of name to number")
            stderr = item.get("stderr") or {}
            if not isinstance(stderr, Mapping):
                raise ReportError(f"result {item['label']!r}: stderr must be a mapping of metric name to number")
            point = ResultPoint(str(item["label"]), str(item.get("method") or ORIGINAL_METHOD), float(item["ratio"]),
                                {str(k): _number(v) for k, v in item["metrics"].items()},
                                {str(k): _number(v) for k, v in stderr.items()})
    else:
        raise ReportError(f"a result must be a ResultPoint or a dict, not {type(item).__name__}")
    if not 0.0 <= point.ratio <= 1.0:
        raise ReportError(f"result {point.label!r}: ratio {point.ratio} is not a fraction of experts removed (0..1)")
    return point


def report_inputs_from_demo(demo_dir: str | Path) -> dict[str, Any]:
    """``build_report`` keyword arguments from a ``moekit demo`` output directory.

    The profile, each pruned variant's plan, per-domain perplexity of every model as result
    points (the original at ratio 0), a size table (parameters, experts per layer) and the contrast of the
    profile's first two sets.
    """
    from moekit.profile.profile_file import Profile, ProfileError

    demo_dir = Path(demo_dir)
    if not demo_dir.is_dir():
        raise ReportError(f"{demo_dir} is not a directory (moekit demo --out DIR writes one)")
    results = read_json(demo_dir / "results.json", "demo results file")
    if not isinstance(results, Mapping) or not isinstance(results.get("perplexity"), Mapping):
        raise ReportError(f"{demo_dir / 'results.json'} is not a moekit demo result (no per-model perplexity)")
    try:
        profile = Profile.load(demo_dir / "profile")
    except ProfileError as err:
        raise ReportError(f"the demo's profile cannot be used: {err}") from None
    variants = {v["name"]: v for v in results.get("variants", [])}
    ratio = float(results.get("ratio", 0.0))
    plans, points, sizes = [], [], {}
    for name, ppl in results["perplexity"].items():
        variant = variants.get(name, {"name": name, "label": name, "method": None})
        pruned = variant.get("method") is not None
        if pruned:
            plans.append(load_plan(demo_dir / name))
        points.append(ResultPoint(variant.get("label") or name, name if pruned else ORIGINAL_METHOD,
                                  ratio if pruned else 0.0,
                                  {f"perplexity/{domain}": _number(v) for domain, v in ppl.items()}))
        row: dict[str, float] = {}
        if name in results.get("parameters", {}):
            row["parameters"] = results["parameters"][name]
        experts = (results.get("summary") or {}).get("num_experts")
        if experts:
            row["experts_per_layer"] = round(experts * (1 - ratio)) if pruned else experts
        sizes[variant.get("label") or name] = row
    speed: dict[str, Any] = {"models": sizes}
    if (demo_dir / "speed.json").is_file():  # memory and speed measured by the demo (moekit speed's result)
        speed = read_json(demo_dir / "speed.json", "the demo's speed results")
    names = profile.set_names
    contrasts = [(names[0], names[1])] if len(names) >= 2 else []  # how the demo's two sets route apart
    return {"profile": profile, "plans": plans, "results": points, "speed": speed, "title": "moekit demo report",
            "contrasts": contrasts}
