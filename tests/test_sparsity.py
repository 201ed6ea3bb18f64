"""STUN's second stage (``moekit.edit.sparsity``): Wanda input norms in the profile, Wanda/OWL/N:M masks checked by
hand and against an independent computation, stock checkpoints with the zeros, refusals that write nothing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import capture_transformers_log, profiled_tiny_model, random_ids
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moekit.arch import MoEModelView
from moekit.arch.experts import ExpertWeights
from moekit.data import CalibrationSet
from moekit.edit import PlanError
from moekit.edit.sparsity import outlier_fraction, owl_sparsities, row_zero_mask
from moekit.profile.collect import collect_profile
from moekit.tiny import build_tiny_model


@pytest.fixture(scope="module")
def norms_profile(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint, its profile with --input-norms (``profile``) and one without (``plain``)."""
    return profiled_tiny_model(tmp_path_factory.mktemp("input-norms"), "qwen3_moe", "input_norms",
                               " ".join(f"word{i % 89} then the {i % 11} row {i}" for i in range(3000)), 2048)


def _input_energies_by_hooks(model, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, swiglu: bool):
    """Per expert, sum over its real tokens of x^2 (the experts call's hidden input) and, for SwiGLU experts, of
    a^2 = (silu(gate x) * up x)^2 from the canonical weights: computed without moekit's capture."""
    view = MoEModelView.from_model(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [layer.experts.register_forward_hook(
        lambda _m, args, _out, index=layer.index: seen.__setitem__(index, (args[0].detach(), args[1].detach())))
        for layer in view.layers]
    hidden = {layer.index: 0 for layer in view.layers}
    neurons = {layer.index: 0 for layer in view.layers}
    try:
        with torch.no_grad():
            for first in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[first:first + batch_size])
                real = mask[first:first + batch_size].reshape(-1) == 1
                for layer in view.layers:
                    x, chosen = seen[layer.index]
                    x = x.reshape(-1, x.shape[-1]).double()
                    chosen = chosen.reshape(x.shape[0], -1)
                    rows_h, rows_n = [], []
                    for expert in range(layer.num_experts):
                        rows = ((chosen == expert).any(-1) & real).nonzero().flatten()
                        rows_h.append(x[rows].square().sum(0))
                        if swiglu:
                            w = layer.layout.expert_weights(layer.experts, expert)
                            a = F.silu(x[rows] @ w.gate.double().T) * (x[rows] @ w.up.double().T)
                            rows_n.append(a.square().sum(0))
                    hidden[layer.index] = hidden[layer.index] + torch.stack(rows_h)
                    if swiglu:
                        neurons[layer.index] = neurons[layer.index] + torch.stack(rows_n)
    finally:
        for handle in handles:
            handle.remove()
    return hidden, neurons


@pytest.mark.parametrize("family,swiglu", [("qwen3_moe", True), ("mixtral", True), ("deepseek_v3", True),
                                           ("gpt_oss", False), ("dbrx", False)])
def test_input_norms_match_an_independent_computation_and_change_no_other_statistic(family, swiglu) -> None:
    model = build_tiny_model(family).eval().float()
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding never counts
    sets = [CalibrationSet("text", ids, mask)]
    with_norms = collect_profile(model, sets, batch_size=2, input_norms=True, progress=False)
    plain = collect_profile(model, sets, batch_size=2, progress=False)
    hidden, neurons = _input_energies_by_hooks(model, ids, mask, 2, swiglu)
    assert with_norms.meta["options"]["input_norms"] is True
    for index, stats in with_norms.layers.items():
        assert set(stats) == set(plain.layers[index]) | {"expert_input_energy", "neuron_input_energy"}
        for name, tensor in plain.layers[index].items():
            assert torch.equal(stats[name], tensor), (index, name)
        got = stats["expert_input_energy"][0]
        assert float(hidden[index].max()) > 0
        # float32 sums against a float64 reference: an expert with almost no input energy differs by round-off of
        # the layer's scale, not of its own (seen on DBRX under transformers 5.25: 7.5631e-05 vs 7.5628e-05)
        assert torch.allclose(got, hidden[index], rtol=1e-5, atol=1e-7 * float(hidden[index].max()))
        assert float(stats["neuron_input_energy"][0].max()) > 0
        if swiglu:
            assert torch.allclose(stats["neuron_input_energy"][0], neurons[index], rtol=1e-4, atol=1e-9)


