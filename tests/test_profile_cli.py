"""``moekit profile`` / ``profile merge`` / ``analyze`` end to end, and the analysis formulas by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import app
from moekit.profile import Profile
from moekit.profile.analyze import layer_summary, set_specialisation, super_experts
from moekit.profile.profile_file import FORMAT, FORMAT_VERSION
from moekit.profile.stats import CHUNK_SIZES, STATS

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def texts(tmp_path: Path) -> dict[str, Path]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("def add(x, y):\n    return x + y\n\n" * 20)
    (code / "b.py").write_text("for i in range(10):\n    print(i * i)\n" * 20)
    prose = tmp_path / "prose.jsonl"
    prose.write_text("\n".join(json.dumps({"text": f"The river {i} runs quietly past the old mill."})
                               for i in range(40)))
    return {"code": code, "prose": prose}


def test_profile_then_analyze(tiny_checkpoint, texts, tmp_path) -> None:
    model = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "prof"
    result = run("profile", model, "--data", f"code={texts['code']}", "--data", f"prose={texts['prose']}",
                 "--seq-len", 64, "--max-tokens", 1000, "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert "code 1,000 tokens" in result.stdout
    profile = Profile.load(out)
    assert profile.set_names == ["code", "prose"]
    assert profile.meta["options"]["seq_len"] == 64 and profile.meta["versions"]["torch"] == torch.__version__
    analysis = run("analyze", out, "--json", "-")
    assert analysis.exit_code == 0, analysis.output
    report = json.loads(analysis.stdout)
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
    assert report["layers"][0]["token_sparsity"] == pytest.approx(1 - 2 / 8)
    assert "code|prose" in report["specialisation"]["overlap"]
    table = run("analyze", out, "--set", "code")
    assert table.exit_code == 0 and "routing per MoE layer (code)" in table.stdout


def test_profile_merge_command(tiny_checkpoint, texts, tmp_path) -> None:
    model = tiny_checkpoint("mixtral")
    for name in ("a", "b"):
        result = run("profile", "collect", model, "--data", f"{name}={texts['prose']}", "--seq-len", 32,
                     "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    result = run("profile", "merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "ab")
    assert result.exit_code == 0, result.output
    assert Profile.load(tmp_path / "ab").set_names == ["a", "b"]


@pytest.mark.parametrize("case", ["missing file", "jsonl without text", "empty", "seq-len too long", "bad name",
                                  "no tokenizer"])
def test_profile_bad_inputs_write_nothing(case: str, tiny_checkpoint, tmp_path) -> None:
    model = tiny_checkpoint("qwen3_moe")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "fine"}))
    args: list[object] = ["--data", f"d={data}"]
    expected = {"missing file": "does not exist", "jsonl without text": "no 'text' string",
                "empty": "holds no text", "seq-len too long": "outside what the model handles",
                "bad name": "may hold only", "no tokenizer": "cannot load a tokenizer"}[case]
    if case == "missing file":
        args = ["--data", f"d={tmp_path / 'nope.txt'}"]
    elif case == "jsonl without text":
        data.write_text(json.dumps({"body": "x"}))
    elif case == "empty":
        data.write_text(json.dumps({"text": "  "}))
    elif case == "seq-len too long":
        args += ["--seq-len", 100_000]
    elif case == "bad name":
        args = ["--data", f"a b={data}"]
    elif case == "no tokenizer":
        args += ["--tokenizer", tmp_path]
    result = run("profile", model, *args, "--out", tmp_path / "prof")
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.stderr.split())
    assert not (tmp_path / "prof").exists()


def test_analyze_refuses_what_is_not_a_profile(tmp_path) -> None:
    (tmp_path / "junk").mkdir()
    result = run("analyze", tmp_path / "junk")
    assert result.exit_code == 2 and "not a complete profile" in result.stderr


def _hand_profile(counts: list[list[float]], act_max: list[list[float]], top_k: int = 1) -> Profile:
    """A profile of one set built from given counts and activation maxima (other statistics zero)."""
    layers = {}
    experts = len(counts[0])
    for index, (c, a) in enumerate(zip(counts, act_max, strict=True)):
        stats = {name: torch.zeros((1, *(experts if d == "E" else len(CHUNK_SIZES) for d in dims)),
                                   dtype=torch.float64 if reduce == "sum" else torch.float32)
                 for name, (dims, reduce) in STATS.items()}
        stats["count"][0] = torch.tensor(c, dtype=torch.float64)
        stats["tokens"][0] = sum(c) / top_k
        stats["act_max"][0] = torch.tensor(a)
        stats["chunk_experts_sum"][0] = torch.tensor([6.0, 5.0, 2.0])
        stats["chunk_count"][0] = torch.tensor([3.0, 2.0, 1.0])
        layers[index] = stats
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "options": {"neuron_stats": False},
            "sets": [{"name": "s", "tokens": int(sum(counts[0]) / top_k), "sequences": 1, "data": {}}],
            "model": {"source": "hand", "fingerprint": {"moe_layers": list(layers), "num_experts": [experts] * len(
                layers), "top_k": top_k, "model_type": "x", "config_sha256": "", "num_parameters": 0}}}
    return Profile(meta, layers)


def test_layer_summary_by_hand() -> None:
    profile = _hand_profile([[6, 2, 0, 0]], [[1, 1, 1, 1]])
    summary = layer_summary(profile, 0)
    mean = 2.0
    std = math.sqrt(((6 - mean) ** 2 + 0 + (0 - mean) ** 2 * 2) / 4)
    assert summary["load_cv"] == pytest.approx(std / mean)
    assert summary["max_over_mean"] == pytest.approx(3.0)
    share = [0.75, 0.25]
    assert summary["load_entropy"] == pytest.approx(-sum(p * math.log(p) for p in share) / math.log(4))
    assert summary["dead_experts"] == [2, 3]
    assert summary["token_sparsity"] == pytest.approx(1 - 1 / 4)
    assert summary["chunk_sparsity"] == pytest.approx({"8": 1 - 2 / 4, "16": 1 - 2.5 / 4, "32": 1 - 2 / 4})


def test_super_experts_rule_by_hand() -> None:
    # 4 layers x 64 experts; only the first 3 layers (75%) are considered.
    act = [[1.0] * 64 for _ in range(4)]
    act[1][1], act[2][5], act[3][3] = 50.0, 6.0, 100.0
    found = super_experts(_hand_profile([[1.0] * 64] * 4, act))
    everything = torch.tensor(act, dtype=torch.float64).flatten()
    threshold = max(float(torch.quantile(everything, 0.995)), 100 / 10)
    assert 10 < threshold < 50
    assert [(s.layer, s.expert) for s in found] == [(1, 1)]  # layer 3's 100 is in the last quarter
    assert found[0].threshold == pytest.approx(threshold)


def test_specialisation_lift_by_hand() -> None:
    profile = _hand_profile([[4, 4, 0, 0]], [[1, 1, 1, 1]], top_k=2)  # top-2: overlap looks at 2 experts
    # two sets: copy the set with different counts
    for stats in profile.layers.values():
        for name, tensor in stats.items():
            stats[name] = torch.cat([tensor, tensor])
        stats["count"][1] = torch.tensor([0.0, 2.0, 2.0, 4.0])
    profile.meta["sets"].append({"name": "t", "tokens": 8, "sequences": 1, "data": {}})
    spec = set_specialisation(profile, preferred=2)
    # all: [4, 6, 2, 4] / 16; s: [4, 4, 0, 0] / 8 -> lift of expert 0 = 0.5 / 0.25 = 2
    assert spec["sets"]["s"][0]["experts"] == [0, 1]
    assert spec["sets"]["s"][0]["lift"] == pytest.approx([2.0, 0.5 / 0.375], abs=1e-3)  # rounded to 3 places
    assert spec["sets"]["t"][0]["experts"] == [2, 3]  # both lift 2; ties go to the lower index
    top_s, top_t = {0, 1}, {3, 1}  # t: 1 and 2 tie on count; the lower index wins
    assert spec["overlap"]["s|t"]["mean_jaccard"] == pytest.approx(len(top_s & top_t) / len(top_s | top_t))


def test_torchrun_through_the_cli_equals_one_process(tiny_checkpoint, texts, tmp_path) -> None:
    """``torchrun --nproc-per-node 2 -m moekit profile ...`` (gloo on CPU) writes the one-process profile."""
    import os
    import subprocess
    import sys

    model = tiny_checkpoint("qwen3_moe")
    args = ["profile", model, "--data", f"code={texts['code']}", "--data", f"prose={texts['prose']}",
            "--seq-len", 32, "--max-tokens", 700, "--batch-size", 3]
    # one thread per process in both runs (torchrun's default with several processes): a float32 matmul may
    # round differently with another thread count, which is not what is compared here
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = subprocess.run([sys.executable, "-m", "moekit", *map(str, args), "--out", str(tmp_path / "alone")],
                           capture_output=True, text=True, timeout=300, env=env)
    assert alone.returncode == 0, alone.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekit"]
    done = subprocess.run([*launch, *map(str, args), "--out", str(tmp_path / "together")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote") == 1  # rank 0 alone writes and reports
    one, two = Profile.load(tmp_path / "alone"), Profile.load(tmp_path / "together")
    assert two.meta["options"]["world_size"] == 2 and one.meta["options"]["world_size"] == 1
    assert [s["tokens"] for s in two.meta["sets"]] == [s["tokens"] for s in one.meta["sets"]]
    for layer in one.layers:
        for name, tensor in one.layers[layer].items():
            other = two.layers[layer][name]
            assert torch.allclose(other.double(), tensor.double(), rtol=1e-12, atol=0), (layer, name)


def test_dry_run_prints_what_the_run_needs_and_writes_nothing(tiny_checkpoint, texts, tmp_path) -> None:
    from moekit.needs import profile_needs

    model = tiny_checkpoint("qwen3_moe")
    result = run("profile", model, "--data", f"code={texts['code']}", "--seq-len", 32, "--batch-size", 4,
                 "--dry-run", "--out", tmp_path / "prof")
    assert result.exit_code == 0, result.output
    assert "model weights" in result.stderr and "activations per batch" in result.stderr
    assert "dry run" in result.stdout and not (tmp_path / "prof").exists()
    needs = profile_needs(model, tmp_path / "prof", dtype="float32", device="cpu", batch_size=4, seq_len=32, sets=1,
                          neuron_stats=False)
    structure_params = json.loads(run("inspect", model, "--json", "-").stdout)["total_parameters"]
    assert needs.model_bytes == 4 * structure_params  # float32
    assert needs.activation_bytes == 2 * 4 * 32 * 64 * 4  # in and out hidden states of one batch, hidden 64
    from dataclasses import replace

    from moekit.errors import UserError

    with pytest.raises(UserError, match="free space or write elsewhere"):
        replace(needs, output_free_bytes=needs.output_bytes - 1).check()
    with pytest.raises(UserError, match="GiB are free"):
        replace(needs, device_free_bytes=needs.model_bytes).check()
    replace(needs, output_free_bytes=needs.output_bytes, device_free_bytes=needs.model_bytes * 2).check()


def test_starved_experts_and_imbalance_are_flagged_by_hand() -> None:
    from moekit.profile.analyze import balance_warnings

    # layer 0: mean 7.75, expert 3 below a quarter of it (1.9375), MaxVio 10/7.75 - 1 = 0.29;
    # layer 1: perfectly even; layer 2: mean 13, MaxVio 40/13 - 1 = 2.08, nobody below 3.25
    profile = _hand_profile([[10, 10, 10, 1], [5, 5, 5, 5], [40, 4, 4, 4]], [[1] * 4] * 3)
    rows = [layer_summary(profile, layer) for layer in range(3)]
    assert [row["starved_experts"] for row in rows] == [[3], [], []]
    assert [row["nearly_dead_experts"] for row in rows] == [[], [], []]
    assert [round(row["max_violation"], 4) for row in rows] == [round(10 / 7.75 - 1, 4), 0.0, round(40 / 13 - 1, 4)]
    warnings = balance_warnings(rows)
    assert len(warnings) == 2
    assert "1 of 3 MoE layers have starved experts" in warnings[0] and "frequency" in warnings[0]
    assert "1 of 3 MoE layers are strongly imbalanced" in warnings[1] and "layer 2: 2.08" in warnings[1]
    assert balance_warnings([rows[1]]) == []
    dead = layer_summary(_hand_profile([[1000, 1000, 1000, 5]], [[1] * 4]), 0)  # 5 < 1% of the mean 751
    assert dead["nearly_dead_experts"] == [3] and dead["starved_experts"] == [3]
