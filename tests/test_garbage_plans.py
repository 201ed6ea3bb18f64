"""Garbage plan inputs are refused before any weight loads: set weights, NAEE budgets, hand-edited plans."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import random_ids
from typer.testing import CliRunner

from moekit.arch.view import MoEModelView
from moekit.cli import app
from moekit.data import CalibrationSet
from moekit.model_io import load_model
from moekit.plan import PlanRequest, make_prune_plan
from moekit.profile import ProfileError, collect_profile
from moekit.score import parse_set_weights
from moekit.tiny import build_tiny_model

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _sets() -> list[CalibrationSet]:
    code, prose = random_ids(3, 2, 32), random_ids(4, 2, 32)
    return [CalibrationSet("code", code, torch.ones_like(code)), CalibrationSet("prose", prose, torch.ones_like(prose))]


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny Qwen3-MoE checkpoint, a profile of it with sets code and prose)."""
    source = tiny_checkpoint("qwen3_moe")
    profile = tmp_path_factory.mktemp("plans") / "prof"
    collect_profile(load_model(source), _sets(), progress=False).save(profile)
    return source, profile


@pytest.mark.parametrize("text", ["code=inf", "code=nan", "code=-1", "code=1e400", "code=-inf,prose=1",
                                  "code=0,prose=0", "code=0"])
def test_set_weights_must_be_finite_non_negative_and_not_all_zero(text: str) -> None:
    with pytest.raises(ProfileError, match="set weights"):
        parse_set_weights(text, ["code", "prose"])


@pytest.mark.parametrize("weights", [{"code": math.inf, "prose": 1.0}, {"code": math.nan, "prose": 1.0},
                                     {"code": -1.0, "prose": 1.0}, {"code": 0.0, "prose": 0.0},
                                     {"arc": 1.0}, {"code": "1"}])
def test_plan_requests_with_bad_set_weights_are_refused(weights: dict) -> None:
    model = build_tiny_model("qwen3_moe")
    profile = collect_profile(model, _sets(), progress=False)
    with pytest.raises(ProfileError, match="set weights"):
        make_prune_plan(MoEModelView.from_model(model), profile, PlanRequest("reap", keep=4, set_weights=weights))


def test_cli_refuses_infinite_set_weights(saved, tmp_path: Path) -> None:
    source, profile = saved
    result = run("prune", source, "--profile", profile, "--keep", 4, "--set-weights", "code=inf",
                 "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "finite" in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def _weights_never_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import moekit.edit
    import moekit.model_io

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(moekit.model_io, "load_model", refuse)
    monkeypatch.setattr(moekit.edit, "load_model", refuse)


@pytest.mark.parametrize("tokens", [0, -5])
def test_cli_refuses_naee_tokens_below_one_before_loading_weights(tokens: int, saved, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = saved
    text = tmp_path / "text.txt"
    text.write_text("a quick brown fox jumps over the lazy dog " * 40)
    _weights_never_load(monkeypatch)
    result = run("prune", source, "--method", "naee", "--data", f"t={text}", "--keep", 4, "--naee-tokens", tokens,
                 "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert f"--naee-tokens {tokens} must be at least 1" in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "value"), [("max_tokens", 0), ("max_tokens", -1), ("batch_size", 0),
                                               ("beam_width", 0)])
def test_make_naee_plan_refuses_empty_budgets(option: str, value: int) -> None:
    from moekit.edit.keep import PlanError
    from moekit.plan.naee import make_naee_plan

    with pytest.raises(PlanError, match="must be at least 1"):
        make_naee_plan(build_tiny_model("qwen3_moe"), _sets(), PlanRequest("naee", keep=4), progress=False,
                       **{option: value})