def test_wanda_and_magnitude_scores_by_hand() -> None:
    from moekit.score.weights import WEIGHT_CRITERIA

    w = ExpertWeights(gate=torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]]),
                      up=torch.tensor([[2.0, 2.0], [-1.0, 1.0], [0.0, -4.0]]),
                      down=torch.tensor([[1.0, -1.0, 2.0], [3.0, 0.5, -0.5]]))
    stats = {"expert_input_energy": torch.tensor([4.0, 9.0], dtype=torch.float64),  # ||x_h|| = 2, 3
             "neuron_input_energy": torch.tensor([1.0, 16.0, 0.25], dtype=torch.float64)}  # ||a_n|| = 1, 4, 0.5
    got = WEIGHT_CRITERIA.get("wanda").score(w, stats)
    assert torch.equal(got["gate"], torch.tensor([[2.0, 6.0], [1.0, 9.0], [2.0, 0.0]], dtype=torch.float64))
    assert torch.equal(got["up"], torch.tensor([[4.0, 6.0], [2.0, 3.0], [0.0, 12.0]], dtype=torch.float64))
    assert torch.equal(got["down"], torch.tensor([[1.0, 4.0, 1.0], [3.0, 2.0, 0.25]], dtype=torch.float64))
    plain = WEIGHT_CRITERIA.get("magnitude").score(w, {})
    assert torch.equal(plain["down"], torch.tensor([[1.0, 1.0, 2.0], [3.0, 0.5, 0.5]], dtype=torch.float64))


