"""Neuron removal inside routed experts (``moekit.edit.neurons``): exact, stock-loadable, refused where unsafe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import ALL_FAMILIES, capture_transformers_log, profiled_tiny_model, random_ids
from transformers import AutoModelForCausalLM

from moekit.arch import MoEModelView
from moekit.arch.experts import shared_mlp_weights
from moekit.edit import PlanError
from moekit.edit.neurons import prune_neurons
from moekit.tiny import build_tiny_model

# Families whose config key for the routed experts' width also sizes their shared experts (found structurally by
# following_shared_widths; listed here from their modeling code: shared experts of width moe_intermediate_size x
# n_shared_experts, or a shared expert reading intermediate_size): their shared neurons are selected too.
SHARED_FOLLOWS = {"deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "llama4_text",
                  "exaone_moe"}
# ... and where dense layers read it (Jamba's MLP layers): refused.
DENSE_FOLLOWS = {"jamba"}


def _random_keep(view: MoEModelView, fraction: float = 0.75, seed: int = 1) -> dict[int, torch.Tensor]:
    width = view.layers[0].intermediate_size
    kept = max(1, int(width * fraction))
    gen = torch.Generator().manual_seed(seed)
    return {layer.index: torch.stack([torch.randperm(width, generator=gen)[:kept].sort().values
                                      for _ in range(layer.num_experts)]) for layer in view.layers}


def _detached(w):
    """A copy of an expert's weights (views into the model otherwise)."""
    from dataclasses import fields, replace

    return replace(w, **{f.name: None if getattr(w, f.name) is None else getattr(w, f.name).detach().clone()
                         for f in fields(w)})


def _random_shared_keep(view: MoEModelView, width: int, seed: int = 2) -> dict[int, torch.Tensor]:
    """Random kept neurons of the shared experts whose width follows the experts' (as many as the new config gives)."""
    from moekit.edit.neurons import following_shared_widths

    gen = torch.Generator().manual_seed(seed)
    layers = {layer.index: layer for layer in view.layers}
    return {index: torch.randperm(layers[index].shared_width, generator=gen)[:new].sort().values
            for index, new in following_shared_widths(view, width).items()}


