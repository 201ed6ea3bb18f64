"""Garbage plan inputs are refused before any weight loads: set weights, NAEE budgets, hand-edited plans."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_ids
from typer.testing import CliRunner

from moekit.arch.view import MoEModelView
from moekit.cli import app
from moekit.data import CalibrationSet
from moekit.edit.keep import PlanError
from moekit.model_io import load_model
from moekit.pipeline import plan_from_profile, prune_with_plan, read_plan, write_plan
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
    from moekit.plan.naee import make_naee_plan

    with pytest.raises(PlanError, match="must be at least 1"):
        make_naee_plan(build_tiny_model("qwen3_moe"), _sets(), PlanRequest("naee", keep=4), progress=False,
                       **{option: value})


@pytest.fixture(scope="module")
def plan(saved) -> dict[str, Any]:
    """A planner's plan for the tiny Qwen3-MoE (8 experts, top-2): keep 6 per layer, top-1."""
    source, profile = saved
    return plan_from_profile(source, profile, PlanRequest("reap", keep=6, top_k=1))


def _layer(plan: dict[str, Any], layer: str = "1") -> dict[str, Any]:
    return plan["layers"][layer]


def _unprotected_kept(plan: dict[str, Any], layer: str = "1") -> int:
    protected = {tuple(p) for kind in ("super_experts", "user") for p in plan["details"]["protections"][kind]}
    return next(e for e in _layer(plan, layer)["kept"] if (int(layer), e) not in protected)


def _swap(plan: dict[str, Any]) -> None:
    """Keep a removed expert instead of a kept one in layer 1 (kept and removed stay consistent)."""
    entry = _layer(plan)
    out, back = _unprotected_kept(plan), entry["removed"][0]
    entry["kept"] = sorted([e for e in entry["kept"] if e != out] + [back])
    entry["removed"] = sorted([e for e in entry["removed"] if e != back] + [out])


def _set(*path: Any, value: Any) -> Callable[[dict], None]:
    def edit(plan: dict[str, Any]) -> None:
        *parents, last = path
        for key in parents:
            plan = plan[key]
        plan[last] = value
    return edit


def _delete(*path: Any) -> Callable[[dict], None]:
    def edit(plan: dict[str, Any]) -> None:
        *parents, last = path
        for key in parents:
            plan = plan[key]
        del plan[last]
    return edit


def _smaller_model_plan(plan: dict[str, Any]) -> None:
    for entry in plan["layers"].values():
        entry.update(kept=[0, 1, 2, 3], removed=[4, 5])
        del entry["experts"]
    plan["num_experts"] = {"before": 6, "after": 4}


def _drop_expert_zero(plan: dict[str, Any]) -> None:
    for key in ("kept", "removed"):
        _layer(plan)[key] = [e for e in _layer(plan)[key] if e != 0]


def _with_scores(edit: Callable[[list[dict]], None]) -> Callable[[dict], None]:
    return lambda plan: edit(_layer(plan)["experts"])


def _swap_ranks(entries: list[dict]) -> None:
    entries[0]["rank"], entries[1]["rank"] = entries[1]["rank"], entries[0]["rank"]