def test_row_masks_by_hand() -> None:
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0, 0.5, 6.0, 7.0],
                           [1.0, 1.0, 1.0, 1.0, 9.0, 8.0, 7.0, 6.0]])
    # unstructured 0.4 of 8 inputs: int(3.2) = 3 lowest per row (ties: lower index first)
    expected = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(row_zero_mask(scores, 0.4), expected)
    # 2:4: the 2 lowest of inputs 0-3 and of 4-7
    expected = torch.tensor([[0, 1, 0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(row_zero_mask(scores, 0.5, (2, 4)), expected)
    assert not row_zero_mask(scores, 0.1).any()  # int(0.8) = 0
    with pytest.raises(PlanError, match="multiple of 3"):
        row_zero_mask(scores, 0.5, (1, 3))


def test_owl_layer_sparsities_and_outliers_by_hand() -> None:
    # min-max normalised outliers 0, 0.5, 1 -> x 2 lambda = 0, 0.08, 0.16; minus their mean 0.08; + 1 - 0.5
    got = owl_sparsities({0: 0.01, 3: 0.02, 5: 0.03}, 0.5, 0.08)
    assert got.keys() == {0, 3, 5}
    assert all(abs(got[k] - v) < 1e-12 for k, v in {0: 0.58, 3: 0.5, 5: 0.42}.items())
    assert owl_sparsities({0: 0.2, 1: 0.2}, 0.3) == {0: 0.3, 1: 0.3}
    with pytest.raises(PlanError, match="lower --owl-lambda"):
        owl_sparsities({0: 0.0, 1: 1.0}, 0.9, 0.2)
    # mean of [1, 1, 1, 1, 16] and [0, 0, 0, 0] is 20 / 9; above 2 x that (4.44): only the 16
    assert outlier_fraction([torch.tensor([1.0, 1.0, 1.0, 1.0, 16.0]), torch.zeros(4)], 2.0) == 1 / 9


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _expected_masks(layer, stats_h, stats_n, sparsity, pattern=None):
    """Each expert's zeroed weights by Wanda, computed here: |W| sqrt(energy) per row, its int(s C) lowest."""
    out = []
    for expert in range(layer.num_experts):
        w = layer.layout.expert_weights(layer.experts, expert)
        masks = {}
        for name, weight in (("gate", w.gate), ("up", w.up), ("down", w.down)):
            norms = (stats_n if name == "down" else stats_h)[expert].sqrt()
            score = weight.double().abs() * norms[None, :]
            if pattern is None:
                k = int(score.shape[1] * sparsity)
                order = torch.sort(score, dim=1, stable=True).indices[:, :k]
                mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
            else:
                n, m = pattern
                groups = score.reshape(score.shape[0], -1, m)
                mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                    -1, torch.sort(groups, dim=-1, stable=True).indices[..., :n], True).reshape(score.shape)
            masks[name] = mask
        out.append(masks)
    return out


def test_uniform_wanda_zeroes_exactly_the_lowest_scores_and_reloads_stock(norms_profile, tmp_path) -> None:
    from moekit.edit.sparsity import make_sparsity_plan
    from moekit.model_io import load_structure
    from moekit.pipeline import apply_plan
    from moekit.profile import Profile

    source = norms_profile / "model"
    profile = Profile.load(norms_profile / "profile")
    view = MoEModelView.from_model(load_structure(source))
    plan = make_sparsity_plan(source, view, profile, "wanda", 0.5, allocation="uniform",
                              profile_path=str(norms_profile / "profile"))
    assert all(entry["sparsity"] == 0.5 for entry in plan["layers"].values())
    streamed = apply_plan(source, plan, tmp_path / "streamed").out
    in_memory = apply_plan(source, plan, tmp_path / "in-memory", dtype="float32").out  # a cast: the in-memory path
    a, b, src = _tensors(streamed), _tensors(in_memory), _tensors(source)
    assert a.keys() == b.keys() == src.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
    assert all(torch.equal(a[k], src[k]) for k in a if ".experts." not in k)  # nothing else changes
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    with capture_transformers_log() as log:
        model, info = AutoModelForCausalLM.from_pretrained(streamed, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert log.getvalue() == ""
    zeros = total = 0
    for before, after in zip(MoEModelView.from_model(original).layers, MoEModelView.from_model(model).layers,
                             strict=True):
        masks = _expected_masks(before, profile.stat(before.index, "expert_input_energy").double(),
                                profile.stat(before.index, "neuron_input_energy").double(), 0.5)
        for expert, expected in enumerate(masks):
            w0 = before.layout.expert_weights(before.experts, expert)
            w1 = after.layout.expert_weights(after.experts, expert)
            for name in ("gate", "up", "down"):
                old, new = getattr(w0, name), getattr(w1, name)
                assert torch.equal(new, old.masked_fill(expected[name], 0)), (before.index, expert, name)
                zeros += int((new == 0).sum())
                total += new.numel()
    saved = json.loads((streamed / "moekit_plan.json").read_text())
    assert saved["measured_sparsity"]["routed_expert_weights"] == round(zeros / total, 6)
    assert 0.49 < zeros / total < 0.52
    card = " ".join((streamed / "README.md").read_text().split())
    assert f"Measured: {100 * zeros / total:.2f}% of the routed-expert weights are zero" in card
    assert "as large as one without them and runs no faster" in card
    with torch.no_grad():
        assert torch.isfinite(model.eval()(input_ids=random_ids()).logits).all()


def test_owl_keeps_more_weights_where_a_layer_has_more_outliers(norms_profile, tmp_path) -> None:
    from moekit.edit.sparsity import make_sparsity_plan
    from moekit.model_io import load_structure
    from moekit.profile import Profile
    from moekit.score.weights import WEIGHT_CRITERIA

    source = norms_profile / "model"
    profile = Profile.load(norms_profile / "profile")
    view = MoEModelView.from_model(load_structure(source))
    plan = make_sparsity_plan(source, view, profile, "wanda", 0.6, owl_m=3.0, owl_lambda=0.1)
    layers = {int(k): v for k, v in plan["layers"].items()}
    sparsity = [layers[i]["sparsity"] for i in sorted(layers)]
    outliers = [layers[i]["outlier_fraction"] for i in sorted(layers)]
    assert abs(sum(sparsity) / len(sparsity) - 0.6) < 1e-12
    assert len(set(outliers)) == len(outliers)  # the layers differ, so OWL spreads them by exactly 2 lambda
    assert max(sparsity) - min(sparsity) == pytest.approx(2 * 0.1, abs=1e-12)
    order = sorted(range(len(outliers)), key=lambda i: outliers[i])
    assert [sparsity[i] for i in order] == sorted(sparsity, reverse=True)  # more outliers, lower sparsity
    original = AutoModelForCausalLM.from_pretrained(source).eval()  # the outlier fraction, recomputed here
    for layer in MoEModelView.from_model(original).layers:
        h = profile.stat(layer.index, "expert_input_energy").double().sqrt()
        n = profile.stat(layer.index, "neuron_input_energy").double().sqrt()
        scores = []
        for expert in range(layer.num_experts):
            w = layer.layout.expert_weights(layer.experts, expert)
            scores += [w.gate.double().abs() * h[expert], w.up.double().abs() * h[expert],
                       w.down.double().abs() * n[expert]]
        flat = torch.cat([s.flatten() for s in scores])
        assert layers[layer.index]["outlier_fraction"] == pytest.approx(float((flat > 3.0 * flat.mean()).double()
                                                                                .mean()), abs=1e-12)
    assert WEIGHT_CRITERIA.get("wanda").reads == ("expert_input_energy", "neuron_input_energy")


def test_stun_removes_experts_then_zeroes_weights_in_one_pass_with_the_2_4_pattern(norms_profile, tmp_path) -> None:
    from typer.testing import CliRunner

    from moekit.cli import app
    from moekit.edit.prune import prune_experts
    from moekit.profile import Profile

    runner = CliRunner()
    source, profile_dir = norms_profile / "model", norms_profile / "profile"
    result = runner.invoke(app, ["prune", str(source), "--profile", str(profile_dir), "--method", "stun", "--ratio",
                                 "0.25", "--sparsity", "0.5", "--sparsity-pattern", "2:4", "--out",
                                 str(tmp_path / "stun")])
    assert result.exit_code == 0, result.output
    assert "8 -> 6 experts" in result.stdout and "50.00% of the routed-expert weights" in result.stdout
    plan = json.loads((tmp_path / "stun" / "moekit_plan.json").read_text())
    assert plan["details"]["experts"]["method"] == "stun" and plan["details"]["allocation"] == "uniform"
    assert plan["measured_sparsity"]["routed_expert_weights"] == 0.5
    profile = Profile.load(profile_dir)
    by_hand = AutoModelForCausalLM.from_pretrained(source).eval()
    view = MoEModelView.from_model(by_hand)
    kept = {int(k): v["kept"] for k, v in plan["layers"].items()}
    prune_experts(view, kept)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stun").eval()
    for layer, written in zip(view.layers, MoEModelView.from_model(model).layers, strict=True):
        masks = _expected_masks(layer, profile.stat(layer.index, "expert_input_energy").double()[kept[layer.index]],
                                profile.stat(layer.index, "neuron_input_energy").double()[kept[layer.index]], 0.5,
                                (2, 4))
        for expert, expected in enumerate(masks):
            w0 = layer.layout.expert_weights(layer.experts, expert)
            w1 = written.layout.expert_weights(written.experts, expert)
            for name in ("gate", "up", "down"):
                new = getattr(w1, name)
                assert torch.equal(new, getattr(w0, name).masked_fill(expected[name], 0))
                assert bool(((new.reshape(new.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def test_a_sparsity_plan_applies_to_the_same_bytes_and_finds_a_moved_profile_only_when_told(norms_profile,
                                                                                            tmp_path) -> None:
    import shutil

    from typer.testing import CliRunner

    from moekit.cli import app

    runner = CliRunner()
    source = str(norms_profile / "model")
    moved = tmp_path / "profile-copy"
    shutil.copytree(norms_profile / "profile", moved)
    direct = runner.invoke(app, ["prune", source, "--profile", str(moved), "--sparsity", "0.4", "--out",
                                 str(tmp_path / "direct")])
    assert direct.exit_code == 0, direct.output
    planned = runner.invoke(app, ["prune", source, "--profile", str(moved), "--sparsity", "0.4", "--plan-only",
                                  "--out", str(tmp_path / "plan.json")])
    assert planned.exit_code == 0, planned.output
    applied = runner.invoke(app, ["apply", source, str(tmp_path / "plan.json"), "--out", str(tmp_path / "applied")])
    assert applied.exit_code == 0, applied.output
    weights = "model.safetensors"
    assert (tmp_path / "applied" / weights).read_bytes() == (tmp_path / "direct" / weights).read_bytes()
    moved.rename(tmp_path / "elsewhere")
    lost = runner.invoke(app, ["apply", source, str(tmp_path / "plan.json"), "--out", str(tmp_path / "lost")])
    assert lost.exit_code == 2 and "--profile" in lost.stderr and not (tmp_path / "lost").exists()
    wrong = runner.invoke(app, ["apply", source, str(tmp_path / "plan.json"), "--profile",
                                str(norms_profile / "plain"), "--out", str(tmp_path / "wrong")])
    assert wrong.exit_code == 2 and not (tmp_path / "wrong").exists(), wrong.output
    found = runner.invoke(app, ["apply", source, str(tmp_path / "plan.json"), "--profile", str(tmp_path / "elsewhere"),
                                "--out", str(tmp_path / "found")])
    assert found.exit_code == 0, found.output
    assert (tmp_path / "found" / weights).read_bytes() == (tmp_path / "direct" / weights).read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "0.5"], "--input-norms"),  # the plain profile
    (["--sparsity", "1.0"], "between 0 and 1"),
    (["--sparsity", "0"], "between 0 and 1"),
    (["--sparsity", "0.3", "--sparsity-pattern", "2:4"], "--sparsity 0.5"),
    (["--sparsity", "0.5", "--sparsity-pattern", "2:4", "--sparsity-allocation", "owl"], "uniform"),
    (["--sparsity", "0.5", "--sparsity-pattern", "4:2"], "0 < N < M"),
    (["--sparsity", "0.5", "--sparsity-allocation", "dense"], "uniform"),
    (["--sparsity", "0.5", "--sparsity-criterion", "magic"], "unknown weight criterion"),
    (["--sparsity", "0.9", "--owl-lambda", "0.2"], "lower --owl-lambda"),
    (["--sparsity", "0.5", "--neurons", "camera_p", "--neuron-ratio", "0.25"], "takes no --neurons"),
    (["--sparsity", "0.5", "--method", "naee", "--ratio", "0.25"], "not supported"),
])
def test_bad_sparsity_requests_are_refused_and_write_nothing(norms_profile, tmp_path, args, message) -> None:
    from typer.testing import CliRunner

    from moekit.cli import app

    profile = norms_profile / ("plain" if message == "--input-norms" else "profile")
    result = CliRunner().invoke(app, ["prune", str(norms_profile / "model"), "--profile", str(profile), *args,
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def test_sparsity_without_a_profile_names_the_profile_option(norms_profile, tmp_path) -> None:
    from typer.testing import CliRunner

    from moekit.cli import app

    result = CliRunner().invoke(app, ["prune", str(norms_profile / "model"), "--sparsity", "0.5", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and "--input-norms" in result.stderr and "--profile" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_report_names_both_stages_of_a_stun_plan(norms_profile, tmp_path) -> None:
    from moekit.edit.sparsity import make_sparsity_plan
    from moekit.model_io import load_structure
    from moekit.pipeline import make_plan, read_inputs
    from moekit.plan import PlanRequest
    from moekit.profile import Profile
    from moekit.report import build_report

    source = norms_profile / "model"
    inputs = read_inputs(norms_profile / "profile", [], None)
    experts = make_plan(source, PlanRequest(method="stun", ratio=0.25), inputs)
    plan = make_sparsity_plan(source, MoEModelView.from_model(load_structure(source)),
                              Profile.load(norms_profile / "profile"), "wanda", 0.5, experts_plan=experts)
    md, _ = build_report(tmp_path / "report", plans=[plan])
    text = " ".join(md.read_text().split()) if hasattr(md, "read_text") else " ".join(open(md).read().split())
    assert "stun, 25% removed, then wanda sparsity 0.5 of the kept experts' weights (owl, unstructured)" in text