def _masked(model, keep: dict[int, torch.Tensor], shared: dict[int, torch.Tensor] | None = None):
    """A copy of ``model`` whose removed neurons' down-projection columns are 0 (their activations never reach the
    output), in the routed experts and in the shared MLPs named in ``shared``: what removing them must compute."""
    clone = copy.deepcopy(model)
    view = MoEModelView.from_model(clone)
    with torch.no_grad():
        for layer in view.layers:
            width = layer.intermediate_size
            for expert in range(layer.num_experts):
                drop = torch.ones(width, dtype=torch.bool)
                drop[keep[layer.index][expert]] = False
                layer.layout.expert_weights(layer.experts, expert).down[:, drop] = 0
            if shared and layer.index in shared:
                drop = torch.ones(layer.shared_width, dtype=torch.bool)
                drop[shared[layer.index]] = False
                layer.shared_mlp[1].down_proj.weight[:, drop] = 0
    return clone


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_removing_neurons_equals_masking_them_and_reloads_stock(family, tmp_path) -> None:
    model = build_tiny_model(family).eval()
    view = MoEModelView.from_model(model)
    keep = _random_keep(view)
    width = view.layers[0].intermediate_size
    if family in DENSE_FOLLOWS:
        with pytest.raises(PlanError, match="dense layers"):
            prune_neurons(view, keep)
        return
    shared = _random_shared_keep(view, keep[view.layers[0].index].shape[1])
    assert bool(shared) == (family in SHARED_FOLLOWS)
    if shared:  # their neurons must be chosen too: refused without
        with pytest.raises(PlanError, match="also sizes the shared experts"):
            prune_neurons(view, keep)
    with torch.no_grad():
        before = {layer.index: [_detached(layer.layout.expert_weights(layer.experts, e))
                                for e in range(layer.num_experts)] for layer in view.layers}
        shared_before = {layer.index: _detached(shared_mlp_weights(layer.shared_mlp[1]))
                         for layer in view.layers if layer.index in shared}
    masked = _masked(model, keep, shared)
    ids = random_ids()
    with torch.no_grad():
        expected = masked(input_ids=ids).logits
        new_width = prune_neurons(view, keep, shared)
        got = model(input_ids=ids).logits
    assert new_width == keep[view.layers[0].index].shape[1] < width
    # not bit for bit: the down projection's reduction over fewer neurons is blocked differently
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), float((got - expected).abs().max())
    for layer in view.layers:  # each expert holds exactly its kept neurons, in order, in every projection
        assert layer.intermediate_size == new_width
        for expert in range(layer.num_experts):
            old, new = before[layer.index][expert], layer.layout.expert_weights(layer.experts, expert)
            idx = keep[layer.index][expert]
            assert torch.equal(new.up, old.up[idx]) and torch.equal(new.down, old.down[:, idx])
            if old.gate is not None:
                assert torch.equal(new.gate, old.gate[idx])
            for name in ("gate_bias", "up_bias"):
                if getattr(old, name) is not None:
                    assert torch.equal(getattr(new, name), getattr(old, name)[idx])
            if old.down_bias is not None:
                assert torch.equal(new.down_bias, old.down_bias)
        if layer.index in shared:  # the shared MLP holds exactly its kept neurons, and the config gives that width
            old, new, idx = shared_before[layer.index], shared_mlp_weights(layer.shared_mlp[1]), shared[layer.index]
            assert torch.equal(new.gate, old.gate[idx]) and torch.equal(new.up, old.up[idx])
            assert torch.equal(new.down, old.down[:, idx]) and layer.shared_width == idx.numel() < old.up.shape[0]
    model.save_pretrained(tmp_path / "pruned")
    with capture_transformers_log() as log:
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert log.getvalue() == ""
    assert MoEModelView.from_model(reloaded).layers[0].intermediate_size == new_width
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, got)


def test_keeping_every_neuron_changes_nothing() -> None:
    model = build_tiny_model("qwen3_moe").eval()
    view = MoEModelView.from_model(model)
    ids = random_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        width = view.layers[0].intermediate_size
        prune_neurons(view, {layer.index: torch.arange(width).repeat(layer.num_experts, 1) for layer in view.layers})
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_routed_expert_parameters_shrink_by_the_removed_fraction() -> None:
    model = build_tiny_model("mixtral")
    view = MoEModelView.from_model(model)
    before = sum(p.numel() for layer in view.layers for p in layer.experts.parameters())
    prune_neurons(view, _random_keep(view, fraction=0.5))
    after = sum(p.numel() for layer in view.layers for p in layer.experts.parameters())
    assert after * 2 == before
    assert model.config.intermediate_size == view.layers[0].intermediate_size


def test_bad_neuron_selections_are_refused_before_anything_changes() -> None:
    model = build_tiny_model("qwen3_moe")
    view = MoEModelView.from_model(model)
    good = _random_keep(view)
    first = view.layers[0].index
    width = view.layers[0].intermediate_size
    uneven = dict(good)
    uneven[first] = good[first][:, :-1]
    repeated = {i: k.clone() for i, k in good.items()}
    repeated[first][0, 1] = repeated[first][0, 0]
    outside = {i: k.clone() for i, k in good.items()}
    outside[first][0, -1] = width
    cases = {"different widths": (uneven, "one expert width"), "a missing layer": ({first: good[first]}, "missing"),
             "a repeated neuron": (repeated, "distinct and ascending"), "out of range": (outside, "0..")}
    weights = [p.clone() for p in model.parameters()]
    for label, (keep, message) in cases.items():
        with pytest.raises(PlanError, match=message):
            prune_neurons(view, keep)
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True)), label


