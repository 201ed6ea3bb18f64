"""Readers for the benchmark files in the shared eval folder (read in place, never copied).

Each reader returns plain records and checks the fields it needs, naming file and line on error.
The folder is ``data_dir`` when given, else ``$MOEKIT_EVAL_DATA``, else ``../shared/data/eval``
from the working directory or from the repository checkout.

HellaSwag arrives in llama.cpp's text format (6 lines per item: context, gold label, 4 endings),
where the context line is ``activity_label + ": " + ctx_a + " " + ctx_b`` with WikiHow's ``[title]``
markers already turned into ``". "``. lm-eval's preprocessing (``tasks/hellaswag/utils.py``) builds
``query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` and
``choices = [preprocess(ending)]``, where ``preprocess`` strips, turns ``" [title]"`` into ``". "``,
removes every ``[...]`` and turns double spaces into single ones. The text format has lost the
ctx_a / ctx_b boundary, so ``split_hellaswag_context`` recovers it: WikiHow contexts (``"How to ..."``)
have an empty ctx_b; for ActivityNet ones ctx_b is the fragment after the last ``". "`` when it
starts in lower case (ctx_b is the unfinished sentence the endings complete).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moekit.eval.errors import EvalError

DATA_ENV = "MOEKIT_EVAL_DATA"


def default_data_dir() -> Path:
    """``$MOEKIT_EVAL_DATA``, else the first ``../shared/data/eval`` found from the cwd or the checkout."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    candidates = [Path.cwd() / "../shared/data/eval", Path(__file__).resolve().parents[3] / "../shared/data/eval"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0]


class TaskFileMissing(EvalError):
    """A benchmark file is not in the folder it was looked for in."""


def data_file(data_dir: str | Path | None, filename: str) -> Path:
    """The path of one benchmark file, with an error that says where it was looked for."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / filename
    if not path.is_file():
        where = "which does not exist" if not folder.is_dir() else "which does not hold it"
        raise TaskFileMissing(f"task file {filename} not found in {folder} ({where}): give the folder of the benchmark "
                        f"files with --data-dir FOLDER (Python: data_dir=FOLDER) or ${DATA_ENV}; `moekit eval "
                        "--list-tasks` names the file each task reads")
    return path


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; each must hold the ``required`` fields."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"data file {path} not found: check the path (relative paths are from the task's YAML file)")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{number} is not valid JSON ({err}): write one JSON object per line") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{number} is a JSON {type(row).__name__}, not an object")
            missing = [field for field in required if field not in row]
            if missing:
                raise EvalError(f"{path}:{number} lacks the field(s) {', '.join(missing)}; it has {', '.join(row)}")
            rows.append(row)
    if not rows:
        raise EvalError(f"{path} holds no items")
    return rows


def load_rows(data_dir: str | Path | None, filename: str, reader: Any) -> Any:
    """``reader(path)`` of the local benchmark file; when it is missing and no folder was named (neither
    ``data_dir`` nor ``$MOEKIT_EVAL_DATA``), the same benchmark from the hub (``moekit.eval.hub``), checked as the
    local file would be. The error when neither works names ``--data-dir``."""
    try:
        return reader(data_file(data_dir, filename))
    except TaskFileMissing as missing:
        if data_dir is not None or os.environ.get(DATA_ENV):
            raise
        from moekit.eval.hub import hub_rows

        rows = hub_rows(filename, missing)
    where = Path(f"hub copy of {filename}")
    if filename == "winogrande.jsonl":
        _check_choice_rows(where, rows, "context_options")
    elif isinstance(rows, list) and rows and "choices" in rows[0]:
        _check_choice_rows(where, rows)
    return rows


def _check_choice_rows(path: Path, rows: list[dict[str, Any]], choices: str = "choices") -> None:
    for number, row in enumerate(rows, 1):
        options, gold = row[choices], row["gold"]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise EvalError(f"{path} item {number}: {choices!r} must be a list of at least 2 strings")
        if not isinstance(gold, int) or not 0 <= gold < len(options):
            raise EvalError(f"{path} item {number}: gold {gold!r} is not an index into its {len(options)} choices")


def read_choice_file(path: Path) -> list[dict[str, Any]]:
    """ARC / PIQA: ``{"query", "choices", "gold"}`` per line."""
    rows = read_jsonl(path, ("query", "choices", "gold"))
    _check_choice_rows(path, rows)
    return rows


def read_winogrande(path: Path) -> list[dict[str, Any]]:
    """Winogrande: ``{"context_options": [a, b], "continuation", "gold"}`` per line."""
    rows = read_jsonl(path, ("context_options", "continuation", "gold"))
    _check_choice_rows(path, rows, "context_options")
    return rows


def read_lambada(path: Path) -> list[dict[str, Any]]:
    """LAMBADA-OpenAI: ``{"context", "continuation"}`` (the text split before its last word)."""
    return read_jsonl(path, ("context", "continuation"))


def read_gsm8k(path: Path) -> list[dict[str, Any]]:
    """GSM8K test: ``{"context", "chain_of_thought", "answer"}`` (question, worked solution, final number)."""
    return read_jsonl(path, ("context", "chain_of_thought", "answer"))


def read_human_eval(path: Path) -> list[dict[str, Any]]:
    """HumanEval: ``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``."""
    return read_jsonl(path, ("task_id", "prompt", "canonical_solution", "test", "entry_point"))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def split_hellaswag_context(line: str) -> tuple[str, str, str]:
    """(activity_label, ctx_a, ctx_b) of a llama.cpp HellaSwag context line (see module docstring)."""
    label, _, ctx = line.partition(": ")
    if ctx.startswith("How to "):
        return label, ctx, ""
    head, sep, tail = ctx.rpartition(". ")
    if sep and tail[:1].islower():
        return label, head + ".", tail
    return label, ctx, ""


def hellaswag_item(activity_label: str, ctx_a: str, ctx_b: str, endings: Sequence[str], label: int) -> dict[str, Any]:
    """lm-eval's ``process_docs`` for one HellaSwag document."""
    ctx = ctx_a + " " + ctx_b.capitalize()
    return {"query": hellaswag_preprocess(activity_label + ": " + ctx),
            "choices": [hellaswag_preprocess(ending) for ending in endings], "gold": int(label)}


