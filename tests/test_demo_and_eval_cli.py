"""``moekit demo`` end to end on the bundled model, and ``moekit eval`` on it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moekit.cli import app
from moekit.demo import MODEL_DIR, TEXTS_DIR, VARIANTS

runner = CliRunner()


def test_demo_runs_offline_and_writes_report(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "demo"
    results = json.loads((out / "results.json").read_text())
    table = results["perplexity"]
    assert set(table) == {v.name for v in VARIANTS}
    original = table["original"]
    assert all(1 < value < 200 for value in original.values()), original
    for name in table:
        if name != "original":  # removing half the experts costs something on every domain
            assert all(table[name][d] > original[d] for d in original), (name, table[name])
            assert (out / name / "moekit_plan.json").is_file()
            card = (out / name / "README.md").read_text()  # the card carries what the demo measured
            assert "Not measured" not in card and "Measured by `moekit demo`" in card
            assert f"| german | {original['german']:.2f} | {table[name]['german']:.2f} |" in card
    assert results["parameters"]["frequency-code"] < results["parameters"]["original"]
    report = (out / "report.md").read_text()
    assert "original (16 experts)" in report and "frequency, code only (targeted)" in report
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "https://" not in html
    speed = json.loads((out / "speed.json").read_text())  # memory and speed measured, in the report as a table
    assert set(speed["models"]) == {v.label for v in VARIANTS} and (out / "figures" / "speed.png").is_file()
    assert "| model | experts | weights | routed experts |" in report and "prefill tok/s" in report
    again = runner.invoke(app, ["demo", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_eval_command_scores_tasks_and_text(tmp_path) -> None:
    result = runner.invoke(app, ["eval", str(MODEL_DIR), "--task", "arc_easy", "--limit", "4", "--text",
                                 f"code={TEXTS_DIR / 'code-eval.jsonl'}", "--max-length", "256",
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["tasks"]["arc_easy"]["n"] == 4 and 0 <= data["tasks"]["arc_easy"]["metrics"]["acc"] <= 1
    assert 1 < data["perplexity"]["code"]["ppl"] < 100


def test_eval_bad_inputs(tmp_path) -> None:
    for args, message in ((["--task", "bogus"], "valid: arc_challenge"),
                          ([], "say what to measure"),
                          (["--text", f"x={tmp_path / 'missing.txt'}"], "does not exist")):
        result = runner.invoke(app, ["eval", str(MODEL_DIR), *args])
        assert result.exit_code == 2 and message in result.stderr, result.output


def test_speed_command_compares_models(tmp_path) -> None:
    result = runner.invoke(app, ["speed", f"original={MODEL_DIR}", f"again={MODEL_DIR}", "--prompt-tokens", "8",
                                 "--new-tokens", "2", "--repeats", "1", "--batch-size", "1",
                                 "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert set(data["models"]) == {"original", "again"}
    missing = runner.invoke(app, ["speed", str(tmp_path / "nope")])
    assert missing.exit_code == 2


def test_a_model_that_does_not_fit_is_a_clear_error(monkeypatch) -> None:
    import moekit.model_io

    monkeypatch.setattr(moekit.model_io, "available_memory", lambda device: 1_000_000)  # 1 MB free
    result = runner.invoke(app, ["eval", str(MODEL_DIR), "--text", f"code={TEXTS_DIR / 'code-eval.jsonl'}"])
    assert result.exit_code == 2
    assert "does not fit" in result.stderr and "GiB" in result.stderr


def test_eval_dry_run_prints_what_the_run_needs_and_refuses_what_cannot_fit(tmp_path, monkeypatch) -> None:
    import moekit.needs as needs

    args = ["eval", str(MODEL_DIR), "--task", "arc_easy", "--max-length", "256", "--batch-size", "4"]
    result = runner.invoke(app, [*args, "--dry-run", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "model weights" in result.stderr and "dry run" in result.stdout and not (tmp_path / "r.json").exists()
    config = json.loads((MODEL_DIR / "config.json").read_text())
    estimate = needs.eval_needs(MODEL_DIR, dtype="float32", device="cpu", batch_size=4, seq_len=256)
    # hidden states in and out (float32) and the float32 log-probabilities over the vocabulary, per token
    assert estimate.activation_bytes == 4 * 256 * (2 * config["hidden_size"] * 4 + 4 * config["vocab_size"])
    monkeypatch.setattr(needs, "_device_free", lambda device: estimate.model_bytes)  # weights fit, one batch not
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "GiB are free" in refused.stderr


def test_eval_lists_its_tasks_and_takes_comma_lists(tmp_path) -> None:
    from moekit.eval.tasks import TASK_DESCRIPTIONS, TASKS

    assert set(TASK_DESCRIPTIONS) == set(TASKS.names())  # no built-in task left out of --list-tasks
    listed = runner.invoke(app, ["eval", "--list-tasks"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.stdout.splitlines()[: len(TASKS.names())]] == list(TASK_DESCRIPTIONS)
    missing = runner.invoke(app, ["eval"])
    assert missing.exit_code == 2 and "--list-tasks" in missing.stderr
    both = runner.invoke(app, ["eval", str(MODEL_DIR), "--task", "arc_easy, piqa", "--limit", "2",
                               "--json", str(tmp_path / "r.json")])
    assert both.exit_code == 0, both.output
    assert set(json.loads((tmp_path / "r.json").read_text())["tasks"]) == {"arc_easy", "piqa"}
