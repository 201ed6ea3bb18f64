"""The gradient profile (``moekit profile --gradients``) and HEAPr, checked against an independent computation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import profiled_tiny_model

from moekit.arch import MoEModelView
from moekit.data import CalibrationSet
from moekit.profile.collect import collect_profile
from moekit.tiny import build_tiny_model


def _batches(ids: torch.Tensor, mask: torch.Tensor, size: int):
    for first in range(0, ids.shape[0], size):
        yield ids[first:first + size], mask[first:first + size]


def _output_grad_energy_by_autograd(model, ids: torch.Tensor, mask: torch.Tensor, batch_size: int):
    """sum over each expert's real tokens of (dL/dy_t . W_down[:, n])^2, computed without moekit's capture: y_t is
    the experts module's output (retain_grad), the routing is read from the experts call's arguments, the loss is
    written out (cross-entropy of each next real token, summed)."""
    view = MoEModelView.from_model(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    shared_out: dict[int, torch.Tensor] = {}
    handles = []
    for layer in view.layers:
        def keep(_module, args, out, index=layer.index):
            out.retain_grad()
            seen[index] = (args[1].detach(), out)

        def keep_shared(_module, _args, out, index=layer.index):
            out.retain_grad()
            shared_out[index] = out
        handles.append(layer.experts.register_forward_hook(keep))
        if layer.shared_mlp is not None:
            handles.append(layer.shared_mlp[1].down_proj.register_forward_hook(keep_shared))
    expected = {layer.index: torch.zeros(layer.num_experts, layer.intermediate_size, dtype=torch.float64)
                for layer in view.layers}
    expected_shared = {layer.index: torch.zeros(layer.shared_width, dtype=torch.float64) for layer in view.layers}
    try:
        for batch_ids, batch_mask in _batches(ids, mask, batch_size):
            logits = model(input_ids=batch_ids).logits
            targets = batch_ids[:, 1:].masked_fill(batch_mask[:, 1:] == 0, -100)
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                            reduction="sum").backward()
            real = batch_mask.reshape(-1) == 1
            for layer in view.layers:
                chosen, out = seen[layer.index]
                grad = out.grad.reshape(-1, out.shape[-1]).double()
                chosen = chosen.reshape(grad.shape[0], -1)
                for expert in range(layer.num_experts):
                    down = layer.layout.expert_weights(layer.experts, expert).down.detach().double()  # [H, I]
                    rows = ((chosen == expert).any(-1) & real).nonzero().flatten()
                    expected[layer.index][expert] += (grad[rows] @ down).square().sum(0)
                if layer.index in shared_out:  # sum over real tokens of (dL/d(shared output) . W_down^s[:, m])^2
                    out = shared_out[layer.index]
                    grad = out.grad.reshape(-1, out.shape[-1]).double()[real]
                    down = layer.shared_mlp[1].down_proj.weight.detach().double()
                    expected_shared[layer.index] += (grad @ down).square().sum(0)
            model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    return expected, expected_shared


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "dbrx", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_output_gradient_energy_matches_autograd_and_other_statistics_are_unchanged(family) -> None:
    model = build_tiny_model(family).eval().float()
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0  # padding is never a target and never counts
    sets = [CalibrationSet("text", ids, mask)]
    with_gradients = collect_profile(model, sets, batch_size=2, gradients=True, progress=False)
    plain = collect_profile(model, sets, batch_size=2, neuron_stats=True, progress=False)
    expected, expected_shared = _output_grad_energy_by_autograd(model, ids, mask, batch_size=2)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    for index, stats in with_gradients.layers.items():
        assert set(stats) == set(plain.layers[index]) | {"output_grad_energy", "shared_output_grad_energy"}
        shared = stats["shared_output_grad_energy"][0]
        assert shared.shape == expected_shared[index].shape
        if shared.numel():  # the shared experts' gradient statistic too
            assert float(expected_shared[index].min()) > 0
            assert torch.allclose(shared, expected_shared[index], rtol=1e-5, atol=0)
        for name, tensor in plain.layers[index].items():  # the backward pass changes no other statistic
            assert torch.equal(stats[name], tensor), (index, name)
        got = stats["output_grad_energy"][0]
        assert float(expected[index].abs().max()) > 0
        assert torch.allclose(got, expected[index], rtol=1e-5, atol=1e-9 * float(expected[index].abs().max()))
    assert with_gradients.meta["options"]["gradients"] is True
    assert with_gradients.meta["options"]["neuron_stats"] is True


def test_heapr_is_its_formula_by_hand() -> None:
    from moekit.arch.experts import ExpertWeights
    from moekit.score.neurons import heapr

    expert = ExpertWeights(None, torch.zeros(3, 2), torch.zeros(2, 3))
    energy = torch.tensor([[2.0, 1.0, 0.5], [4.0, 0.0, 1.0]], dtype=torch.float64)  # sum_t (g a)^2
    grad_energy = torch.tensor([[3.0, 6.0, 1.0], [1.0, 5.0, 2.0]], dtype=torch.float64)  # sum_t (d . w)^2
    count = torch.tensor([3.0, 2.0], dtype=torch.float64)
    got = heapr({"neuron_energy": energy, "output_grad_energy": grad_energy, "count": count}, [expert, expert])
    by_hand = [[0.5 * 2 * 3 / 3, 0.5 * 1 * 6 / 3, 0.5 * 0.5 * 1 / 3], [0.5 * 4 * 1 / 2, 0.0, 0.5 * 1 * 2 / 2]]
    assert torch.allclose(got, torch.tensor(by_hand, dtype=torch.float64))


@pytest.fixture(scope="module")
def gradient_profile(tmp_path_factory):
    return profiled_tiny_model(tmp_path_factory.mktemp("gradient-profile"), "qwen3_moe", "gradients",
                               " ".join(f"word{i % 97} and the {i % 13} line {i}" for i in range(2000)), 1024)


def test_moekit_prune_neurons_heapr_and_its_refusals(gradient_profile, tmp_path) -> None:
    from typer.testing import CliRunner

    from moekit.cli import app

    runner = CliRunner()
    source, profile = str(gradient_profile / "model"), str(gradient_profile / "profile")
    result = runner.invoke(app, ["prune", source, "--profile", profile, "--neurons", "heapr", "--neuron-ratio",
                                 "0.25", "--out", str(tmp_path / "heapr")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "heapr" / "config.json").read_text())["moe_intermediate_size"] == 24
    plan = json.loads((tmp_path / "heapr" / "moekit_plan.json").read_text())
    assert plan["method"] == "heapr"
    plain = runner.invoke(app, ["prune", source, "--profile", str(gradient_profile / "plain"), "--neurons", "heapr",
                                "--neuron-ratio", "0.25", "--out", str(tmp_path / "bad")])
    assert plain.exit_code == 2 and "--gradients" in plain.stderr, plain.output
    sequential = runner.invoke(app, ["profile", source, "--data", f"prose={gradient_profile / 'text.txt'}",
                                     "--seq-len", "64", "--gradients", "--sequential", "--out", str(tmp_path / "bad")])
    assert sequential.exit_code == 2 and "--sequential" in sequential.stderr, sequential.output
    assert not (tmp_path / "bad").exists()


def test_heapr_scores_the_shared_experts_neurons_with_its_own_formula(tmp_path) -> None:
    """DeepSeek-V3's shared width follows the experts': a heapr plan keeps the shared MLP's neurons with the highest
    1/2 sum_t b_m^2 x mean_t (d^s_t . W_down^s[:, m])^2 over every token (the shared MLP as one more expert, g = 1)."""
    from transformers import AutoModelForCausalLM

    from moekit.edit.neurons import make_neuron_plan
    from moekit.model_io import load_structure
    from moekit.profile import Profile

    root = profiled_tiny_model(tmp_path, "deepseek_v3", "gradients",
                               " ".join(f"word{i % 97} and the {i % 13} line {i}" for i in range(1500)), 768)
    source = root / "model"
    view = MoEModelView.from_model(load_structure(source))
    profile = Profile.load(root / "profile")
    plan = make_neuron_plan(source, view, profile, "heapr", 0.25)
    assert plan["width"]["shared"] == {"before": 32, "after": 24}
    live = MoEModelView.from_model(AutoModelForCausalLM.from_pretrained(source))
    for layer in live.layers:
        stats = profile.layers[layer.index]
        tokens = float(stats["tokens"][0])
        score = 0.5 * stats["shared_neuron_energy"][0] * stats["shared_output_grad_energy"][0] / tokens
        kept = plan["layers"][str(layer.index)]["shared_neurons"]
        dropped = sorted(set(range(32)) - set(kept))
        assert float(score.min()) >= 0 and min(score[kept]) >= max(score[dropped]) and len(kept) == 24
    with pytest.raises(Exception, match="--gradients"):  # a profile without gradients cannot score them
        make_neuron_plan(source, view, Profile.load(root / "plain"), "heapr", 0.25)