def test_camera_p_is_its_formula_by_hand() -> None:
    from moekit.arch.experts import ExpertWeights
    from moekit.score.neurons import camera_p

    down = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])  # [H=2, I=3]: column energies 1, 9, 4
    expert = ExpertWeights(None, torch.zeros(3, 2), down)
    energy = torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float64)  # sum_t (g a)^2
    peak = torch.tensor([[1.0, 0.5, 2.0]], dtype=torch.float64)  # max_t |g a|
    got = camera_p({"neuron_energy": energy, "neuron_max": peak}, [expert])
    by_hand = [1 * (0.1 * 2.0 + 0.9 * 1.0), 9 * (0.1 * 1.0 + 0.9 * 0.25), 4 * (0.1 * 0.5 + 0.9 * 4.0)]
    assert torch.allclose(got, torch.tensor([by_hand], dtype=torch.float64))


def test_each_expert_keeps_its_own_highest_scoring_neurons_ties_to_the_lower_index() -> None:
    from moekit.edit.neurons import keep_top_neurons

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    assert keep_top_neurons(scores, 2).tolist() == [[1, 3], [0, 1]]
    assert keep_top_neurons(torch.tensor([[1.0, 1.0, 1.0]]), 2).tolist() == [[0, 1]]


@pytest.fixture(scope="module")
def neuron_profile(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint and its profile with per-neuron statistics (and one without)."""
    return profiled_tiny_model(tmp_path_factory.mktemp("neuron-profile"), "qwen3_moe", "neuron_stats",
                               " ".join(f"word{i % 97} and the {i % 13} line {i}" for i in range(3000)), 2048)


def test_neuron_plan_writes_a_smaller_stock_checkpoint_streamed_as_in_memory(neuron_profile, tmp_path) -> None:
    from safetensors import safe_open

    from moekit.edit.neurons import make_neuron_plan
    from moekit.model_io import load_structure
    from moekit.pipeline import apply_plan
    from moekit.profile import Profile
    from moekit.score.neurons import NEURON_CRITERIA, neuron_layer_stats

    source = neuron_profile / "model"
    view = MoEModelView.from_model(load_structure(source))
    profile = Profile.load(neuron_profile / "profile")
    plan = make_neuron_plan(source, view, profile, "camera_p", 0.25)
    width = view.layers[0].intermediate_size
    assert {k: plan["width"][k] for k in ("before", "after")} == {"before": width, "after": width - round(width * 0.25)}
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    live = MoEModelView.from_model(original)
    layer = live.layers[0]  # the plan keeps, per expert, the top camera_p scores computed here independently
    stats = neuron_layer_stats(profile, layer.index, None, NEURON_CRITERIA.get("camera_p").reads)
    for expert in range(layer.num_experts):
        w = layer.layout.expert_weights(layer.experts, expert)
        score = w.down.double().square().sum(0) * (0.1 * stats["neuron_energy"][expert]
                                                   + 0.9 * stats["neuron_max"][expert].square())
        kept = plan["layers"][str(layer.index)]["neurons"][expert]
        dropped = sorted(set(range(width)) - set(kept))
        assert min(score[kept]) >= max(score[dropped])
    streamed = apply_plan(source, plan, tmp_path / "streamed").out
    in_memory = apply_plan(source, plan, tmp_path / "in-memory", dtype="float32").out  # a cast: the in-memory path

    def tensors(path):
        out = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    a, b = tensors(streamed), tensors(in_memory)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
    source_tensors = tensors(source)

    def expert_bytes(ts):
        return sum(t.numel() * t.element_size() for name, t in ts.items() if ".experts." in name)

    assert expert_bytes(a) * width == expert_bytes(source_tensors) * plan["width"]["after"]
    assert all(torch.equal(a[k], source_tensors[k]) for k in a if ".experts." not in k)
    with capture_transformers_log() as log:
        model, info = AutoModelForCausalLM.from_pretrained(streamed, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert log.getvalue() == ""
    prune_neurons(live, {int(k): torch.tensor(v["neurons"]) for k, v in plan["layers"].items()})
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, original(input_ids=ids).logits)
    saved = json.loads((streamed / "moekit_plan.json").read_text())  # local paths saved relative to the output
    assert {k: saved[k] for k in ("format", "layers", "width", "method")} == \
        {k: plan[k] for k in ("format", "layers", "width", "method")}
    assert "keeps 24 of its 32" in (streamed / "README.md").read_text().replace("\n", " ")


def test_neuron_plan_refusals_name_the_fix_and_write_nothing(neuron_profile, tmp_path) -> None:
    from moekit.edit.neurons import make_neuron_plan
    from moekit.model_io import load_structure
    from moekit.pipeline import apply_plan
    from moekit.profile import Profile

    source = neuron_profile / "model"
    view = MoEModelView.from_model(load_structure(source))
    with pytest.raises(Exception, match="--neuron-stats"):
        make_neuron_plan(source, view, Profile.load(neuron_profile / "plain"), "camera_p", 0.25)
    for ratio in (0.0, 1.0, 0.99):
        with pytest.raises(PlanError, match="--neuron-ratio"):
            make_neuron_plan(source, view, Profile.load(neuron_profile / "profile"), "camera_p", ratio)
    with pytest.raises(Exception, match="unknown neuron criterion"):
        make_neuron_plan(source, view, Profile.load(neuron_profile / "profile"), "magic", 0.25)
    plan = make_neuron_plan(source, view, Profile.load(neuron_profile / "profile"), "camera_p", 0.25)
    broken = json.loads(json.dumps(plan))
    broken["layers"]["0"]["neurons"][1] = broken["layers"]["0"]["neurons"][1][:-1]
    wrong_width = json.loads(json.dumps(plan))
    wrong_width["width"]["after"] = 7
    for bad, message in ((broken, "different numbers of neurons"), (wrong_width, "'width' must be")):
        with pytest.raises(PlanError, match=message):
            apply_plan(source, bad, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_moekit_prune_neurons_from_the_command_line(neuron_profile, tmp_path) -> None:
    from typer.testing import CliRunner

    from moekit.cli import app

    runner = CliRunner()
    source, profile = str(neuron_profile / "model"), str(neuron_profile / "profile")
    result = runner.invoke(app, ["prune", source, "--profile", profile, "--neurons", "camera_p", "--neuron-ratio",
                                 "0.5", "--out", str(tmp_path / "half")])
    assert result.exit_code == 0, result.output
    assert "32 -> 16 neurons in every routed expert" in " ".join(result.stdout.split())
    assert json.loads((tmp_path / "half" / "config.json").read_text())["moe_intermediate_size"] == 16
    plan = runner.invoke(app, ["prune", source, "--profile", profile, "--neurons", "camera_p", "--neuron-ratio",
                               "0.5", "--plan-only", "--out", str(tmp_path / "plan.json")])
    assert plan.exit_code == 0, plan.output
    applied = runner.invoke(app, ["apply", source, str(tmp_path / "plan.json"), "--out", str(tmp_path / "applied")])
    assert applied.exit_code == 0, applied.output
    weights = "model.safetensors"
    assert (tmp_path / "applied" / weights).read_bytes() == (tmp_path / "half" / weights).read_bytes()
    for extra, message in ((["--keep-json", str(tmp_path / "plan.json")], "takes no --keep-json"),
                           (["--method", "naee", "--ratio", "0.5"], "not supported")):
        bad = runner.invoke(app, ["prune", source, "--profile", profile, "--neurons", "camera_p", "--neuron-ratio",
                                  "0.5", *extra, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and message in " ".join(bad.stderr.split()), bad.output
    plain = runner.invoke(app, ["prune", source, "--profile", str(neuron_profile / "plain"), "--neurons", "camera_p",
                                "--neuron-ratio", "0.5", "--out", str(tmp_path / "bad")])
    assert plain.exit_code == 2 and "--neuron-stats" in plain.stderr
    assert not (tmp_path / "bad").exists()


def test_a_report_reads_a_neuron_plan(neuron_profile, tmp_path) -> None:
    from moekit.edit.neurons import make_neuron_plan
    from moekit.model_io import load_structure
    from moekit.profile import Profile
    from moekit.report import build_report

    source = neuron_profile / "model"
    plan = make_neuron_plan(source, MoEModelView.from_model(load_structure(source)),
                            Profile.load(neuron_profile / "profile"), "camera_p", 0.25)
    md, _ = build_report(tmp_path / "report", plans=[plan])
    text = " ".join(Path(md).read_text().split())
    assert "every expert is kept; every kept expert keeps 24 of its 32 neurons" in text


def test_layer_selection_removes_the_lowest_scores_of_the_whole_layer() -> None:
    from moekit.edit.neurons import keep_layer_top_neurons

    scores = torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.8, 0.1]])
    assert keep_layer_top_neurons(scores, 3) == [[0, 2], [1]]  # 0.1 (0,1), 0.1 (1,2), 0.2 (1,0) go
    assert keep_layer_top_neurons(torch.ones(2, 2), 1) == [[1], [0, 1]]  # ties: the lower expert, neuron first


def test_masked_neuron_plan_zeroes_exactly_the_layer_selection_and_says_it_saves_nothing(neuron_profile,
                                                                                          tmp_path) -> None:
    from moekit.edit.neurons import make_neuron_plan
    from moekit.model_io import load_structure
    from moekit.pipeline import apply_plan
    from moekit.profile import Profile

    source = neuron_profile / "model"
    view = MoEModelView.from_model(load_structure(source))
    plan = make_neuron_plan(source, view, Profile.load(neuron_profile / "profile"), "camera_p", 0.25, mode="masked")
    width, experts = view.layers[0].intermediate_size, view.num_experts
    rows = plan["layers"][str(view.layers[0].index)]["neurons"]
    assert sum(len(r) for r in rows) == experts * width - experts * width // 4
    assert len({len(r) for r in rows}) > 1  # experts keep different numbers: why it cannot shrink a stock config
    streamed = apply_plan(source, plan, tmp_path / "streamed").out
    in_memory = apply_plan(source, plan, tmp_path / "in-memory", dtype="float32").out
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    masked_by_hand = _masked(original, {int(k): [torch.tensor(r, dtype=torch.long) for r in v["neurons"]]
                                        for k, v in plan["layers"].items()})
    ids = random_ids()
    with torch.no_grad():
        expected = masked_by_hand(input_ids=ids).logits
        for path in (streamed, in_memory):
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            assert torch.allclose(model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
            for layer in MoEModelView.from_model(model).layers:  # every unkept neuron is zero in every projection
                for expert, kept in enumerate(plan["layers"][str(layer.index)]["neurons"]):
                    w = layer.layout.expert_weights(layer.experts, expert)
                    drop = sorted(set(range(width)) - set(kept))
                    assert not w.down[:, drop].any() and not w.up[drop].any() and not w.gate[drop].any()
                    assert w.down[:, kept].any()
    assert (streamed / "model.safetensors").stat().st_size == (source / "model.safetensors").stat().st_size
    card = " ".join((streamed / "README.md").read_text().split())
    assert "saves no memory" in card and "zeroed, not removed" in card


def _shared_inputs_by_hook(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per MoE layer, sum over real tokens of b_m^2 and max over them of |b_m|, b = what its shared MLP's down
    projection reads, from a plain forward hook (not moekit's capture), in float64."""
    view = MoEModelView.from_model(model)
    real = mask.reshape(-1).bool()
    out, handles = {}, []
    for layer in view.layers:
        def keep(_module, args, index=layer.index):
            b = args[0].reshape(-1, args[0].shape[-1])[real].double()
            out[index] = (b.square().sum(0), b.abs().amax(0))
        handles.append(layer.shared_mlp[1].down_proj.register_forward_pre_hook(keep))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return out


@pytest.mark.parametrize("family", ["deepseek_v3", "llama4_text", "qwen2_moe"])
def test_shared_neuron_statistics_match_a_plain_hook(family) -> None:
    from moekit.data import CalibrationSet
    from moekit.profile.collect import collect_profile

    model = build_tiny_model(family).eval()
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # padding never counts
    profile = collect_profile(model, [CalibrationSet("text", ids, mask)], batch_size=2, neuron_stats=True,
                              progress=False)
    assert profile.meta["options"]["shared_neuron_stats"] is True
    for index, (energy, peak) in _shared_inputs_by_hook(model, ids, mask).items():
        assert float(energy.min()) > 0
        assert torch.allclose(profile.layers[index]["shared_neuron_energy"][0], energy, rtol=1e-5, atol=0)
        assert torch.allclose(profile.layers[index]["shared_neuron_max"][0].double(), peak, rtol=1e-5, atol=0)


def test_shared_expert_neurons_are_chosen_by_the_same_criterion_and_removed(tmp_path) -> None:
    """DeepSeek-V2 with two shared experts (shared width = moe_intermediate_size x 2 = 64): removing a quarter of the
    routed experts' neurons makes stock from_pretrained build the shared MLP 48 wide, so moekit prune --neurons keeps
    its 48 highest camera_p neurons (computed here from the profile's statistics and the weights), the written
    checkpoint loads stock and computes the source with exactly those neurons masked, and the card says so."""
    from typer.testing import CliRunner

    from moekit.cli import app
    from moekit.profile import Profile, profile_model
    from moekit.tiny import save_tiny_model

    source = save_tiny_model("deepseek_v2", tmp_path / "model", n_shared_experts=2)
    (tmp_path / "text.txt").write_text(" ".join(f"word{i % 97} and the {i % 13} line {i}" for i in range(2000)))
    profile_model(source, [f"prose={tmp_path / 'text.txt'}"], tmp_path / "profile", seq_len=64, max_tokens=1024,
                  progress=False, neuron_stats=True)
    result = CliRunner().invoke(app, ["prune", str(source), "--profile", str(tmp_path / "profile"), "--neurons",
                                      "camera_p", "--neuron-ratio", "0.25", "--out", str(tmp_path / "pruned")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "pruned" / "moekit_plan.json").read_text())
    assert plan["width"]["shared"] == {"before": 64, "after": 48} and plan["width"]["after"] == 24
    profile = Profile.load(tmp_path / "profile")
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    view = MoEModelView.from_model(original)
    shared = {}
    for layer in view.layers:
        stats = profile.layers[layer.index]
        energy, peak = stats["shared_neuron_energy"][0], stats["shared_neuron_max"][0].double()
        score = layer.shared_mlp[1].down_proj.weight.detach().double().square().sum(0) * (0.1 * energy
                                                                                          + 0.9 * peak.square())
        kept = plan["layers"][str(layer.index)]["shared_neurons"]
        dropped = sorted(set(range(64)) - set(kept))
        assert len(kept) == 48 and min(score[kept]) >= max(score[dropped])
        shared[layer.index] = torch.tensor(kept)
    routed = {int(k): torch.tensor(v["neurons"]) for k, v in plan["layers"].items()}
    expected_model = _masked(original, routed, shared)
    with capture_transformers_log() as log:
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert log.getvalue() == ""
    pruned_view = MoEModelView.from_model(model)
    assert all(layer.shared_width == 48 and layer.intermediate_size == 24 for layer in pruned_view.layers)
    ids = random_ids()
    with torch.no_grad():
        got, expected = model.eval()(input_ids=ids).logits, expected_model(input_ids=ids).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), float((got - expected).abs().max())
    card = " ".join((tmp_path / "pruned" / "README.md").read_text().split())
    assert "shared experts keep 48 of their 64 neurons, chosen by the same criterion" in card
    # masking (no shapes change) leaves the shared experts whole
    masked = CliRunner().invoke(app, ["prune", str(source), "--profile", str(tmp_path / "profile"), "--neurons",
                                      "camera_p", "--neuron-ratio", "0.25", "--mode", "masked", "--out",
                                      str(tmp_path / "masked")])
    assert masked.exit_code == 0, masked.output
    masked_plan = json.loads((tmp_path / "masked" / "moekit_plan.json").read_text())
    assert "shared" not in masked_plan["width"]
    assert all("shared_neurons" not in entry for entry in masked_plan["layers"].values())


