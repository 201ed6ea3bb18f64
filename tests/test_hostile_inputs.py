"""Hostile and broken inputs: checkpoint code never runs, links never leak files, corrupt checkpoints and
files are clear errors (exit 2, nothing written), disk-full and interrupts leave nothing behind."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import app
from moekit.outputs import writing_directory

runner = CliRunner()


def run(*args: object, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def _message(result) -> str:
    return " ".join(result.stderr.split())


@pytest.fixture()
def model(tiny_checkpoint, tmp_path: Path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), path)
    return path


@pytest.fixture()
def keep_file(tmp_path: Path) -> Path:
    path = tmp_path / "keep.json"
    path.write_text(json.dumps({str(i): [0, 1, 2, 3] for i in range(3)}))
    return path


EVIL = "import pathlib\npathlib.Path({flag!r}).write_text('ran')\nfrom transformers import PretrainedConfig\n" \
       "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_moe'\n"


@pytest.mark.parametrize("model_type", ["evil_moe", "qwen3_moe"])
def test_checkpoint_code_never_runs_even_when_the_user_types_yes(model, tmp_path, model_type) -> None:
    flag = tmp_path / "code-ran"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(EVIL.format(flag=str(flag)))
    result = run("inspect", model, input="y\ny\n")
    assert not flag.exists(), "the checkpoint's code ran"
    if model_type == "evil_moe":  # unknown to transformers: only its own code could read it
        assert result.exit_code == 2 and "error:" in result.stderr, result.output
    else:  # a stock family: read with transformers' own code
        assert result.exit_code == 0, result.output


def test_symlinked_side_files_are_not_copied_into_the_pruned_checkpoint(model, keep_file, tmp_path) -> None:
    secret = tmp_path / "private.txt"
    secret.write_text("api-key-123")
    (model / "notes.txt").symlink_to(secret)
    out = tmp_path / "pruned"
    result = run("prune", model, "--keep-json", keep_file, "--out", out)
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists()
    assert all("api-key-123" not in p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())
    assert "notes.txt" in _message(result) and "symbolic link" in _message(result)
    assert (out / "tokenizer.json").is_file()  # regular side files are still copied


def _shard(model: Path) -> None:
    """Rename the weights to a one-shard sharded checkpoint with an index, as large models are stored."""
    from safetensors import safe_open

    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    with safe_open(str(model / "model-00001-of-00001.safetensors"), "pt") as handle:
        names = list(handle.keys())
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00001.safetensors" for name in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def test_shard_index_pointing_outside_the_model_or_at_a_missing_shard(model, keep_file, tmp_path) -> None:
    _shard(model)
    ok = run("prune", model, "--keep-json", keep_file, "--out", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shutil.copy(model / "model-00001-of-00001.safetensors", tmp_path / "outside.safetensors")
    first = next(iter(index["weight_map"]))
    for shard, expected in (("../outside.safetensors", "outside the model directory"),
                            ("model-00002-of-00002.safetensors", "which is missing")):
        index["weight_map"][first] = shard
        index_path.write_text(json.dumps(index))
        result = run("prune", model, "--keep-json", keep_file, "--out", tmp_path / "out")
        assert result.exit_code == 2 and expected in _message(result), result.output
        assert not (tmp_path / "out").exists()


def test_corrupt_checkpoints_are_clear_errors(model, keep_file, tmp_path) -> None:
    weights = model / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    truncated = run("prune", model, "--keep-json", keep_file, "--out", tmp_path / "out")
    assert truncated.exit_code == 2 and "cannot load the weights" in _message(truncated), truncated.output
    weights.write_bytes(intact)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    mismatched = run("prune", model, "--keep-json", keep_file, "--out", tmp_path / "out")
    assert mismatched.exit_code == 2 and "does not match its weights" in _message(mismatched), mismatched.output
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    more_layers = run("inspect", model, "--verify")  # the fourth layer's weights would be random
    assert more_layers.exit_code == 2 and "are missing from the checkpoint" in _message(more_layers)
    (model / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    binary = run("inspect", model)
    assert binary.exit_code == 2 and "not valid JSON" in _message(binary)
    assert not (tmp_path / "out").exists()


def test_binary_and_wrong_files_given_as_inputs(model, tmp_path) -> None:
    blob = tmp_path / "blob.json"
    blob.write_bytes(bytes(range(256)) * 4)
    cases = [
        (("apply", model, blob, "--out", tmp_path / "out"), "not valid JSON"),
        (("run", blob), "recipe"),
        (("report", "--speed", blob, "--out", tmp_path / "out"), "cannot be read as JSON"),
        (("report", "--plan", blob, "--out", tmp_path / "out"), "cannot be read as JSON"),
        (("compare", blob), "blob.json"),
        (("prune", model, "--keep-json", blob, "--out", tmp_path / "out"), "not valid JSON"),
        (("prune", model, "--profile", tmp_path, "--protect", blob, "--out", tmp_path / "out"), "blob.json"),
    ]
    for args, expected in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in _message(result), (args, result.output)
        assert not (tmp_path / "out").exists()


def test_bad_dtype_device_and_missing_paths(model, keep_file, tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    cases = [
        (("prune", model, "--keep-json", keep_file, "--dtype", "float7", "--out", tmp_path / "out"), "float7"),
        (("profile", model, "--data", f"t={text}", "--dtype", "float7", "--out", tmp_path / "out"), "float7"),
        (("eval", model, "--text", f"t={text}", "--dtype", "float7"), "float7"),
        (("profile", model, "--data", f"t={text}", "--device", "tpu", "--out", tmp_path / "out"), "tpu"),
        (("inspect", tmp_path / "no" / "such-model"), "does not exist"),
        (("inspect", "./no-such-model"), "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((("profile", model, "--data", f"t={text}", "--device", "cuda", "--out", tmp_path / "out"),
                      "no CUDA GPU"))
    for args, expected in cases:
        result = run(*args)
        assert result.exit_code == 2 and expected in _message(result), (args, result.output)
        assert not (tmp_path / "out").exists()


def test_user_text_is_printed_as_typed(model, tmp_path) -> None:
    result = run("report", "--result", "a:b:c=x.json", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "a:b:c" in result.stderr  # not an emoji, not swallowed as markup
    markup = run("inspect", tmp_path / "[bold]model")
    assert markup.exit_code == 2 and "[bold]model" in markup.stderr


def _cli(*args: object, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "moekit.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # Python ignores SIGXFSZ: writes fail with EFBIG


def test_a_write_that_fails_half_way_leaves_nothing(model, keep_file, tmp_path) -> None:
    process = _cli("prune", model, "--keep-json", keep_file, "--out", tmp_path / "out", preexec_fn=_limit_file_size)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert "File too large" in stderr and "free some space" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "model"]


@pytest.mark.parametrize(("signum", "status", "said"), [(signal.SIGINT, 130, "interrupted"),
                                                        (signal.SIGTERM, 143, "stopped by signal SIGTERM")])
def test_interrupt_exits_with_one_line_and_leaves_nothing(model, tmp_path, signum, status, said) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20_000)
    process = _cli("profile", model, "--data", f"t={text}", "--seq-len", 64, "--max-tokens", 2_000_000,
                   "--batch-size", 1, "--out", tmp_path / "prof")
    assert process.stderr is not None
    seen = ""
    while "profiling" not in seen:  # the progress bar: the forward passes have started
        char = process.stderr.read(1)
        assert char, f"the command ended before profiling: {seen}"
        seen += char
    process.send_signal(signum)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == status, seen + rest
    assert said in rest and "Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "t.txt"]


def test_leftovers_of_killed_runs_are_removed_but_not_those_in_use(tmp_path: Path) -> None:
    target = tmp_path / "report"
    stale = tmp_path / ".report.moekit-tmp-0123abcd"
    stale.mkdir()
    (stale / "half.png").write_bytes(b"")
    legacy = tmp_path / ".report.tmp-89abcdef"
    legacy.mkdir()
    busy = tmp_path / ".report.moekit-tmp-fedcba98"
    busy.mkdir()
    unrelated = tmp_path / ".reports.moekit-tmp-00000000"
    unrelated.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with writing_directory(target, "report") as tmp:
            (tmp / "report.md").write_text("x")
        assert not stale.exists() and not legacy.exists()
        assert busy.exists() and unrelated.exists()
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when its holder died
    os.close(fd)


def test_trust_remote_code_is_an_explicit_choice(model, tmp_path) -> None:
    flag = tmp_path / "code-ran"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil_moe", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(EVIL.format(flag=str(flag)))
    run("--trust-remote-code", "inspect", model)  # the user asked: the checkpoint's configuration code runs
    assert flag.read_text() == "ran"


def test_an_unexpected_failure_is_reported_as_a_bug(model, monkeypatch) -> None:
    import moekit.summary

    def broken(view):
        raise RuntimeError("an invariant moekit relies on did not hold")

    monkeypatch.setattr(moekit.summary, "summarize", broken)
    result = run("inspect", model)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "an invariant moekit relies on" in result.stderr
    assert "this is a bug in moekit" in result.stderr


def test_usual_dtype_aliases_are_accepted(model, keep_file, tmp_path) -> None:
    result = run("prune", model, "--keep-json", keep_file, "--dtype", "bf16", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def _command_paths() -> list[list[str]]:
    import typer.main

    root = typer.main.get_command(app)
    paths = []
    for name, command in root.commands.items():
        paths.append([name])
        paths += [[name, sub] for sub in getattr(command, "commands", {})]
    return paths


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_every_help_exits_cleanly(path) -> None:
    result = run(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "Traceback" not in result.output and "bug in moekit" not in result.output


def test_usage_errors_are_exit_2_without_a_traceback(model) -> None:
    for args in (("prune",), ("prune", model, "--bogus"), ("profile", "merge")):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output and "bug in moekit" not in result.output


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_help_text_is_printed_in_full(path) -> None:
    """Square brackets ("[default: ...]", JSON examples) are not swallowed as markup."""
    import typer.main

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    shown = "".join(run(*path, "--help").output.split())  # wrapping may split words: compare without whitespace
    for param in command.params:
        help_text = "".join((getattr(param, "help", None) or "").split())
        if "[" in help_text:
            assert help_text in shown, (path, param.name)


def test_only_what_belongs_to_the_new_model_is_copied(model, keep_file, tmp_path) -> None:
    (model / "training.json").write_text('{"steps": 100}')
    (model / "loss.png").write_bytes(b"\x89PNG")
    (model / "chat_template.jinja").write_text("{{ messages }}")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    (model / "configuration_x.py").write_text("# the code the config names\n")
    (model / "notes.py").write_text("# not named by the config\n")
    out = tmp_path / "pruned"
    assert run("prune", model, "--keep-json", keep_file, "--out", out).exit_code == 0
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "chat_template.jinja", "configuration_x.py"} <= names
    assert not names & {"training.json", "loss.png", "notes.py"}
    card = (out / "README.md").read_text()
    assert "`training.json`" in card and "`loss.png`" in card and "Not copied" in card


def test_prune_dry_run_says_the_output_size_and_writes_nothing(model, keep_file, tmp_path) -> None:
    from moekit.needs import prune_needs

    dry = run("prune", model, "--keep-json", keep_file, "--dry-run", "--out", tmp_path / "out")
    assert dry.exit_code == 0 and "output about" in dry.stderr and not (tmp_path / "out").exists()
    assert run("prune", model, "--keep-json", keep_file, "--out", tmp_path / "out").exit_code == 0
    written = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    estimate = prune_needs(model, tmp_path / "other", kept=4).output_bytes
    assert abs(estimate - written) < 0.05 * written  # the weights kept, in their stored dtype
