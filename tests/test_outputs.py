"""Every command that writes goes through one output check: never the source, never an input, never an
existing path without --overwrite, and --overwrite replaces only moekit's own output of the same kind.
Each case checks exit status 2, a message that says why, and the source's bytes unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli import app
from moekit.outputs import MARKER_FILE, OutputError, check_output, writing_directory, writing_file

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes (a whole directory, or one file)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent if path.is_file() else path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture()
def workspace(tiny_checkpoint, tmp_path: Path) -> dict[str, Path]:
    """A private copy of a tiny model (inside a folder of its own), text, a profile, a plan and a pruned model."""
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), model)
    text = tmp_path / "text.txt"
    text.write_text("def add(x, y):\n    return x + y\n" * 40)
    prof = tmp_path / "prof"
    assert run("profile", model, "--data", f"code={text}", "--seq-len", 32, "--max-tokens", 256, "--out",
               prof).exit_code == 0
    plan = tmp_path / "plan.json"
    assert run("prune", model, "--profile", prof, "--method", "frequency", "--keep", 4, "--plan-only", "--out",
               plan).exit_code == 0
    pruned = tmp_path / "pruned"
    assert run("apply", model, plan, "--out", pruned).exit_code == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("my own files")
    return {"model": model, "text": text, "prof": prof, "plan": plan, "pruned": pruned, "mine": other,
            "root": tmp_path}


def _commands(w: dict[str, Path], out: Path) -> dict[str, list[object]]:
    model, text, prof, plan = w["model"], w["text"], w["prof"], w["plan"]
    return {
        "profile": ["profile", model, "--data", f"code={text}", "--seq-len", 32, "--max-tokens", 64, "--out", out],
        "merge": ["profile", "merge", prof, prof, "--out", out],
        "prune": ["prune", model, "--profile", prof, "--method", "reap", "--keep", 4, "--out", out],
        "plan-only": ["prune", model, "--profile", prof, "--keep", 4, "--plan-only", "--out", out],
        "apply": ["apply", model, plan, "--out", out],
        "report": ["report", "--profile", prof, "--out", out],
        "eval": ["eval", model, "--text", f"t={text}", "--max-length", 32, "--json", out],
        "speed": ["speed", model, "--prompt-tokens", 8, "--new-tokens", 2, "--repeats", 1, "--json", out],
    }


TARGETS = {
    "the model": lambda w: w["model"],
    "the model's parent": lambda w: w["model"].parent,
    "inside the model": lambda w: w["model"] / "inner",
    "the model's config": lambda w: w["model"] / "config.json",
}


@pytest.mark.parametrize("command", ["profile", "merge", "prune", "plan-only", "apply", "report", "eval", "speed"])
def test_no_command_writes_over_into_or_around_the_source(workspace, command) -> None:
    before = tree_digest(workspace["root"])
    for label, target in TARGETS.items():
        out = target(workspace)
        for extra in ([], ["--overwrite"]):
            result = run(*_commands(workspace, out)[command], *extra)
            assert result.exit_code == 2, (label, extra, result.output)
            assert "error:" in result.stderr, (label, result.output)
            assert tree_digest(workspace["root"]) == before, (command, label, extra)
    assert not (workspace["model"] / "inner").exists()


def test_overwrite_replaces_only_moekit_outputs_of_the_same_kind(workspace) -> None:
    w = workspace
    before = tree_digest(w["root"])
    # an arbitrary directory of the user's: never replaced, even with --overwrite
    for command in ("profile", "prune", "report", "apply"):
        result = run(*_commands(w, w["mine"])[command], "--overwrite")
        assert result.exit_code == 2 and "not written by moekit" in result.stderr, (command, result.output)
    # a moekit output of another kind: a profile never replaces a checkpoint, nor a report a profile
    merged = run(*_commands(w, w["pruned"])["merge"], "--overwrite")
    assert merged.exit_code == 2 and "holds a moekit checkpoint, not a profile" in " ".join(merged.stderr.split())
    report = run("report", "--plan", w["plan"], "--out", w["prof"], "--overwrite")
    assert report.exit_code == 2 and "holds a moekit profile" in " ".join(report.stderr.split())
    # an existing file without --overwrite, before any work is done
    existing = w["root"] / "results.json"
    existing.write_text("{}")
    for command in ("eval", "speed", "plan-only"):
        result = run(*_commands(w, existing)[command])
        assert result.exit_code == 2 and "already exists" in result.stderr, command
    assert existing.read_text() == "{}"
    (existing).unlink()
    assert tree_digest(w["root"]) == before
    # the same kind, with --overwrite: replaced
    again = run(*_commands(w, w["pruned"])["apply"], "--overwrite")
    assert again.exit_code == 0, again.output
    assert (w["pruned"] / MARKER_FILE).is_file()
    reprofiled = run(*_commands(w, w["prof"])["profile"], "--overwrite")
    assert reprofiled.exit_code == 0, reprofiled.output
    assert json.loads((w["prof"] / "profile.json").read_text())["sets"][0]["tokens"] == 64
    assert sorted(p.name for p in w["root"].iterdir() if p.name.startswith(".")) == []  # no temporaries


def test_replacing_an_output_that_holds_an_input_is_refused(workspace) -> None:
    inner_text = workspace["prof"] / "calibration.txt"
    inner_text.write_text("some calibration text " * 50)
    result = run("profile", workspace["model"], "--data", f"x={inner_text}", "--seq-len", 32, "--out",
                 workspace["prof"], "--overwrite")
    assert result.exit_code == 2 and "contains the input" in result.stderr
    assert inner_text.is_file()


def test_merge_may_not_write_over_its_inputs(workspace) -> None:
    result = run("profile", "merge", workspace["prof"], workspace["prof"], "--out", workspace["prof"], "--overwrite")
    assert result.exit_code == 2 and "one of this command's inputs" in result.stderr


def test_run_refuses_the_model_as_its_output(workspace) -> None:
    recipe = workspace["root"] / "recipe.yaml"
    recipe.write_text(f"model: {workspace['model']}\nout: {workspace['model']}\n"
                      f"profile: {{data: {{code: {workspace['text']}}}, seq_len: 32, max_tokens: 64}}\n")
    before = tree_digest(workspace["model"])
    result = run("run", recipe, "--overwrite")
    assert result.exit_code == 2 and "is the source model" in result.stderr
    assert tree_digest(workspace["model"]) == before


def test_symlinked_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(tmp_path / "link", kind="report", overwrite=True)


def test_writers_leave_nothing_on_failure_and_replace_atomically(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), writing_directory(target, "report") as tmp:
        (tmp / "half.md").write_text("half")
        raise RuntimeError("disk trouble")
    assert list(tmp_path.iterdir()) == []
    with writing_directory(target, "report") as tmp:
        (tmp / "report.md").write_text("one")
    with writing_directory(target, "report") as tmp:
        (tmp / "report.md").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILE, "report.md"]
    assert (target / "report.md").read_text() == "two"
    assert json.loads((target / MARKER_FILE).read_text())["kind"] == "report"
    file = tmp_path / "x.json"
    with pytest.raises(KeyboardInterrupt), writing_file(file) as tmp:
        tmp.write_text("{")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tiny_model_does_not_suggest_an_overwrite_it_lacks(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    result = run("tiny-model", "qwen3_moe", "--out", tmp_path / "taken")
    assert result.exit_code == 2 and "already exists" in result.stderr and "--overwrite" not in result.stderr


def test_json_means_a_file_or_stdout_in_every_command(workspace) -> None:
    """``--json FILE`` writes the results there, ``--json -`` prints the same JSON on stdout and nothing else, in
    inspect, analyze, eval and speed alike; an existing file is refused without --overwrite."""
    w = workspace
    commands = {
        "inspect": ["inspect", w["model"]],
        "analyze": ["analyze", w["prof"]],
        "eval": ["eval", w["model"], "--text", f"t={w['text']}", "--max-length", 32],
        "speed": ["speed", w["model"], "--prompt-tokens", 8, "--new-tokens", 2, "--repeats", 1],
    }

    def stable(data: object, timed: bool) -> object:  # speed's timings differ between two runs, nothing else may
        if isinstance(data, dict):
            return {k: stable(v, timed) for k, v in data.items()}
        if isinstance(data, list):
            return [stable(v, timed) for v in data]
        # (a timing can also be None: speed leaves out a decode rate it could not separate from the noise)
        timing = data is None or (isinstance(data, (int, float)) and not isinstance(data, bool))
        return "a timing" if timed and timing else data

    for name, args in commands.items():
        target = w["root"] / f"{name}.json"
        to_file = run(*args, "--json", target)
        assert to_file.exit_code == 0, (name, to_file.output)
        to_stdout = run(*args, "--json", "-")
        assert to_stdout.exit_code == 0, (name, to_stdout.output)
        printed = json.loads(to_stdout.stdout)  # stdout holds the JSON alone
        assert stable(printed, name == "speed") == stable(json.loads(target.read_text()), name == "speed"), name
        again = run(*args, "--json", target)
        assert again.exit_code == 2 and "already exists" in again.stderr, name
        assert run(*args, "--json", target, "--overwrite").exit_code == 0, name


def test_prune_card_and_report_show_paths_relative_to_the_output(workspace) -> None:
    """The pruned checkpoint's card and a report name the source model and the calibration file relative to the
    output, never by this machine's absolute folders."""
    w = workspace
    card = (w["pruned"] / "README.md").read_text()
    assert str(w["root"]) not in card and "`../models/tiny`" in card and "`../text.txt`" in card, card
    assert run("report", "--profile", w["prof"], "--plan", w["plan"], "--out", w["root"] / "rep").exit_code == 0
    report = (w["root"] / "rep" / "report.md").read_text()
    assert str(w["root"]) not in report and "Source model: ../models/tiny" in report, report


