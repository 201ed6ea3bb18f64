"""The registry of editing methods: every method listed, its declared needs checked before any weight loads, and
the needs it declares are what it reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_ids
from typer.testing import CliRunner

from moekit.cli import app
from moekit.data import CalibrationSet
from moekit.model_io import load_model
from moekit.pipeline import PlanInputs, make_plan
from moekit.plan import PlanRequest
from moekit.plan.methods import METHODS, Method, Needs, check_needs, statistics_needed
from moekit.profile import Profile, ProfileError, collect_profile
from moekit.profile.stats import NEURON_STATS, STATS, collected_statistics
from moekit.score import CRITERIA

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _sets() -> list[CalibrationSet]:
    code, prose = random_ids(3, 2, 32), random_ids(4, 2, 32) % 40 + 3
    return [CalibrationSet("code", code, torch.ones_like(code)), CalibrationSet("prose", prose, torch.ones_like(prose))]


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny Qwen3-MoE checkpoint, a profile of it without neuron statistics)."""
    source = tiny_checkpoint("qwen3_moe")
    profile = tmp_path_factory.mktemp("methods") / "prof"
    collect_profile(load_model(source), _sets(), progress=False).save(profile)
    return source, profile


@pytest.fixture
def weights_never_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    import moekit.edit
    import moekit.model_io

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the needs were checked")

    monkeypatch.setattr(moekit.model_io, "load_model", refuse)
    monkeypatch.setattr(moekit.edit, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def neuron_method(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A method registered for the test that reads neuron statistics; its plan function records its calls."""
    calls: list[str] = []

    def plan(source: object, request: PlanRequest, inputs: PlanInputs) -> dict:
        calls.append(request.method)
        return {"planned": True}

    method = Method("neuron_probe", "prune", Needs(profile=True, statistics=("neuron_energy", "count")), plan)
    monkeypatch.setitem(METHODS._items, "neuron_probe", method)
    return calls


def test_the_registry_holds_every_criterion_naee_stun_and_the_merging_methods() -> None:
    merging = ["dern", "hc_smoe", "m_smoe", "sub_moe"]
    assert METHODS.names() == sorted([*CRITERIA.names(), "naee", "stun", *merging])
    stun = METHODS.get("stun")
    assert stun.kind == "prune" and stun.needs.profile and stun.needs.statistics == ("coactivation",)
    for name in merging:
        method = METHODS.get(name)
        assert method.kind == "merge" and method.needs.profile and not method.needs.data
    assert METHODS.get("m_smoe").needs.statistics == ("count", "router_logit_gram")
    assert METHODS.get("hc_smoe").needs.statistics == ("count", "expert_output_sum")
    for name in CRITERIA:
        method = METHODS.get(name)
        assert method.kind == "prune" and method.needs.profile and not method.needs.data
        assert method.needs.statistics == CRITERIA.get(name).reads
        assert set(method.needs.statistics) <= set(STATS)
    naee = METHODS.get("naee").needs
    assert naee.data and naee.weights and not naee.profile and not naee.statistics and not naee.gradients


def test_an_unknown_method_lists_every_valid_one(saved, tmp_path: Path) -> None:
    source, profile = saved
    for args in (["--profile", profile], [], ["--data", f"t={tmp_path}"]):
        result = run("prune", source, *args, "--method", "bogus", "--ratio", 0.5, "--out", tmp_path / "out")
        assert result.exit_code == 2, result.output
        pruning = [m for m in METHODS.names() if METHODS.get(m).kind == "prune"]  # moekit prune's methods only
        assert f"unknown method 'bogus'; valid: {', '.join(pruning)}" in " ".join(result.stderr.split())
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["prune", "merge"])
def test_each_commands_help_names_every_method_of_its_kind(kind) -> None:
    result = run(kind, "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert all(name in text for name in METHODS.names() if METHODS.get(name).kind == kind), text


def test_a_missing_statistic_is_refused_before_weights_load(saved, tmp_path: Path, neuron_method: list[str],
                                                           weights_never_load: None) -> None:
    source, profile = saved
    result = run("prune", source, "--profile", profile, "--method", "neuron_probe", "--ratio", 0.5, "--out",
                 tmp_path / "out")
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "--method neuron_probe needs the profile statistic neuron_energy" in message
    assert f"which the profile {profile} lacks" in message
    assert "profile the model again with --neuron-stats" in message
    assert neuron_method == [] and not (tmp_path / "out").exists()


def test_a_profile_with_the_statistics_passes_the_check(saved, neuron_method: list[str]) -> None:
    source, _ = saved
    profile = collect_profile(load_model(source), _sets(), neuron_stats=True, progress=False)
    plan = make_plan(source, PlanRequest("neuron_probe", ratio=0.5), PlanInputs(profile=profile))
    assert plan == {"planned": True} and neuron_method == ["neuron_probe"]


def test_a_recipe_asks_for_the_profile_option_a_method_needs(saved, tmp_path: Path, neuron_method: list[str]) -> None:
    source, _ = saved
    (tmp_path / "code.txt").write_text("def f(x):\n    return x * 2\n" * 30)
    recipe = {"model": str(source), "out": "run", "profile": {"data": {"code": "code.txt"}, "seq_len": 32},
              "prune": {"method": "neuron_probe", "keep": 4}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "prune.method neuron_probe needs the profile statistic neuron_energy, which the recipe's profile lacks: " \
           "set profile.neuron_stats: true" in message
    assert not (tmp_path / "run").exists() and neuron_method == []


def test_check_needs_against_the_statistics_a_profile_will_hold(neuron_method: list[str]) -> None:
    method = METHODS.get("neuron_probe")
    request = PlanRequest("neuron_probe", ratio=0.5)
    check_needs(method, request, collected_statistics(neuron_stats=True), [])
    with pytest.raises(ProfileError, match="--neuron-stats"):
        check_needs(method, request, collected_statistics(neuron_stats=False), [])
    assert set(NEURON_STATS) <= collected_statistics(neuron_stats=True)


@pytest.mark.parametrize(("args", "message"), [
    (("--method", "naee", "--data", "t={text}", "--profile", "{profile}"),
     "--method naee runs the model on --data and takes no --profile"),
    (("--method", "reap", "--data", "t={text}"), "--method reap scores experts from a profile: give --profile"),
    (("--method", "reap"), "say which experts to remove: --profile PROFILE with --method and --ratio (or --keep), "
                           "--method naee with --data, or --keep-json FILE"),
    (("--method", "naee"), "--method naee runs the model on calibration text: give --data NAME=PATH"),
])
def test_inputs_that_do_not_fit_the_method(args: tuple[str, ...], message: str, saved, tmp_path: Path,
                                          weights_never_load: None) -> None:
    source, profile = saved
    text = tmp_path / "text.txt"
    text.write_text("a quick brown fox jumps over the lazy dog " * 40)
    filled = [a.format(text=text, profile=profile) for a in args]
    result = run("prune", source, *filled, "--ratio", 0.5, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def _stripped(profile: Profile, keep: list[str]) -> Profile:
    """``profile`` holding only the statistics ``keep``."""
    return Profile(profile.meta, {i: {k: v for k, v in stats.items() if k in keep}
                                  for i, stats in profile.layers.items()})


@pytest.mark.parametrize("name", sorted(CRITERIA.names()))
@pytest.mark.parametrize("protect_super", [True, False])
def test_each_method_reads_only_what_it_declares(name: str, protect_super: bool, saved,
                                                 weights_never_load: None) -> None:
    """A profile stripped of every statistic a method does not declare gives the same plan; one stripped of a
    declared statistic is refused by the check, with the statistic named."""
    source, path = saved
    full = Profile.load(path)
    method = METHODS.get(name)
    request = PlanRequest(name, keep=5, protect_super=protect_super, seed=2, set_weights={"code": 2.0, "prose": 1.0})
    needed = statistics_needed(method, request)
    assert ("act_max" in needed) == protect_super and set(method.needs.statistics) <= set(needed)
    expected = make_plan(source, request, PlanInputs(profile=full, profile_path=path))
    plan = make_plan(source, request, PlanInputs(profile=_stripped(full, needed), profile_path=path))
    assert json.dumps(plan, sort_keys=True) == json.dumps(expected, sort_keys=True)
    for missing in needed:
        with pytest.raises(ProfileError, match=f"needs the profile statistic {missing}, .*again with this moekit"):
            make_plan(source, request, PlanInputs(profile=_stripped(full, [s for s in needed if s != missing])))


def test_a_criterion_that_reads_an_undeclared_statistic_fails(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    from moekit.score.criteria import Criterion

    source, path = saved
    sneaky = Criterion(lambda stats: stats.count + stats.norm_sum, reads=("count",))
    monkeypatch.setitem(CRITERIA._items, "frequency", sneaky)
    with pytest.raises(ProfileError, match="'norm_sum' was not read from the profile"):
        make_plan(source, PlanRequest("frequency", keep=5), PlanInputs(profile=Profile.load(path)))


def test_a_keep_file_that_regroups_is_reproduced_by_apply(tiny_checkpoint, tmp_path: Path) -> None:
    """The plan saved from --keep-json --allow-regroup records the regrouping, so moekit apply of it gives the same
    checkpoint."""
    source = tiny_checkpoint("deepseek_v3", n_group=2, topk_group=1)
    (tmp_path / "keep.json").write_text(json.dumps({"1": [0, 1, 4, 5, 6, 7], "2": [0, 1, 2, 4, 5, 6]}))
    unequal = run("prune", source, "--keep-json", tmp_path / "keep.json", "--out", tmp_path / "refused")
    assert unequal.exit_code == 2 and "--allow-regroup" in unequal.stderr
    pruned = run("prune", source, "--keep-json", tmp_path / "keep.json", "--allow-regroup", "--out", tmp_path / "p")
    assert pruned.exit_code == 0, pruned.output
    plan = json.loads((tmp_path / "p" / "moekit_plan.json").read_text())
    assert plan["method"] == "keep-list" and plan["details"]["allow_regroup"] is True
    applied = run("apply", source, tmp_path / "p" / "moekit_plan.json", "--out", tmp_path / "a")
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "p" / "model.safetensors").read_bytes()


def test_a_recipes_naee_step_weighs_its_sets(tiny_checkpoint, tmp_path: Path) -> None:
    """The recipe's prune.set_weights reach NAEE as they reach the criteria (the sets' shares of its tokens)."""
    (tmp_path / "a.txt").write_text("a quick brown fox jumps over the lazy dog " * 40)
    (tmp_path / "b.txt").write_text("def add(x, y):\n    return x + y\n" * 60)
    recipe = {"model": str(tiny_checkpoint("mixtral", num_experts=6)), "out": "run",
              "profile": {"data": {"a": "a.txt", "b": "b.txt"}},
              "prune": {"method": "naee", "keep": 4, "protect_super": False, "set_weights": {"a": 1, "b": 3},
                        "naee": {"tokens": 200}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "run" / "model" / "moekit_plan.json").read_text())
    assert plan["method"] == "naee" and plan["details"]["naee"]["tokens_per_set"] == {"a": 50, "b": 150}
    assert plan["details"]["set_weights"] == {"a": 1.0, "b": 3.0}


def test_importing_the_command_line_loads_no_torch() -> None:
    code = "import sys, moekit.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_keep_file_is_already_a_plan(saved, tmp_path: Path) -> None:
    source, _ = saved
    (tmp_path / "keep.json").write_text(json.dumps({str(i): [0, 1, 2, 3] for i in range(3)}))
    result = run("prune", source, "--keep-json", tmp_path / "keep.json", "--plan-only", "--out", tmp_path / "p.json")
    assert result.exit_code == 2 and "a --keep-json file already is a plan" in " ".join(result.stderr.split())
    assert not (tmp_path / "p.json").exists()


def test_default_method_is_the_criterion_the_balanced_testbeds_rank_first():
    """`moekit prune` and recipes default to the criterion benchmarks/method_summary.py ranked first over the
    balanced testbeds; rerunning the comparison with another winner must make someone change the default."""
    import inspect

    from moekit.cli import prune
    from moekit.recipe import PruneStep

    summary = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                          "method_summary.json").read_text())
    cli_default = inspect.signature(prune).parameters["method"].default
    assert cli_default == PruneStep(ratio=0.5).method == summary["choice"]
    assert summary["order"][0] == summary["choice"] and summary["choice"] in METHODS
    # the summary ranks over several testbeds, every cell ranking every criterion
    assert len(summary["testbeds"]) >= 3
    assert all(set(c["rank"]) == set(CRITERIA.names()) for c in summary["cells"])