def test_a_profile_without_shared_neuron_statistics_is_refused_by_name(tmp_path) -> None:
    """A profile written before moekit recorded the shared experts' neurons cannot choose them: refused before a
    weight is read, naming the option that collects them."""
    from moekit.edit.neurons import make_neuron_plan
    from moekit.model_io import load_structure
    from moekit.profile import Profile

    root = profiled_tiny_model(tmp_path, "deepseek_v3", "neuron_stats",
                               " ".join(f"word{i % 97} and {i}" for i in range(1000)), 512)
    source = root / "model"
    view = MoEModelView.from_model(load_structure(source))
    old = Profile.load(root / "profile")
    old.meta["options"].pop("shared_neuron_stats")
    for stats in old.layers.values():
        for name in ("shared_neuron_energy", "shared_neuron_max"):
            stats.pop(name)
    with pytest.raises(PlanError, match=r"shared_neuron_energy.*--neuron-stats"):
        make_neuron_plan(source, view, old, "camera_p", 0.25)
    make_neuron_plan(source, view, Profile.load(root / "profile"), "camera_p", 0.25)  # this moekit's profile works


def test_one_plan_removes_experts_then_neurons_in_one_pass(neuron_profile, tmp_path) -> None:
    """moekit prune --method reap --ratio 0.25 --neurons camera_p --neuron-ratio 0.25: the written checkpoint is the
    source with those experts pruned and then those neurons removed (done by hand in memory), streamed = in memory,
    and its routed-expert bytes are the product of the kept fractions."""
    from typer.testing import CliRunner

    from moekit.cli import app
    from moekit.edit.prune import prune_experts
    from moekit.pipeline import apply_plan

    runner = CliRunner()
    source = neuron_profile / "model"
    result = runner.invoke(app, ["prune", str(source), "--profile", str(neuron_profile / "profile"), "--method",
                                 "reap", "--ratio", "0.25", "--neurons", "camera_p", "--neuron-ratio", "0.25",
                                 "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "both" / "moekit_plan.json").read_text())
    assert plan["num_experts"] == {"before": 8, "after": 6}
    assert {k: plan["width"][k] for k in ("before", "after")} == {"before": 32, "after": 24}
    assert plan["details"]["experts"]["method"] == "reap"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "both").eval()
    by_hand = AutoModelForCausalLM.from_pretrained(source).eval()
    view = MoEModelView.from_model(by_hand)
    prune_experts(view, {int(k): v["kept"] for k, v in plan["layers"].items()})
    prune_neurons(view, {int(k): torch.tensor(v["neurons"]) for k, v in plan["layers"].items()})
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, by_hand(input_ids=ids).logits)
    in_memory = apply_plan(source, plan, tmp_path / "in-memory", dtype="float32").out
    reloaded = AutoModelForCausalLM.from_pretrained(in_memory).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

    def expert_bytes(path):
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return sum(f.get_tensor(k).nbytes for k in f.keys() if ".experts." in k)

    assert expert_bytes(tmp_path / "both") * 8 * 32 == expert_bytes(source) * 6 * 24


