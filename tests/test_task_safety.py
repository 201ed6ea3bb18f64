"""User task files cannot reach outside their folder, and their templates only substitute plain fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moekit.eval import EvalError, TaskSpec, build_custom_task, load_task_spec

ROWS = [{"q": "2+2", "options": ["3", "4"], "answer": 1}, {"q": "1+1", "options": ["2", "5"], "answer": 0}]


def write_task(folder: Path, data_path: str, prompt: str = "Q: {q}") -> Path:
    """A multiple-choice task YAML in ``folder`` whose data is ``data_path``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "task.yaml"
    path.write_text(f"name: t\nkind: multiple_choice\ndata_path: {json.dumps(data_path)}\n"
                    f"prompt: {json.dumps(prompt)}\nchoices: options\ngold: answer\n")
    return path


def write_rows(path: Path, rows: list[dict] = ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- data_path stays under the task file's folder --------------------------------------------------------------------

def test_relative_data_path_inside_the_folder_works(tmp_path) -> None:
    write_rows(tmp_path / "tasks" / "sub" / "d.jsonl")
    spec = load_task_spec(write_task(tmp_path / "tasks", "sub/../sub/d.jsonl"))
    assert spec.data_path == (tmp_path / "tasks" / "sub" / "d.jsonl").resolve()
    assert len(build_custom_task(spec).items) == 2


def test_data_path_escaping_the_folder_is_refused(tmp_path) -> None:
    write_rows(tmp_path / "secret.jsonl")
    with pytest.raises(EvalError, match=r"data_path '\.\./secret\.jsonl' is outside the task file's folder"):
        load_task_spec(write_task(tmp_path / "tasks", "../secret.jsonl"))


def test_absolute_data_path_is_refused(tmp_path) -> None:
    secret = write_rows(tmp_path / "secret.jsonl")
    with pytest.raises(EvalError, match=r"is an absolute path.*relative to the task file's folder"):
        load_task_spec(write_task(tmp_path / "tasks", str(secret)))


def test_symlink_out_of_the_folder_is_refused(tmp_path) -> None:
    secret = write_rows(tmp_path / "secret.jsonl")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "link.jsonl").symlink_to(secret)
    with pytest.raises(EvalError, match="is outside the task file's folder"):
        load_task_spec(write_task(tmp_path / "tasks", "link.jsonl"))


def test_data_outside_is_read_when_the_caller_allows_it(tmp_path) -> None:
    secret = write_rows(tmp_path / "secret.jsonl")
    secret = secret.resolve()
    assert load_task_spec(write_task(tmp_path / "a", "../secret.jsonl"), allow_outside=True).data_path == secret
    assert load_task_spec(write_task(tmp_path / "b", str(secret)), allow_outside=True).data_path == secret
    values = {"name": "t", "kind": "perplexity", "data_path": str(secret), "text": "{q}"}
    with pytest.raises(EvalError, match="absolute path"):
        TaskSpec.from_dict(values, tmp_path / "a")
    assert TaskSpec.from_dict(values, tmp_path / "a", allow_outside=True).data_path == secret


# --- templates: plain {field} placeholders only ----------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "message"), [
    ("Q: {q.__class__}", r"\{q\.__class__\}: attribute access and indexing are not allowed"),
    ("Q: {q[0]}", r"\{q\[0\]\}: attribute access and indexing are not allowed"),
    ("Q: {q!r}", r"\{q!r\}: conversions \(!r, !s, !a\) are not allowed"),
    ("Q: {q!s}", r"\{q!s\}: conversions"),
    ("Q: {q:>300000000}", r"\{q:>300000000\}: format specs are not allowed"),
    ("Q: {q:{answer}}", r"\{q:\{answer\}\}: format specs are not allowed"),
    ("Q: {q:}", r"\{q:\}: format specs are not allowed"),
])
def test_template_beyond_plain_fields_is_refused_when_the_spec_is_read(tmp_path, prompt: str, message: str) -> None:
    write_rows(tmp_path / "d.jsonl")
    with pytest.raises(EvalError, match=r"task 't' prompt: template .*" + message):
        load_task_spec(write_task(tmp_path, "d.jsonl", prompt))  # no row is read or rendered


def test_text_template_is_checked_too() -> None:
    with pytest.raises(EvalError, match=r"task 'p' text: template .*format specs are not allowed"):
        TaskSpec(name="p", kind="perplexity", data_path=Path("d.jsonl"), text="{q:x<99999999}")


def test_plain_template_renders_as_before(tmp_path) -> None:
    write_rows(tmp_path / "d.jsonl")
    prompt = "{{literal}} Q: {q} ({options}; gold {answer}, {answer}){{"
    task = build_custom_task(load_task_spec(write_task(tmp_path, "d.jsonl", prompt)))
    context, continuation = task.items[0].requests[1]
    assert context == "{literal} Q: 2+2 (['3', '4']; gold 1, 1){"
    assert continuation == " 4"
    assert task.items[1].requests[0][0] == "{literal} Q: 1+1 (['2', '5']; gold 0, 0){"