PLAN_EDITS: dict[str, tuple[Callable[[dict], None], str]] = {
    "unknown format": (_set("format", value="moekit.expert_prune_plan/2"), "has format 'moekit.expert_prune_plan/2'"),
    "recovery record": (_set("format", value="moekit.recover/1"), "the record of a moekit recover run, not a pruning"),
    "format not a string": (_set("format", value=1), "has format 1; moekit applies pruning plans"),
    "layers not an object": (_set("layers", value=[]), "'layers' must map every MoE layer index"),
    "layer key not an integer": (lambda p: p["layers"].__setitem__("x", p["layers"].pop("1")),
                                 "layer key 'x' is not an integer"),
    "layer twice": (lambda p: p["layers"].__setitem__("01", p["layers"]["1"]), "layer 1 appears twice"),
    "layer missing": (_delete("layers", "2"), "does not cover MoE layer(s) [2]"),
    "extra layer": (lambda p: p["layers"].__setitem__("7", p["layers"]["1"]), "layer(s) [7] are not MoE layers"),
    "layer not an object": (_set("layers", "1", value=[0, 1]), "layer 1 must be an object with 'kept' and 'removed'"),
    "kept not a list": (_set("layers", "1", "kept", value="0,1,2"), "layer 1 'kept' must map to a list of integer"),
    "kept holds a float": (lambda p: _layer(p)["kept"].__setitem__(0, float(_layer(p)["kept"][0])),
                           "layer 1 'kept' must map to a list of integer"),
    "kept holds true": (lambda p: _layer(p)["kept"].__setitem__(1, True), "layer 1 'kept' must map to a list"),
    "no removed list": (_delete("layers", "1", "removed"), "layer 1 'removed' must map to a list of integer"),
    "kept twice": (lambda p: _layer(p)["kept"].append(_layer(p)["kept"][0]), "'kept' lists expert(s)"),
    "kept and removed overlap": (lambda p: _layer(p)["kept"].append(_layer(p)["removed"][0]),
                                 "as both kept and removed"),
    "an expert neither kept nor removed": (_drop_expert_zero, "together must be exactly the experts 0..E-1"),
    "an expert that does not exist": (lambda p: _layer(p)["removed"].__setitem__(0, 9),
                                      "together must be exactly the experts 0..E-1"),
    "layers of different sizes": (lambda p: _layer(p, "2")["removed"].append(8), "different expert counts"),
    "unequal kept counts": (lambda p: (_layer(p)["kept"].append(_layer(p)["removed"].pop())),
                            "every MoE layer must keep the same number"),
    "plan for a smaller model": (_smaller_model_plan, "its layers split 6 experts into kept and removed, but this "
                                                      "model has 8"),
    "no num_experts": (_delete("num_experts"), "'num_experts' must be"),
    "num_experts before": (_set("num_experts", "before", value=6), "num_experts before is 6, but this model has 8"),
    "num_experts after": (_set("num_experts", "after", value=5), "num_experts after is 5, but its layers keep 6"),
    "num_experts after a string": (_set("num_experts", "after", value="6"), "'num_experts' must be"),
    "top-k after 0": (_set("top_k", "after", value=0), "--top-k 0 must be between 1 and the 6"),
    "top-k above kept": (_set("top_k", "after", value=7), "--top-k 7 must be between 1 and the 6"),
    "top-k a string": (_set("top_k", "after", value="1"), "'top_k' must be"),
    "top-k a number": (_set("top_k", value=1), "'top_k' must be"),
    "top-k before": (_set("top_k", "before", value=3), "top_k before is 3, but this model routes each token to 2"),
    "no method": (_delete("method"), "'method' must name how the plan was made"),
    "details not an object": (_set("details", value=[]), "'details' must be an object"),
    "allow_regroup a string": (_set("details", "allow_regroup", value="yes"), "'allow_regroup' must be true or"),
    "source of another type": (_set("source", "model_type", value="olmoe"), "model_type 'olmoe' (this model: "
                                                                           "'qwen3_moe')"),
    "source of another size": (lambda p: p["source"].__setitem__("total_parameters", 5), "total_parameters 5"),
    "criterion differs": (_set("details", "criterion", value="frequency"), "criterion 'frequency' differs"),
    "budget edited": (_set("details", "keep", value=5), "details keep is 5 per layer, but its layers keep 6"),
    "two budgets": (_set("details", "ratio", value=0.25), "exactly one of ratio and keep"),
    "kept per layer edited": (_set("details", "kept_per_layer", value=7), "kept_per_layer is 7"),
    "infinite set weight": (_set("details", "set_weights", "code", value=math.inf), "weights must be finite"),
    "protected expert removed": (lambda p: p["details"]["protections"]["user"].append([1, _layer(p)["removed"][0]]),
                                 "is recorded as protected (user) but the plan does not keep it"),
    "decisions not updated": (_swap, "but its record's decision is"),
    "decision edited": (_with_scores(lambda e: e[0].__setitem__("decision", "maybe")), "record's decision is 'maybe'"),
    "score not finite": (_with_scores(lambda e: e[2].__setitem__("score", math.nan)), "a finite score"),
    "ranks edited": (_with_scores(_swap_ranks), "but its score ranks it"),
    "an expert record missing": (_with_scores(lambda e: e.pop()), "'experts' must list one record per expert (8)"),
}