def test_kept_width_rounds_to_whole_16_byte_rows() -> None:
    """Grouped-GEMM kernels (transformers' default experts implementation) need expert rows of a multiple of 16
    bytes: 219 float32 neurons fail at the first forward, so uniform plans round the kept width."""
    from moekit.edit.neurons import kept_width

    assert kept_width(80, 0.25, align=4) == 60
    assert kept_width(80, 0.25, align=8) == 64  # 60 is 7.5 rows of 8: halves round up
    assert kept_width(48, 0.25, align=8) == 40
    assert kept_width(320, 1 - 0.75 / 0.875, align=4) == 276  # 274.3 -> the nearest multiple of 4
    assert kept_width(16, 0.9, align=8) == 8  # at least one row of 8 stays
    assert kept_width(30, 0.25, align=8) == 22  # a width that is no multiple of 8 is not rounded


def test_shared_flag_shrinks_shared_experts_with_a_width_key_of_their_own(tmp_path) -> None:
    """Qwen2-MoE sizes its shared expert by shared_expert_intermediate_size (48): without --shared it keeps its width;
    with --shared it loses the same quarter of its neurons (48 -> 36), its top camera_p ones, the config key follows,
    and the checkpoint loads stock and computes the source with exactly those neurons masked. --shared where the
    shared width has no key of its own, or without --neurons, is refused with exit 2 and nothing written."""
    from typer.testing import CliRunner

    from moekit.cli import app
    from moekit.profile import Profile, profile_model
    from moekit.tiny import save_tiny_model

    runner = CliRunner()
    source = save_tiny_model("qwen2_moe", tmp_path / "model")
    (tmp_path / "text.txt").write_text(" ".join(f"word{i % 97} and the {i % 13} line {i}" for i in range(2000)))
    profile_model(source, [f"prose={tmp_path / 'text.txt'}"], tmp_path / "profile", seq_len=64, max_tokens=1024,
                  progress=False, neuron_stats=True)
    args = ["prune", str(source), "--profile", str(tmp_path / "profile"), "--neurons", "camera_p", "--neuron-ratio",
            "0.25"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "routed-only")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "routed-only" / "moekit_plan.json").read_text())
    assert "shared" not in plan["width"]
    assert json.loads((tmp_path / "routed-only" / "config.json").read_text())["shared_expert_intermediate_size"] == 48
    result = runner.invoke(app, [*args, "--shared", "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "both" / "moekit_plan.json").read_text())
    assert plan["width"]["shared"] == {"before": 48, "after": 36}
    config = json.loads((tmp_path / "both" / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 36 and config["moe_intermediate_size"] == 24
    profile = Profile.load(tmp_path / "profile")
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    shared = {}
    for layer in MoEModelView.from_model(original).layers:
        stats = profile.layers[layer.index]
        score = layer.shared_mlp[1].down_proj.weight.detach().double().square().sum(0) * (
            0.1 * stats["shared_neuron_energy"][0] + 0.9 * stats["shared_neuron_max"][0].double().square())
        kept = plan["layers"][str(layer.index)]["shared_neurons"]
        assert len(kept) == 36 and min(score[kept]) >= max(score[sorted(set(range(48)) - set(kept))])
        shared[layer.index] = torch.tensor(kept)
    expected_model = _masked(original, {int(k): torch.tensor(v["neurons"]) for k, v in plan["layers"].items()},
                             shared)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "both", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = random_ids()
    with torch.no_grad():
        got, expected = model.eval()(input_ids=ids).logits, expected_model(input_ids=ids).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), float((got - expected).abs().max())
    assert "asked for with `--shared`" in (tmp_path / "both" / "README.md").read_text()
    # refusals: a family whose shared width follows the experts' (nothing to ask for), --shared alone
    deepseek = save_tiny_model("deepseek_v3", tmp_path / "deepseek")
    profile_model(deepseek, [f"prose={tmp_path / 'text.txt'}"], tmp_path / "deepseek-profile", seq_len=64,
                  max_tokens=256, progress=False, neuron_stats=True)
    for argv, message in (
            (["prune", str(deepseek), "--profile", str(tmp_path / "deepseek-profile"), "--neurons", "camera_p",
              "--neuron-ratio", "0.25", "--shared"], "no width key of their own"),
            (["prune", str(source), "--profile", str(tmp_path / "profile"), "--method", "reap", "--ratio", "0.25",
              "--shared"], "goes with --neurons")):
        result = runner.invoke(app, [*argv, "--out", str(tmp_path / "refused")])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert not (tmp_path / "refused").exists()
