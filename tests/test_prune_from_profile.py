"""Profile -> plan -> pruned checkpoint, end to end: every family, the CLI, apply, top-k, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ALL_FAMILIES, capture_transformers_log, random_ids
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moekit.arch.view import MoEModelView, model_routing
from moekit.data import CalibrationSet
from moekit.model_io import load_model
from moekit.pipeline import prune_from_profile
from moekit.plan import PlanRequest
from moekit.profile import collect_profile

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app_(), [str(a) for a in args])


def app_():
    from moekit.cli import app

    return app


def _save_profile(model_dir: Path, out: Path) -> Path:
    model = load_model(model_dir)
    ids = random_ids(0, 4, 32)
    collect_profile(model, [CalibrationSet("data", ids, torch.ones_like(ids))], progress=False).save(out)
    return out


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_prunes_from_a_profile_and_reloads(family: str, tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint(family)
    profile = _save_profile(source, tmp_path / "prof")
    with capture_transformers_log() as log:
        result = prune_from_profile(source, profile, PlanRequest("reap", ratio=0.5), tmp_path / "out")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert "mismatch" not in log.getvalue().lower() and "not used" not in log.getvalue().lower(), log.getvalue()
    view = MoEModelView.from_model(reloaded)
    assert view.num_experts == 4 == result.after.num_experts
    plan = json.loads((tmp_path / "out" / "moekit_plan.json").read_text())
    assert plan["method"] == "reap" and plan["details"]["ratio"] == 0.5
    assert all(len(entry["experts"]) == 8 for entry in plan["layers"].values())
    with torch.no_grad():
        assert torch.isfinite(reloaded(random_ids(1, 1, 12)).logits).all()


def test_cli_prune_plan_only_then_apply_equals_direct_prune(tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("olmoe")
    profile = _save_profile(source, tmp_path / "prof")
    direct = run("prune", source, "--profile", profile, "--method", "ean_mean", "--ratio", 0.25, "--out",
                 tmp_path / "direct")
    assert direct.exit_code == 0, direct.output
    planned = run("prune", source, "--profile", profile, "--method", "ean_mean", "--ratio", 0.25, "--plan-only",
                  "--out", tmp_path / "plan.json")
    assert planned.exit_code == 0, planned.output
    applied = run("apply", source, tmp_path / "plan.json", "--out", tmp_path / "applied")
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == \
        (tmp_path / "applied" / "model.safetensors").read_bytes()
    plan = json.loads((tmp_path / "plan.json").read_text())
    saved = json.loads((tmp_path / "applied" / "moekit_plan.json").read_text())
    # the checkpoint's copy of the plan is the plan file's, with this machine's paths shown relative to the
    # checkpoint (both outputs lie in one folder: the same record either way)
    assert saved == json.loads((tmp_path / "direct" / "moekit_plan.json").read_text())
    assert saved["layers"] == plan["layers"] and saved["method"] == plan["method"]
    assert plan["source"]["model"].startswith("/") and not saved["source"]["model"].startswith("/")
    card = (tmp_path / "direct" / "README.md").read_text()
    assert "criterion: `ean_mean`" in card and "ratio 0.25" in card and "`data`: 128 tokens" in card


def test_lower_top_k_is_written_and_routes_fewer_experts(tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("qwen3_moe", top_k=4)
    profile = _save_profile(source, tmp_path / "prof")
    result = run("prune", source, "--profile", profile, "--keep", 6, "--top-k", 2, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_experts_per_tok == 2
    layer = MoEModelView.from_model(model).layers[0]
    index, _ = model_routing(layer, torch.randn(5, 64))
    assert index.shape == (5, 2)
    assert json.loads((tmp_path / "out" / "moekit_plan.json").read_text())["top_k"] == {"before": 4, "after": 2}


def test_domain_weights_change_the_plan(tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("mixtral")
    model = load_model(source)
    code, prose = random_ids(3, 4, 32), random_ids(4, 4, 32) % 40 + 3  # prose: a narrow band of tokens
    collect_profile(model, [CalibrationSet("code", code, torch.ones_like(code)),
                            CalibrationSet("prose", prose, torch.ones_like(prose))], progress=False).save(
        tmp_path / "prof")
    plans = {}
    for weights in ("code=1", "prose=1"):
        out = tmp_path / f"{weights}.json"
        result = run("prune", source, "--profile", tmp_path / "prof", "--method", "frequency", "--keep", 3,
                     "--set-weights", weights, "--no-protect-super", "--plan-only", "--out", out)
        assert result.exit_code == 0, result.output
        plans[weights] = json.loads(out.read_text())
    assert plans["code=1"]["details"]["set_weights"] == {"code": 1.0, "prose": 0.0}
    assert any(plans["code=1"]["layers"][k]["kept"] != plans["prose=1"]["layers"][k]["kept"]
               for k in plans["code=1"]["layers"])


@pytest.mark.parametrize("case", ["ratio", "keep", "method", "top-k", "other model", "no budget", "both sources",
                                  "naee without data", "bad protect"])
def test_bad_prune_inputs_write_nothing(case: str, tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("qwen3_moe")
    profile = _save_profile(source, tmp_path / "prof")
    args: list[object] = ["prune", source, "--profile", profile, "--out", tmp_path / "out"]
    expected = {
        "ratio": ("--ratio", 1.5, "strictly between 0 and 1"),
        "keep": ("--keep", 9, "below the 8 experts"),
        "method": ("--method", "magic", "valid: ean_mean, ean_sum, easy_ep, frequency"),
        "top-k": ("--keep", 4, "--top-k 5 must be between 1 and the 4"),
        "other model": ("--ratio", 0.5, "collected on another model"),
        "no budget": (None, None, "exactly one of --ratio"),
        "both sources": ("--ratio", 0.5, "either --profile"),
        "naee without data": ("--ratio", 0.5, "give --data"),
        "bad protect": ("--ratio", 0.5, "LAYER:EXPERT pairs"),
    }[case]
    flag, value, message = expected
    if flag:
        args += [flag, value]
    if case == "top-k":
        args += ["--top-k", 5]
    elif case == "other model":
        args[1] = tiny_checkpoint("qwen3_moe", num_experts=6)
    elif case == "both sources":
        (tmp_path / "keep.json").write_text(json.dumps({"0": [0, 1]}))
        args += ["--keep-json", tmp_path / "keep.json"]
    elif case == "naee without data":
        args = ["prune", source, "--method", "naee", "--ratio", 0.5, "--out", tmp_path / "out"]
    elif case == "bad protect":
        args += ["--protect", "layer3"]
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def test_apply_refuses_a_plan_for_another_model(tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("qwen3_moe")
    profile = _save_profile(source, tmp_path / "prof")
    assert run("prune", source, "--profile", profile, "--ratio", 0.5, "--plan-only", "--out",
               tmp_path / "plan.json").exit_code == 0
    other = tiny_checkpoint("qwen3_moe", seed=0, num_hidden_layers=4)
    result = run("apply", other, tmp_path / "plan.json", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "made for another model" in result.stderr
    assert not (tmp_path / "out").exists()


def test_naee_from_the_command_line(tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("mixtral", num_experts=6)
    text = tmp_path / "text.txt"
    text.write_text("a quick brown fox jumps over the lazy dog " * 40)
    result = run("prune", source, "--method", "naee", "--data", f"t={text}", "--keep", 4, "--naee-tokens", 256,
                 "--no-protect-super", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "out" / "moekit_plan.json").read_text())
    assert plan["method"] == "naee"
    assert [entry["search"] for entry in plan["details"]["naee"]["layers"]] == ["exhaustive"] * 3
    assert all(entry["evaluated"] == 15 + 6 for entry in plan["details"]["naee"]["layers"])


def test_naee_uses_every_named_set_by_its_weight_from_the_command_line(tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("mixtral", num_experts=6)
    (tmp_path / "a.txt").write_text("a quick brown fox jumps over the lazy dog " * 40)
    (tmp_path / "b.txt").write_text("def add(x, y):\n    return x + y\n" * 60)
    args = ["prune", source, "--method", "naee", "--data", f"a={tmp_path / 'a.txt'}", "--data",
            f"b={tmp_path / 'b.txt'}", "--keep", 4, "--naee-tokens", 200, "--no-protect-super", "--plan-only"]
    assert run(*args, "--out", tmp_path / "even.json").exit_code == 0
    even = json.loads((tmp_path / "even.json").read_text())["details"]["naee"]
    assert even["tokens_per_set"] == {"a": 100, "b": 100}
    assert all(entry["tokens"] == 200 for entry in even["layers"])
    result = run(*args, "--set-weights", "a=1,b=3", "--out", tmp_path / "weighted.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "weighted.json").read_text())["details"]["naee"]["tokens_per_set"] == \
        {"a": 50, "b": 150}
    bad = run(*args, "--set-weights", "c=1", "--out", tmp_path / "bad.json")
    assert bad.exit_code == 2 and "'c'" in bad.stderr


def test_router_mass_uses_the_familys_sigmoid_scores_and_refuses_old_profiles() -> None:
    """DeepSeek-V3 scores experts with sigmoid(z): router_mass sums those, not softmax(z); a profile without the
    record of which probabilities it summed (moekit before the fix) is refused for router_mass on such a model."""
    from moekit.edit.keep import PlanError
    from moekit.plan import make_prune_plan
    from moekit.tiny import build_tiny_model

    model = build_tiny_model("deepseek_v3")
    view = MoEModelView.from_model(model)
    ids = random_ids(4, 2, 16)
    profile = collect_profile(model, [CalibrationSet("d", ids, torch.ones_like(ids))], progress=False)
    layer = view.layers[0]
    hidden = {}
    handle = layer.router.register_forward_pre_hook(lambda m, a: hidden.__setitem__("x", a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    expected = torch.sigmoid(layer.router_logits(hidden["x"]).double()).sum(0)
    torch.testing.assert_close(profile.stat(layer.index, "router_prob_sum"), expected, rtol=1e-5, atol=1e-5)
    assert profile.meta["router_probabilities"][str(layer.index)] == "sigmoid"
    make_prune_plan(view, profile, PlanRequest("router_mass", keep=4, protect_super=False))
    del profile.meta["router_probabilities"]
    with pytest.raises(PlanError, match="profile the model again"):
        make_prune_plan(view, profile, PlanRequest("router_mass", keep=4, protect_super=False))
    make_prune_plan(view, profile, PlanRequest("reap", keep=4, protect_super=False))  # other criteria still work
