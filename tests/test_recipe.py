"""``moekit run RECIPE.yaml``: the pipeline from one validated file."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from moekit.cli import app
from moekit.profile import Profile

runner = CliRunner()


def test_recipe_runs_profile_and_prune(tiny_checkpoint, tmp_path) -> None:
    (tmp_path / "code.txt").write_text("def f(x):\n    return x * 2\n" * 30)
    (tmp_path / "prose.txt").write_text("The sun rose over the quiet hills. " * 30)
    recipe = {"model": str(tiny_checkpoint("qwen3_moe")), "out": "run",
              "profile": {"data": {"code": "code.txt", "prose": "prose.txt"}, "seq_len": 64, "max_tokens": 512},
              "prune": {"method": "frequency", "keep": 4, "set_weights": {"code": 1}, "top_k": 1},
              "eval": {"text": {"code": "code.txt"}, "max_length": 64, "prompts": ["def add(", "The sun <b>"],
                       "max_new_tokens": 5}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    assert Profile.load(out / "profile").set_names == ["code", "prose"]
    plan = json.loads((out / "model" / "moekit_plan.json").read_text())
    assert plan["details"]["set_weights"] == {"code": 1.0, "prose": 0.0}
    assert plan["top_k"] == {"before": 2, "after": 1}
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["prune"]["protect_super"] is True and resolved["profile"]["batch_size"] == 8
    assert resolved["profile"]["data"]["code"] == str(tmp_path / "code.txt")
    original = json.loads((out / "eval" / "original.json").read_text())["perplexity"]["code"]["ppl"]
    pruned = json.loads((out / "eval" / "pruned.json").read_text())["perplexity"]["code"]["ppl"]
    assert original > 1 and pruned > 1 and original != pruned
    html = (out / "report" / "report.html").read_text()
    assert "The sun &lt;b&gt;" in html and "The sun <b>" not in html  # samples side by side, escaped
    assert len(json.loads((out / "eval" / "pruned.json").read_text())["samples"]) == 2
    again = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_recipe_errors_name_every_bad_key_and_write_nothing(tiny_checkpoint, tmp_path) -> None:
    recipe = {"model": str(tiny_checkpoint("qwen3_moe")), "out": "run", "colour": "red",
              "profile": {"data": {"d": "x.txt"}, "seqlen": 64},
              "prune": {"method": "magic", "ratio": 0.5, "keep": 3}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 2
    for problem in ("colour: unknown key", "profile.seqlen: unknown key", "unknown method 'magic'"):
        assert problem in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    recipe = {"model": "m", "out": "run", "profile": {"data": {"d": "x.txt"}}, "prune": {"ratio": 0.5, "keep": 3}}
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump(recipe))
    assert "exactly one of prune.ratio" in runner.invoke(app, ["run", str(tmp_path / "budget.yaml")]).stderr
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    assert "not valid YAML" in runner.invoke(app, ["run", str(tmp_path / "broken.yaml")]).stderr
    missing = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_recipe_check_prints_the_resolved_recipe(tiny_checkpoint, tmp_path) -> None:
    recipe = {"model": str(tiny_checkpoint("mixtral")), "out": "run", "profile": {"data": {"d": "x.txt"}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml"), "--check"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["profile"]["max_tokens"] == 262144
    assert not (tmp_path / "run").exists()


def test_every_step_is_checked_before_the_first_runs(tiny_checkpoint, tmp_path) -> None:
    (tmp_path / "code.txt").write_text("def f(x):\n    return x * 2\n" * 30)
    base = {"model": str(tiny_checkpoint("qwen3_moe")), "out": "run",
            "profile": {"data": {"code": "code.txt"}, "seq_len": 64, "max_tokens": 512},
            "prune": {"method": "frequency", "keep": 4},
            "eval": {"text": {"code": "code.txt"}, "max_length": 64}}
    broken = {
        "an eval text that does not exist": ({"eval": {"text": {"code": "missing.txt"}}}, "missing.txt"),
        "an unknown task": ({"eval": {"tasks": ["arc_hard"]}}, "arc_hard"),
        "an expert that does not exist": ({"prune": {"method": "frequency", "keep": 4, "protect": ["0:99"]}}, "0:99"),
        "a set weight for no set": ({"prune": {"method": "frequency", "keep": 4, "set_weights": {"prose": 1}}},
                                    "prose"),
        "a budget the model cannot keep": ({"prune": {"method": "frequency", "keep": 99}}, "99"),
        "a dtype that does not exist": ({"eval": {"text": {"code": "code.txt"}, "dtype": "float7"}}, "float7"),
    }
    for label, (change, expected) in broken.items():
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**base, **change}))
        result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
        assert result.exit_code == 2, (label, result.output)
        assert expected in " ".join(result.stderr.split()), (label, result.output)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["code.txt", "recipe.yaml"], label  # nothing ran


def test_rerun_reuses_the_steps_whose_inputs_are_unchanged(tiny_checkpoint, tmp_path) -> None:
    """A new prune budget redoes the pruning and the pruned model's evaluation, and takes the profile and the
    original model's evaluation over from the earlier run (the same files: hard links); changed calibration text
    redoes the profile too."""
    import os

    (tmp_path / "code.txt").write_text("def f(x):\n    return x * 2\n" * 30)
    recipe = {"model": str(tiny_checkpoint("qwen3_moe")), "out": "run",
              "profile": {"data": {"code": "code.txt"}, "seq_len": 64, "max_tokens": 512},
              "prune": {"method": "frequency", "keep": 4},
              "eval": {"text": {"code": "code.txt"}, "max_length": 64}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert runner.invoke(app, ["run", str(path)]).exit_code == 0
    out = tmp_path / "run"
    assert set(json.loads((out / "steps.json").read_text())) == {"profile", "model", "eval/original.json",
                                                                  "eval/pruned.json"}

    def inode(name: str) -> int:
        return os.stat(out / name).st_ino

    before = {name: inode(name) for name in ("profile/profile.json", "eval/original.json", "eval/pruned.json",
                                             "model/moekit_plan.json")}
    path.write_text(yaml.safe_dump({**recipe, "prune": {"method": "frequency", "keep": 6}}))
    again = runner.invoke(app, ["run", str(path), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert inode("profile/profile.json") == before["profile/profile.json"]  # taken over, not recomputed
    assert inode("eval/original.json") == before["eval/original.json"]
    assert inode("eval/pruned.json") != before["eval/pruned.json"]
    plan = json.loads((out / "model" / "moekit_plan.json").read_text())
    assert all(len(entry["kept"]) == 6 for entry in plan["layers"].values())  # the new budget was applied
    profile_again = inode("profile/profile.json")
    (tmp_path / "code.txt").write_text("def g(y):\n    return y + 1\n" * 30)  # the calibration text changed
    third = runner.invoke(app, ["run", str(path), "--overwrite"])
    assert third.exit_code == 0, third.output
    assert inode("profile/profile.json") != profile_again
    assert not any(p.name.startswith(".run.moekit") for p in tmp_path.iterdir())  # nothing left beside it


def test_recipe_merge_step_writes_the_merged_model_and_evaluates_it(tiny_checkpoint, tmp_path) -> None:
    """A merge: step profiles with the merge statistics, writes the same checkpoint moekit merge writes from that
    profile, and evaluates it as "merged"."""
    from moekit.pipeline import apply_plan, make_plan, read_inputs
    from moekit.plan import PlanRequest

    model = tiny_checkpoint("qwen3_moe")
    (tmp_path / "prose.txt").write_text("The sun rose over the quiet hills and the rivers ran. " * 40)
    recipe = {"model": str(model), "out": "run",
              "profile": {"data": {"prose": "prose.txt"}, "seq_len": 64, "max_tokens": 1024, "merge_stats": True},
              "merge": {"method": "hc_smoe", "keep": 4},
              "eval": {"text": {"prose": "prose.txt"}, "max_length": 64}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    plan = json.loads((out / "model" / "moekit_plan.json").read_text())
    assert plan["format"] == "moekit.expert_merge_plan/1" and plan["method"] == "hc_smoe"
    assert json.loads((out / "model" / "config.json").read_text())["num_experts"] == 4
    merged = json.loads((out / "eval" / "merged.json").read_text())["perplexity"]["prose"]["ppl"]
    original = json.loads((out / "eval" / "original.json").read_text())["perplexity"]["prose"]["ppl"]
    assert merged > 1 and original > 1 and merged != original
    assert not (out / "eval" / "pruned.json").exists()
    html = (out / "report" / "report.html").read_text()
    assert "merged into an output expert" in html and ">merged<" in html  # the plan's table, the quality rows
    # the same merge by hand from the run's profile: the same tensors
    by_hand = make_plan(str(model), PlanRequest("hc_smoe", keep=4), read_inputs(out / "profile"), kind="merge")
    apply_plan(str(model), by_hand, tmp_path / "by-hand")
    for name in ("model.safetensors",):
        assert (tmp_path / "by-hand" / name).read_bytes() == (out / "model" / name).read_bytes()


def test_recipe_merge_step_refusals_write_nothing(tiny_checkpoint, tmp_path) -> None:
    (tmp_path / "prose.txt").write_text("The sun rose over the quiet hills. " * 30)
    base = {"model": str(tiny_checkpoint("qwen3_moe")), "out": "run",
            "profile": {"data": {"prose": "prose.txt"}, "seq_len": 64, "max_tokens": 512}}
    broken = {
        "a merging method in a prune step": ({"prune": {"method": "hc_smoe", "keep": 4}}, "use a merge: step"),
        "a pruning method in a merge step": ({"merge": {"method": "reap", "keep": 4}}, "use a prune: step"),
        "both steps": ({"prune": {"method": "reap", "keep": 4}, "merge": {"method": "hc_smoe", "keep": 4}},
                       "not both"),
        "no merge statistics collected": ({"merge": {"method": "hc_smoe", "keep": 4}}, "profile.merge_stats: true"),
        "a merge budget of two": ({"merge": {"method": "dern", "ratio": 0.5, "keep": 4}}, "exactly one of merge.ratio"),
    }
    for label, (change, expected) in broken.items():
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**base, **change}))
        result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
        assert result.exit_code == 2, (label, result.output)
        assert expected in " ".join(result.stderr.split()), (label, result.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["prose.txt", "recipe.yaml"], label