def read_hellaswag_raw(path: Path) -> list[dict[str, Any]]:
    """HellaSwag as lm-eval's source fields: activity_label, ctx_a, ctx_b, endings, label."""
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise EvalError(f"{path} has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings per item)")
    docs = []
    for start in range(0, len(lines), 6):
        context, label, *endings = lines[start:start + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise EvalError(f"{path}:{start + 2}: gold label {label!r} is not 0-3")
        activity_label, ctx_a, ctx_b = split_hellaswag_context(context)
        docs.append({"activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings,
                     "label": int(label)})
    return docs


def read_hellaswag(path: Path) -> list[dict[str, Any]]:
    """HellaSwag items ``{"query", "choices", "gold"}`` after lm-eval's preprocessing."""
    return [hellaswag_item(d["activity_label"], d["ctx_a"], d["ctx_b"], d["endings"], d["label"])
            for d in read_hellaswag_raw(path)]


def read_mmlu(path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{subject: {"dev": rows, "test": rows}}; a row is {"question", "choices": [4], "answer": 0-3}."""
    subjects: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        archive = tarfile.open(path, "r:xz")
    except (tarfile.TarError, OSError) as err:
        raise EvalError(f"{path} is not a readable .tar.xz archive: {err}") from None
    with archive:
        for member in archive:
            match = re.fullmatch(r"(dev|test)/(\w+)_(dev|test)\.csv", member.name)
            if not member.isfile() or not match:
                continue
            split, subject = match.group(1), match.group(2)
            handle = archive.extractfile(member)
            assert handle is not None
            rows = []
            for number, record in enumerate(csv.reader(io.StringIO(handle.read().decode("utf-8"))), 1):
                if len(record) != 6 or record[5] not in ("A", "B", "C", "D"):
                    raise EvalError(f"{path}:{member.name}:{number}: expected question, A, B, C, D, answer letter")
                rows.append({"question": record[0], "choices": record[1:5], "answer": "ABCD".index(record[5])})
            subjects.setdefault(subject, {"dev": [], "test": []})[split] = rows
    if not subjects:
        raise EvalError(f"{path} holds no dev/*.csv or test/*.csv files")
    return dict(sorted(subjects.items()))
