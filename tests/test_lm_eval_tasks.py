"""lm-evaluation-harness's own tasks through `moekit eval` (moekit[lm-eval]; installed with the dev extra).

Offline: the lm-eval task here is a YAML of its own format (lm-eval's --include_path) over the local ARC-Easy
file, with lm-eval's ARC prompt, so lm-eval's result can be checked against moekit's built-in arc_easy, which
computes the same prompts and metrics with moekit's own code.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moekit.cli import app
from moekit.eval import data as eval_data
from moekit.eval import harness

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is part of the dev extra")
runner = CliRunner()
DATA = eval_data.default_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "arc_easy.jsonl").is_file(), reason=f"eval files not found in {DATA}")
ITEMS = 24

YAML = """task: local_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    assert runner.invoke(app, ["tiny-model", "qwen3_moe", "--out", str(root / "tiny")]).exit_code == 0
    tasks = root / "tasks"
    tasks.mkdir()
    lines = (DATA / "arc_easy.jsonl").read_text().splitlines()[:ITEMS]
    (tasks / "arc.jsonl").write_text("\n".join(lines) + "\n")
    (tasks / "local_arc_easy.yaml").write_text(YAML.format(data=tasks / "arc.jsonl"))
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_an_lm_eval_task_runs_through_lm_eval_and_agrees_with_the_built_in_task(setup) -> None:
    out = setup / "results.json"
    result = runner.invoke(app, ["eval", str(setup / "tiny"), "--task", "local_arc_easy,arc_easy", "--limit",
                                 str(ITEMS), "--lm-eval-include", str(setup / "tasks"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    ours, theirs = results["tasks"]["arc_easy"], results["tasks"]["local_arc_easy"]
    assert theirs["kind"] == "lm-eval" and ours["kind"] == "multiple_choice"
    assert theirs["n"] == ours["n"] == ITEMS
    assert results["versions"]["lm_eval"] == harness.harness_version()
    for metric in ("acc", "acc_norm"):
        assert theirs["metrics"][metric] == pytest.approx(ours["metrics"][metric], abs=1e-12)
        assert theirs["stderr"][metric] == pytest.approx(ours["stderr"][metric], rel=1e-9)
    # the tiny random model is not perfect, so agreement is not agreement on a trivial score
    assert 0.0 < ours["metrics"]["acc"] < 1.0


def test_unknown_task_names_are_refused_before_the_model_loads(setup, monkeypatch) -> None:
    import moekit.model_io

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a bad task name")

    monkeypatch.setattr(moekit.model_io, "load_model", no_load)
    result = runner.invoke(app, ["eval", str(setup / "tiny"), "--task", "arc_easy,no_such_task_xyz"])
    assert result.exit_code == 2
    assert "no_such_task_xyz" in result.output and "--list-tasks" in result.output
    result = runner.invoke(app, ["eval", str(setup / "tiny"), "--task", "arc_easy", "--lm-eval-include",
                                 str(setup / "missing-folder")])
    assert result.exit_code == 2 and "missing-folder" in result.output


def test_without_lm_eval_a_non_built_in_name_says_how_to_install_it(setup, monkeypatch) -> None:
    monkeypatch.setattr(harness, "harness_available", lambda: False)
    result = runner.invoke(app, ["eval", str(setup / "tiny"), "--task", "hellaswag_de"])
    assert result.exit_code == 2
    assert "moekit[lm-eval]" in result.output and "arc_easy" in result.output
    listed = runner.invoke(app, ["eval", "--list-tasks"])
    assert listed.exit_code == 0 and "not installed" in listed.output


def test_list_tasks_lists_built_in_and_lm_eval_tasks(setup) -> None:
    result = runner.invoke(app, ["eval", "--list-tasks", "--lm-eval-include", str(setup / "tasks")])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert any(line.startswith("arc_easy ") for line in lines)  # built-in, with its description
    assert "local_arc_easy" in lines and "hellaswag" in lines and "mmlu" in lines  # lm-eval's, one per line
    assert any("lm-evaluation-harness" in line and "registered tasks" in line for line in lines)
