"""Routing masks (``moekit mask``, ``moekit.edit.mask``): written through the family's selection bias, equal to the
view's masked routing, stock-loadable; removal only when asked; bad input refused with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import capture_transformers_log, random_ids
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moekit.arch import MoEModelView
from moekit.cli import app
from moekit.tiny import TINY_FAMILIES, save_tiny_model

MASKED = (1, 5)


def _sorted_routing(layer, hidden, available=None):
    routing = layer.route(hidden, available)
    order = routing.index.sort(-1)
    return order.values, routing.weights.gather(1, order.indices)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "gpt_oss"])
def test_a_mask_is_the_views_masked_routing_and_reloads_stock(family, tmp_path) -> None:
    source = save_tiny_model(family, tmp_path / "model")
    view = MoEModelView.from_model(AutoModelForCausalLM.from_pretrained(source))
    spec = ",".join(f"{layer.index}:{e}" for layer in view.layers for e in MASKED)
    result = CliRunner().invoke(app, ["mask", str(source), "--experts", spec, "--out", str(tmp_path / "masked")])
    assert result.exit_code == 0, result.output
    with capture_transformers_log() as log:
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "masked", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert log.getvalue() == ""
    masked_view = MoEModelView.from_model(model)
    hidden = torch.randn(200, view.layers[0].router_weight.shape[-1], generator=torch.Generator().manual_seed(0))
    for original, masked in zip(view.layers, masked_view.layers, strict=True):
        available = torch.ones(original.num_experts, dtype=torch.bool)
        available[list(MASKED)] = False
        want_index, want_weights = _sorted_routing(original, hidden, available)
        got_index, got_weights = _sorted_routing(masked, hidden)
        assert torch.equal(got_index, want_index)
        assert torch.equal(got_weights, want_weights)
        assert not torch.isin(got_index, torch.tensor(MASKED)).any()
        # without the mask the original does route to them: the mask changed something
        assert torch.isin(original.route(hidden).index, torch.tensor(MASKED)).any()
    plan = json.loads((tmp_path / "masked" / "moekit_plan.json").read_text())
    assert plan["format"] == "moekit.routing_mask_plan/1" and plan["details"]["equals_removal"] is True
    assert all(entry["masked"] == list(MASKED) for entry in plan["layers"].values())
    card = " ".join((tmp_path / "masked" / "README.md").read_text().split())
    assert f"{2 * len(view.layers)} experts are never selected" in card and "routed exactly as" in card
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():  # every weight is the source's: only the bias entries changed
        for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items(), strict=True):
            if not torch.equal(a, b):
                assert "bias" in name and torch.isinf(b).sum() == len(MASKED), name
        assert torch.isfinite(model.eval()(input_ids=random_ids()).logits).all()
    # apply: the plan gives the same checkpoint
    applied = CliRunner().invoke(app, ["apply", str(source), str(tmp_path / "masked" / "moekit_plan.json"), "--out",
                                       str(tmp_path / "applied")])
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "applied" / "model.safetensors").read_bytes() == \
        (tmp_path / "masked" / "model.safetensors").read_bytes()


def test_where_a_softmax_precedes_the_biased_choice_the_card_says_the_routing_differs_from_removal(tmp_path) -> None:
    """ERNIE-4.5 chooses from softmax probabilities plus its correction bias: the masked experts are never chosen,
    the others are chosen from probabilities normalised over every expert (what the stock model computes)."""
    source = save_tiny_model("ernie4_5_moe", tmp_path / "model")
    view = MoEModelView.from_model(AutoModelForCausalLM.from_pretrained(source))
    spec = ",".join(f"{layer.index}:{e}" for layer in view.layers for e in MASKED)
    result = CliRunner().invoke(app, ["mask", str(source), "--experts", spec, "--out", str(tmp_path / "masked")])
    assert result.exit_code == 0, result.output
    masked_view = MoEModelView.from_model(AutoModelForCausalLM.from_pretrained(tmp_path / "masked"))
    hidden = torch.randn(200, view.layers[0].router_weight.shape[-1], generator=torch.Generator().manual_seed(0))
    for original, masked in zip(view.layers, masked_view.layers, strict=True):
        index = masked.route(hidden).index
        assert not torch.isin(index, torch.tensor(MASKED)).any()
        # by hand: the stock choice, probabilities over every expert plus the bias, masked experts at -inf
        probs = torch.softmax(original.router_logits(hidden).float(), dim=-1)
        choice = probs + original.correction_bias.float().reshape(-1)
        choice[:, list(MASKED)] = float("-inf")
        assert torch.equal(index.sort(-1).values, choice.topk(original.top_k, dim=-1).indices.sort(-1).values)
    plan = json.loads((tmp_path / "masked" / "moekit_plan.json").read_text())
    assert plan["details"]["equals_removal"] is False
    assert "removing the masked experts would renormalise" in " ".join(
        (tmp_path / "masked" / "README.md").read_text().split())


def test_families_without_a_selection_bias_mask_only_by_removal_when_asked(tmp_path) -> None:
    runner = CliRunner()
    source = save_tiny_model("qwen3_moe", tmp_path / "model")
    view = MoEModelView.from_model(AutoModelForCausalLM.from_pretrained(source))
    spec = ",".join(f"{layer.index}:{e}" for layer in view.layers for e in MASKED)
    refused = runner.invoke(app, ["mask", str(source), "--experts", spec, "--out", str(tmp_path / "out")])
    assert refused.exit_code == 2 and "--allow-remove" in refused.output
    assert not (tmp_path / "out").exists()
    removed = runner.invoke(app, ["mask", str(source), "--experts", spec, "--allow-remove", "--out",
                                  str(tmp_path / "out")])
    assert removed.exit_code == 0, removed.output
    plan = json.loads((tmp_path / "out" / "moekit_plan.json").read_text())
    assert plan["format"] == "moekit.expert_prune_plan/1" and plan["method"] == "routing-mask-removed"
    assert all(entry["removed"] == list(MASKED) for entry in plan["layers"].values())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_experts == view.num_experts - 2


def test_bad_masks_are_refused_with_nothing_written(tmp_path) -> None:
    runner = CliRunner()
    source = save_tiny_model("deepseek_v3", tmp_path / "model")
    for argv, message in ((["--experts", "1:99"], "out of range"), (["--experts", "0:1"], "not an MoE layer"),
                          (["--experts", "1:x"], "LAYER:EXPERT"), ([], "give the experts to mask"),
                          (["--experts", ",".join(f"1:{e}" for e in range(7))], "fewer than the"),
                          (["--from-contrast", "a:b:2"], "give --profile")):
        result = runner.invoke(app, ["mask", str(source), *argv, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, (argv, result.output)
        assert message in " ".join(result.output.split()), (argv, result.output)
        assert not (tmp_path / "out").exists()


def test_routing_bias_masks_and_boosts_in_memory_and_restores() -> None:
    """In memory, -inf through routing_bias routes exactly as the view's masked routing; a boost makes an expert
    chosen for more tokens; the bias is restored on exit, also after an error; families without a bias refused."""
    from moekit.edit import PlanError
    from moekit.edit.mask import routing_bias
    from moekit.tiny import build_tiny_model

    model = build_tiny_model("deepseek_v3")
    view = MoEModelView.from_model(model)
    layer = view.layers[0]
    hidden = torch.randn(300, layer.router_weight.shape[-1], generator=torch.Generator().manual_seed(0))
    before = layer.correction_bias.detach().clone()
    available = torch.ones(layer.num_experts, dtype=torch.bool)
    available[list(MASKED)] = False
    mask = torch.zeros(layer.num_experts)
    mask[list(MASKED)] = float("-inf")
    with routing_bias(view, {layer.index: mask}):
        masked_index, masked_weights = _sorted_routing(layer, hidden)
        want_index, want_weights = _sorted_routing(layer, hidden, available)
        assert torch.equal(masked_index, want_index) and torch.equal(masked_weights, want_weights)
    assert torch.equal(layer.correction_bias, before)
    chosen = int((layer.route(hidden).index == 6).sum())
    boost = torch.zeros(layer.num_experts)
    boost[6] = 1.0
    with routing_bias(view, {layer.index: boost}):
        assert int((layer.route(hidden).index == 6).sum()) > chosen
    with pytest.raises(RuntimeError), routing_bias(view, {layer.index: boost}):
        raise RuntimeError("inside")
    assert torch.equal(layer.correction_bias, before)
    with pytest.raises(PlanError, match="entries"), routing_bias(view, {layer.index: torch.zeros(3)}):
        pass
    with pytest.raises(PlanError, match="no selection bias"), \
            routing_bias(MoEModelView.from_model(build_tiny_model("qwen3_moe")), {0: torch.zeros(8)}):
        pass


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_routing_override_masks_equal_removal_and_restore_on_every_family(family) -> None:
    """routing_override: a zero bias leaves the model's logits bit for bit; -inf on two experts in every layer gives
    the logits of the model with those experts removed (every kind whose masked routing equals removal); a boost
    makes an expert chosen more often; the original router is back after the context, also after an error."""
    import copy

    from moekit.edit import PlanError
    from moekit.edit.mask import EQUALS_REMOVAL, routing_override
    from moekit.edit.prune import prune_experts
    from moekit.tiny import build_tiny_model

    model = build_tiny_model(family).eval()
    view = MoEModelView.from_model(model)
    ids = random_ids()
    mask = {}
    for layer in view.layers:
        mask[layer.index] = torch.zeros(layer.num_experts)
        mask[layer.index][list(MASKED)] = float("-inf")
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with routing_override(view, {layer.index: torch.zeros(layer.num_experts) for layer in view.layers}):
            assert torch.equal(model(input_ids=ids).logits, reference)
        with routing_override(view, mask):
            masked = model(input_ids=ids).logits
            hidden = torch.randn(64, view.layers[0].router_weight.shape[-1], generator=torch.Generator().manual_seed(1))
        assert torch.equal(model(input_ids=ids).logits, reference)
        assert (masked - reference).abs().max() > 1e-3  # the mask changed the output
        if view.layers[0].routing.kind in EQUALS_REMOVAL:
            pruned = copy.deepcopy(model)
            pruned_view = MoEModelView.from_model(pruned)
            prune_experts(pruned_view, {layer.index: [e for e in range(layer.num_experts) if e not in MASKED]
                                        for layer in pruned_view.layers})
            torch.testing.assert_close(masked, pruned(input_ids=ids).logits, atol=2e-6, rtol=0)
        layer = view.layers[0]
        boost = torch.zeros(layer.num_experts)
        boost[6] = 4.0
        from moekit.arch.view import model_routing
        chosen = int((model_routing(layer, hidden)[0] == 6).sum())
        with routing_override(view, {layer.index: boost}):
            assert int((model_routing(layer, hidden)[0] == 6).sum()) > chosen
        with pytest.raises(RuntimeError), routing_override(view, {layer.index: boost}):
            raise RuntimeError("inside")
        assert int((model_routing(layer, hidden)[0] == 6).sum()) == chosen
        assert torch.equal(model(input_ids=ids).logits, reference)
    with pytest.raises(PlanError, match="entries"), routing_override(view, {layer.index: torch.zeros(3)}):
        pass
    with pytest.raises(PlanError, match="not an MoE layer"), routing_override(view, {99: boost}):
        pass