def _strings(record):
    if isinstance(record, dict):
        for value in record.values():
            yield from _strings(value)
    elif isinstance(record, list):
        for value in record:
            yield from _strings(value)
    elif isinstance(record, str):
        yield record


def test_plans_written_into_checkpoints_hold_no_absolute_paths(tmp_path) -> None:
    """The plan travels with the checkpoint: this machine's absolute folders stay out of it (paths are shown
    relative to the output, as the card shows them), whether prune writes it or apply copies it from a plan file."""
    import json

    from typer.testing import CliRunner

    from moekit.cli import app

    runner = CliRunner()
    work = tmp_path / "home" / "alice" / "secret-project"
    work.mkdir(parents=True)
    assert runner.invoke(app, ["tiny-model", "qwen3_moe", "--out", str(work / "tiny")]).exit_code == 0
    text = work / "code.jsonl"
    text.write_text("".join(json.dumps({"text": f"def f{i}(x): return x + {i}\n"}) + "\n" for i in range(30)))
    assert runner.invoke(app, ["profile", "collect", str(work / "tiny"), "--data", f"code={text}", "--out",
                               str(work / "prof")]).exit_code == 0
    result = runner.invoke(app, ["prune", str(work / "tiny"), "--profile", str(work / "prof"), "--ratio", "0.5",
                                 "--out", str(work / "pruned")])
    assert result.exit_code == 0, result.output
    plan_file = tmp_path / "plans" / "plan.json"
    result = runner.invoke(app, ["prune", str(work / "tiny"), "--profile", str(work / "prof"), "--ratio", "0.5",
                                 "--plan-only", "--out", str(plan_file)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["apply", str(work / "tiny"), str(plan_file), "--out", str(tmp_path / "applied")])
    assert result.exit_code == 0, result.output
    pruned = json.loads((work / "pruned" / "moekit_plan.json").read_text())
    applied = json.loads((tmp_path / "applied" / "moekit_plan.json").read_text())
    for record in (pruned, applied):
        assert not [s for s in _strings(record) if str(tmp_path) in s or s.startswith("/")]
    assert pruned["source"]["model"] == "../tiny"
    assert pruned["details"]["profile"]["path"] == "../prof"
    assert pruned["details"]["profile"]["sets"][0]["data"]["path"] == "../code.jsonl"
    # relative to the output, one folder up at most (moekit.outputs.shown_path)
    assert applied["source"]["model"] == "../home/alice/secret-project/tiny"
    assert (tmp_path / "applied" / "model.safetensors").read_bytes() == \
        (work / "pruned" / "model.safetensors").read_bytes()
    # the plan file is this machine's working file: apply reads its absolute paths
    assert json.loads(plan_file.read_text())["source"]["model"] == str((work / "tiny").resolve())


def test_written_checkpoints_are_readable_as_the_umask_allows(tmp_path: Path) -> None:
    """transformers' save_pretrained writes model.safetensors mode 0600 (a private temporary file): moekit's
    outputs follow the umask instead, as a plain open would, so another account can read a checkpoint."""
    import os
    import stat
    import tempfile

    from moekit.outputs import writing_directory

    previous = os.umask(0o022)
    try:
        with writing_directory(tmp_path / "out", "checkpoint") as tmp:
            handle, name = tempfile.mkstemp(dir=tmp)  # 0600, as transformers' writer leaves it
            os.close(handle)
        assert stat.S_IMODE((tmp_path / "out" / Path(name).name).stat().st_mode) == 0o644
        result = runner.invoke(app, ["tiny-model", "llama", "--out", str(tmp_path / "tiny")])
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE((tmp_path / "tiny" / "model.safetensors").stat().st_mode) == 0o644
        os.umask(0o077)  # a user who keeps files private keeps them private
        with writing_directory(tmp_path / "private", "checkpoint") as tmp:
            handle, name = tempfile.mkstemp(dir=tmp)
            os.close(handle)
        assert stat.S_IMODE((tmp_path / "private" / Path(name).name).stat().st_mode) == 0o600
    finally:
        os.umask(previous)