def _write(plan: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(plan))  # NaN and Infinity as Python's json writes them, as a hand edit might
    return path


@pytest.mark.parametrize("case", list(PLAN_EDITS))
def test_inconsistent_plans_are_refused_before_any_weight_loads(case: str, saved, plan, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = saved
    edit, message = PLAN_EDITS[case]
    edited = copy.deepcopy(plan)
    edit(edited)
    path = _write(edited, tmp_path / "plan.json")
    _weights_never_load(monkeypatch)
    with pytest.raises(PlanError) as error:
        prune_with_plan(source, read_plan(path), tmp_path / "out")
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_cli_apply_refuses_an_inconsistent_plan(saved, plan, tmp_path: Path) -> None:
    source, _ = saved
    edited = copy.deepcopy(plan)
    _layer(edited)["kept"].append(_layer(edited)["removed"][0])
    result = run("apply", source, _write(edited, tmp_path / "plan.json"), "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "as both kept and removed" in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def _paths_as_names(record):
    if isinstance(record, dict):
        return {key: _paths_as_names(value) for key, value in record.items()}
    if isinstance(record, list):
        return [_paths_as_names(value) for value in record]
    return Path(record).name if isinstance(record, str) and record.startswith("/") else record


def test_the_saved_plan_is_the_checked_plan_in_canonical_form(saved, plan, tmp_path: Path) -> None:
    """An edit that changes nothing (ids out of order, keys written differently) applies; the record is canonical."""
    source, _ = saved
    write_plan(plan, tmp_path / "plan.json")
    as_planned = prune_with_plan(source, read_plan(tmp_path / "plan.json"), tmp_path / "planned").out
    shuffled = copy.deepcopy(plan)
    for entry in shuffled["layers"].values():
        entry["kept"].reverse()
        entry["removed"].reverse()
    shuffled["layers"] = {f"0{k}": v for k, v in reversed(shuffled["layers"].items())}
    edited = prune_with_plan(source, read_plan(_write(shuffled, tmp_path / "edited.json")), tmp_path / "edited").out
    # the saved record is the plan with this machine's folders dropped (the source and the profile lie in other
    # temporary folders than the outputs: only their names are kept)
    expected = _paths_as_names(json.loads(json.dumps(plan)))
    assert json.loads((edited / "moekit_plan.json").read_text()) == expected
    assert json.loads((as_planned / "moekit_plan.json").read_text()) == expected
    assert (edited / "model.safetensors").read_bytes() == (as_planned / "model.safetensors").read_bytes()
    assert json.loads((edited / "config.json").read_text())["num_experts_per_tok"] == 1


def test_a_plan_that_keeps_every_expert_is_refused(saved, plan, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = saved
    everything = copy.deepcopy(plan)
    for entry in everything["layers"].values():
        entry.update(kept=list(range(8)), removed=[])
        del entry["experts"]
    everything["num_experts"]["after"] = everything["details"]["keep"] = everything["details"]["kept_per_layer"] = 8
    _weights_never_load(monkeypatch)
    with pytest.raises(PlanError, match="nothing would be removed"):
        prune_with_plan(source, read_plan(_write(everything, tmp_path / "plan.json")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["prune --keep-json", "apply"])
def test_a_keep_map_that_keeps_every_expert_is_refused(command: str, saved, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = saved
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({str(layer): list(range(8)) for layer in (0, 1, 2)}))
    _weights_never_load(monkeypatch)
    args = ["prune", source, "--keep-json", keep] if command == "prune --keep-json" else ["apply", source, keep]
    result = run(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "keeps all 8 experts of every MoE layer: nothing would be removed" in message
    assert "copy the model instead" in message
    assert not (tmp_path / "out").exists()
