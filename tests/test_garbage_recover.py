"""recover never writes a model trained into NaN: it stops at the first non-finite loss or gradient."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moekit.cli import app
from moekit.data import CalibrationSet
from moekit.recover import RecoveryError, RecoverySettings, check_finite_parameters, recover_training
from moekit.tiny import build_tiny_model

runner = CliRunner()


def token_set(rows: int = 8, length: int = 24, seed: int = 1) -> CalibrationSet:
    ids = torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet("text", ids, torch.ones_like(ids))


def _settings(**kwargs: object) -> RecoverySettings:
    return RecoverySettings(**{"steps": 4, "batch_size": 4, "warmup": 0, "log_every": 1, **kwargs})  # type: ignore


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step() -> None:
    model = build_tiny_model("mixtral")
    with pytest.raises(RecoveryError, match=r"stopped at step \d+ of 4") as error:
        recover_training(model, [token_set()], _settings(lr=1e10), progress=False)
    step = int(re.search(r"step (\d+)", str(error.value))[1])
    assert step >= 1  # step 0 trains on the untouched model: its loss and gradient are finite
    message = " ".join(str(error.value).split())
    assert "lower --lr" in message and "--dtype float32" in message and "check the data" in message


def test_logits_that_overflow_stop_at_step_zero_before_any_update() -> None:
    """Finite weights whose logits overflow float32 (inf - inf = NaN in the softmax): the first loss is NaN."""
    model = build_tiny_model("mixtral")
    with torch.no_grad():
        model.lm_head.weight.fill_(3e38)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RecoveryError, match="stopped at step 0 of 4: the training loss is nan"):
        recover_training(model, [token_set()], _settings(lr=1e-3), progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters()), "no step may be taken"


def test_a_teacher_with_an_infinite_weight_is_refused() -> None:
    teacher = build_tiny_model("mixtral", seed=1)
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(RecoveryError, match=r"before training, 1 of \d+ parameter tensors hold NaN or infinite "
                                            r"values \(first: the teacher's lm_head.weight\)"):
        recover_training(build_tiny_model("mixtral"), [token_set()], _settings(), teacher=teacher, progress=False)


def test_parameters_that_overflow_in_the_last_step_are_refused() -> None:
    """Step 0's loss and gradient are finite; its update (about lr = 1e5 per weight) overflows float16."""
    model = build_tiny_model("mixtral").to(torch.float16)
    with pytest.raises(RecoveryError, match=r"after training, \d+ of \d+ parameter tensors hold NaN or infinite"):
        recover_training(model, [token_set()], _settings(steps=1, lr=1e5), progress=False)


def test_saving_in_a_dtype_that_overflows_is_refused() -> None:
    model = build_tiny_model("mixtral")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e6  # finite in float32, inf in float16
    check_finite_parameters(model, "after training")
    model.to(torch.float16)
    with pytest.raises(RecoveryError, match=r"in torch.float16, 1 of \d+ parameter tensors hold NaN or infinite "
                                            r"values \(first: the model's lm_head.weight\)"):
        check_finite_parameters(model, "in torch.float16")


@pytest.fixture()
def moe_and_text(tiny_checkpoint, tmp_path: Path) -> tuple[Path, Path]:
    source = Path(shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "moe"))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    return source, text


def test_cli_writes_nothing_when_the_loss_becomes_non_finite(moe_and_text, tmp_path: Path) -> None:
    source, text = moe_and_text
    result = runner.invoke(app, ["recover", str(source), "--data", f"t={text}", "--steps", "4", "--batch-size", "2",
                                 "--seq-len", "32", "--warmup", "0", "--lr", "1e10", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert re.search(r"stopped at step \d+ of 4", result.stderr) and "Nothing was written" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_source_with_an_infinite_weight(moe_and_text, tmp_path: Path) -> None:
    source, text = moe_and_text
    weights = load_file(str(source / "model.safetensors"))
    router = next(name for name in weights if name.startswith("model.layers.1.") and name.endswith(".gate.weight"))
    weights[router][0, 0] = float("inf")
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = runner.invoke(app, ["recover", str(source), "--data", f"t={text}", "--steps", "2", "--batch-size", "2",
                                 "--seq-len", "32", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "before training, 1 of" in message and "(first: the model's model.layers.1." in message
    assert not (tmp_path / "out").exists()
