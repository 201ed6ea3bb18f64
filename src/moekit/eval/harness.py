"""lm-evaluation-harness's own registered tasks, run on the model moekit loaded (optional: ``moekit[lm-eval]``).

    from moekit.eval.harness import harness_available, harness_tasks, run_harness

    if harness_available():
        entries = run_harness(model, tokenizer, ["arc_easy", "mmlu"], limit=100)

A task name that is not one of moekit's built-in tasks (``moekit.eval.TASKS``) is looked up in lm-eval's task
registry (its ``TaskManager``, plus ``include_path`` folders of task YAMLs of your own) and run through lm-eval's
Python API: ``lm_eval.simple_evaluate`` on an ``HFLM`` wrapping the already loaded model and tokenizer -- the
backend ``lm_eval --model hf`` uses, so the numbers are lm-eval's (its prompts, few-shot sampling, metrics and
standard errors). Registered tasks download their datasets from the Hugging Face hub (``datasets``) unless they
are cached or the YAML points at local files; moekit's built-in tasks read local files instead.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from moekit.eval.errors import EvalError

INSTALL_HINT = "pip install 'moekit[lm-eval]'"


def harness_available() -> bool:
    """Whether lm-evaluation-harness is installed (checked without importing it: that takes seconds)."""
    return importlib.util.find_spec("lm_eval") is not None


def harness_version() -> str | None:
    if not harness_available():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def lm_eval_names(refs: Sequence[Any], builtin: Collection[str]) -> list[str]:
    """The task references that are lm-eval's: names that are neither built in nor a task YAML's path."""
    return [ref for ref in refs if isinstance(ref, str) and ref not in builtin and not ref.endswith((".yaml", ".yml"))]


def include_folders(include_path: str | Path | Sequence[str | Path] | None) -> tuple[str, ...]:
    """``--lm-eval-include`` as a tuple of folders, each checked to be one."""
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise EvalError(f"--lm-eval-include {path}: not a folder of lm-eval task YAMLs")
    return tuple(str(path) for path in paths)


def _task_manager(include_path: str | Path | Sequence[str | Path] | None) -> Any:
    return _indexed_task_manager(include_folders(include_path))


@functools.lru_cache(maxsize=4)
def _indexed_task_manager(folders: tuple[str, ...]) -> Any:
    """lm-eval's task index (seconds to build: it reads every task YAML), built once per set of include folders
    in a process, so checking names before the model loads and running them later index once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None)


def harness_tasks(include_path: str | Path | Sequence[str | Path] | None = None) -> list[str]:
    """Every task, group and tag name lm-eval knows (with the YAMLs under ``include_path``), sorted."""
    if not harness_available():
        raise EvalError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}")
    return sorted(_task_manager(include_path).all_tasks)


def check_harness_tasks(names: Sequence[str], include_path: str | Path | Sequence[str | Path] | None,
                        builtin: Sequence[str]) -> Any:
    """Refuse names lm-eval does not know (before any model loads); return the task manager to run them with."""
    if not names:
        return None
    if not harness_available():
        raise EvalError(f"unknown eval task {', '.join(map(repr, names))}; valid: {', '.join(builtin)} (or the "
                        f"path of a task YAML file); lm-evaluation-harness's registered tasks need it installed: "
                        f"{INSTALL_HINT}")
    manager = _task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise EvalError(f"unknown eval task {', '.join(map(repr, unknown))}; valid: {', '.join(builtin)}, the path "
                        f"of a task YAML file, or one of lm-evaluation-harness's {len(known):,} tasks (moekit eval "
                        "--list-tasks lists them; your own lm-eval YAMLs: --lm-eval-include DIR)")
    return manager


def _entries(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's per-task results (``"acc,none"``, ``"acc_stderr,none"``) as moekit's task entries."""
    out: dict[str, dict[str, Any]] = {}
    samples = results.get("n-samples") or {}
    for task, values in results.get("results", {}).items():
        metrics: dict[str, float] = {}
        stderr: dict[str, float | None] = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics[name] = float(value)
            error = values.get(f"{metric}_stderr,{filt}")
            stderr[name] = float(error) if isinstance(error, (int, float)) else None
        if not metrics:
            continue
        count = samples.get(task) or {}
        out[task] = {"kind": "lm-eval", "metrics": metrics, "stderr": stderr,
                     "n": count.get("effective", count.get("original")),
                     "num_fewshot": (results.get("n-shot") or {}).get(task),
                     "version": (results.get("versions") or {}).get(task),
                     "group": task in (results.get("groups") or {})}
    return out


def run_harness(model: Any, tokenizer: Any, names: Sequence[str], *, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, max_length: int | None = None,
                include_path: str | Path | Sequence[str | Path] | None = None, task_manager: Any = None,
                seed: int = 0) -> dict[str, dict[str, Any]]:
    """Run lm-eval's tasks ``names`` on the loaded ``model`` (``HFLM`` around it, as ``lm_eval --model hf``);
    returns moekit task entries per task and subtask lm-eval reports (metrics, stderr, n, version)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager or check_harness_tasks(names, include_path, [])
    device = str(next(model.parameters()).device)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                   device=device)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed + 1234, torch_random_seed=seed + 1234,
                                      fewshot_random_seed=seed + 1234)
    if results is None:  # lm-eval returns None on non-zero ranks of a distributed run
        return {}
    return _entries(results)
