"""Upcycling: dense FFNs copied into experts (exact at step 0), an MoE's experts duplicated."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config
from typer.testing import CliRunner

from moekit.arch.view import MoEModelView
from moekit.cli import app
from moekit.tiny import build_tiny_model, byte_tokenizer
from moekit.upcycle import UpcycleError, duplicate_experts, probe_logits, upcycle_dense

runner = CliRunner()
SHAPE = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)


def _dense(config_class):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_class(**SHAPE)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("config_class", [LlamaConfig, MistralConfig, Qwen3Config])
@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (4, 1), (6, 6)])
def test_dense_upcycled_computes_the_dense_model(config_class, experts: int, top_k: int) -> None:
    dense = _dense(config_class)
    moe = upcycle_dense(dense, experts, top_k, seed=3)
    view = MoEModelView.from_model(moe)  # a stock MoE family moekit reads
    assert view.num_experts == experts and view.top_k == top_k
    with torch.no_grad():
        torch.testing.assert_close(moe(_ids()).logits, dense(_ids()).logits, rtol=1e-5, atol=1e-5)
        logits = view.layers[0].router_logits(torch.randn(16, 64))
    assert logits.std() > 0  # a real (random) router: the routing differs between tokens and experts
    experts_module = moe.model.layers[1].mlp.experts
    assert torch.equal(experts_module.down_proj[0], dense.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(experts_module.down_proj[experts - 1], experts_module.down_proj[0])


def test_dense_families_and_settings_it_cannot_convert_are_refused() -> None:
    with pytest.raises(UpcycleError, match="--top-k"):
        upcycle_dense(_dense(LlamaConfig), 4, 5)
    with pytest.raises(UpcycleError, match="SwiGLU"):
        upcycle_dense(AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE, hidden_act="gelu")), 4, 2)
    with pytest.raises(UpcycleError, match="no mapping"):
        upcycle_dense(build_tiny_model("qwen3_moe"), 4, 2)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_duplicating_experts_with_top_k_times_the_factor_is_exact(family: str) -> None:
    """All copies of a token's experts are selected and their weights add up to the original weight."""
    model = build_tiny_model(family)
    before = probe_logits(model)
    old = MoEModelView.from_model(model)
    experts, top_k = old.num_experts, old.top_k
    view = duplicate_experts(model, 2, top_k=2 * top_k)
    assert view.num_experts == 2 * experts and view.top_k == 2 * top_k
    torch.testing.assert_close(probe_logits(model), before, rtol=1e-5, atol=1e-5)
    layer = view.layers[0]
    w = layer.expert_weights(0), layer.expert_weights(1), layer.expert_weights(2)
    assert torch.equal(w[0].down, w[1].down) and not torch.equal(w[0].down, w[2].down)  # copies side by side
    reloaded = type(model)(model.config)  # the edited config builds the same shapes
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_duplicating_with_the_top_k_unchanged_is_not_exact_and_says_so(tmp_path) -> None:
    source = tmp_path / "moe"
    model = build_tiny_model("qwen3_moe")
    model.save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    result = runner.invoke(app, ["upcycle", str(source), "--factor", "2", "--out", str(tmp_path / "up")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "up" / "moekit_plan.json").read_text())
    assert record["experts"] == {"before": 8, "after": 16} and record["top_k"] == {"before": 2, "after": 2}
    assert record["step0_max_logit_difference"] > 1e-3  # a token now picks two copies of its top expert
    assert "not exact" in result.stderr
    exact = runner.invoke(app, ["upcycle", str(source), "--factor", "2", "--top-k", "4", "--out",
                                str(tmp_path / "up4")])
    assert exact.exit_code == 0, exact.output
    assert json.loads((tmp_path / "up4" / "moekit_plan.json").read_text())["step0_max_logit_difference"] < 1e-4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "up4")  # a stock checkpoint
    assert loaded.config.num_experts == 16 and loaded.config.num_experts_per_tok == 4


def test_cli_dense_upcycle_writes_a_stock_checkpoint(tmp_path) -> None:
    dense = _dense(LlamaConfig)
    dense.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    result = runner.invoke(app, ["upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2", "--out",
                                 str(tmp_path / "moe")])
    assert result.exit_code == 0, result.output
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(moe(_ids()).logits, dense(_ids()).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "moe" / "tokenizer.json").exists()
    wrong = runner.invoke(app, ["upcycle", str(tmp_path / "dense"), "--factor", "2", "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and "--experts" in wrong.stderr and not (tmp_path / "x").exists()
    mixed = runner.invoke(app, ["upcycle", str(tmp_path / "moe"), "--experts", "8", "--out", str(tmp_path / "y")])
    assert mixed.exit_code == 2 and "--factor" in mixed.stderr and not (tmp_path / "y").exists()


def test_tiny_dense_models_to_try_upcycle_and_moefy_on(tmp_path) -> None:
    result = runner.invoke(app, ["tiny-model", "llama", "--out", str(tmp_path / "dense")])
    assert result.exit_code == 0 and "dense" in result.stdout, result.output
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["max_position_embeddings"] >= 8192  # 8-shot prompts fit
    up = runner.invoke(app, ["upcycle", str(tmp_path / "dense"), "--experts", "4", "--out", str(tmp_path / "moe")])
    assert up.exit_code == 0, up.output
    assert json.loads((tmp_path / "moe" / "moekit_plan.json").read_text())["step0_max_logit_difference"] < 1e-4


def test_expert_divergence_starts_at_copies_and_grows_with_training() -> None:
    """Upcycled experts are copies (pairwise weight cosine 1); recovery training that updates every weight makes
    them diverge, and the record's curve shows it. The cosine is checked against a direct computation on the
    stored stacked tensors."""
    from moekit.data import CalibrationSet
    from moekit.recover import RecoverySettings, recover_training
    from moekit.score.similarity import expert_divergence, expert_weight_cosine

    moe = upcycle_dense(_dense(LlamaConfig), 4, 2, seed=3)
    view = MoEModelView.from_model(moe)
    assert expert_divergence(view)["max_pairwise_cosine"] == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(5)
    with torch.no_grad():  # make expert 1 of layer 0 differ, and check the cosine against the raw tensors
        experts = moe.model.layers[0].mlp.experts
        experts.down_proj[1].add_(torch.randn_like(experts.down_proj[1]))
    flat = [torch.cat([experts.gate_up_proj[e].detach().reshape(-1), experts.down_proj[e].detach().reshape(-1)])
            for e in (0, 1)]
    direct = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)
    assert float(expert_weight_cosine(view.layers[0])[0, 1]) == pytest.approx(float(direct), rel=1e-5)
    assert float(direct) < 0.99
    fresh = upcycle_dense(_dense(LlamaConfig), 4, 2, seed=3)
    ids = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    record = recover_training(fresh, [CalibrationSet("t", ids, torch.ones_like(ids))],
                              RecoverySettings(steps=6, batch_size=4, lr=1e-2, train="all", log_every=2),
                              progress=False)
    curve = record["expert_divergence"]["curve"]
    assert curve[0]["step"] == 0 and curve[0]["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert curve[-1]["step"] == 6 and curve[-1]["mean_pairwise_cosine"] < curve[0]["mean_pairwise_cosine"] - 1e-4


# --- Drop-Upcycling: partial re-initialisation ------------------------------------------------------------


def test_reinit_ratio_redraws_that_share_of_each_experts_neurons_and_keeps_the_rest() -> None:
    """Every expert re-draws round(r * I) neurons of its own -- the same neurons in the gate rows, up rows and
    down columns -- from the statistics of the weights they replace; every other weight stays the dense FFN's."""
    dense = _dense(LlamaConfig)
    inter = SHAPE["intermediate_size"]
    moe = upcycle_dense(dense, 4, 2, seed=3, reinit_ratio=0.5)
    plain = upcycle_dense(_dense(LlamaConfig), 4, 2, seed=3)
    chosen_sets = []
    for index, layer in enumerate(moe.model.layers):
        mlp = dense.model.layers[index].mlp
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        experts = layer.mlp.experts
        assert torch.equal(layer.mlp.gate.weight, plain.model.layers[index].mlp.gate.weight)  # routers as before
        for e in range(4):
            new_gate, new_up = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
            new_down = experts.down_proj[e]
            changed = [(new_gate[i] != gate[i]).all() for i in range(inter)]
            same = [torch.equal(new_gate[i], gate[i]) for i in range(inter)]
            assert all(c or s for c, s in zip(changed, same, strict=True))  # a neuron is redrawn whole or kept whole
            rows = torch.tensor([i for i in range(inter) if changed[i]])
            assert rows.numel() == inter // 2
            kept = torch.tensor([i for i in range(inter) if same[i]])
            for new, old in ((new_up, up), (new_down.T, down.T)):  # the same neurons in up and down
                assert torch.equal(new[kept], old[kept]) and (new[rows] != old[rows]).all()
            for new, old in ((new_gate, gate), (new_up, up), (new_down.T, down.T)):
                drawn, replaced = new[rows].detach(), old[rows].detach()
                assert abs(drawn.mean() - replaced.mean()) < 0.2 * replaced.std()
                assert drawn.std() == pytest.approx(float(replaced.std()), rel=0.1)
            chosen_sets.append(tuple(rows.tolist()))
    assert len(set(chosen_sets)) == len(chosen_sets)  # each expert chose its own neurons
    view = MoEModelView.from_model(moe)
    from moekit.score.similarity import expert_divergence

    # two experts share the dense weights only on the neurons neither redrew, (1 - r)^2 of them in expectation;
    # redrawn weights are independent with mean ~0, so the pairwise cosine is about (1 - 0.5)^2 = 0.25 (copies: 1)
    cosine = expert_divergence(view)["mean_pairwise_cosine"]
    assert cosine == pytest.approx(0.25, abs=0.08)
    again = upcycle_dense(_dense(LlamaConfig), 4, 2, seed=3, reinit_ratio=0.5)
    assert torch.equal(again.model.layers[1].mlp.experts.down_proj, moe.model.layers[1].mlp.experts.down_proj)


def test_reinit_ratio_cli_records_it_and_refuses_bad_values(tmp_path) -> None:
    dense = _dense(LlamaConfig)
    dense.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    result = runner.invoke(app, ["upcycle", str(tmp_path / "dense"), "--experts", "4", "--reinit-ratio", "0.25",
                                 "--out", str(tmp_path / "moe")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "moe" / "moekit_plan.json").read_text())
    assert record["reinit_ratio"] == 0.25 and record["reinit"]["neurons_per_expert"] == 24
    assert record["step0_max_logit_difference"] > 1e-3 and "not exact at step 0" in result.output
    for bad in ("1.5", "-0.1"):
        out = runner.invoke(app, ["upcycle", str(tmp_path / "dense"), "--experts", "4", "--reinit-ratio", bad,
                                  "--out", str(tmp_path / "bad")])
        assert out.exit_code == 2 and "--reinit-ratio" in out.stderr and not (tmp_path / "bad").exists()
    moe_dup = runner.invoke(app, ["upcycle", str(tmp_path / "moe"), "--factor", "2", "--reinit-ratio", "0.5",
                                  "--out", str(tmp_path / "dup")])
    assert moe_dup.exit_code == 2 and "Drop-Upcycling" in moe_dup.stderr and not (tmp_path / "dup").exists()


# --- utility-based (non-uniform) duplication ---------------------------------------------------------------

def test_utility_copies_give_one_copy_each_and_the_rest_by_utility() -> None:
    from moekit.upcycle import utility_copies

    # 4 experts -> 8: four extra copies, shares 3 : 1 : 0 : 0 of the utility
    assert utility_copies(torch.tensor([3.0, 1.0, 0.0, 0.0]), 8) == [4, 2, 1, 1]
    # equal utilities, 2 extra copies for 3 experts: the largest remainders tie, the lower indices win
    assert utility_copies(torch.tensor([1.0, 1.0, 1.0]), 5) == [2, 2, 1]
    # shares 0.5 * 6 = 3.0, 0.3 * 6 = 1.8, 0.2 * 6 = 1.2 -> floors 3, 1, 1 and the last copy to remainder 0.8
    assert utility_copies(torch.tensor([0.5, 0.3, 0.2]), 9) == [4, 3, 2]
    assert utility_copies(torch.zeros(2), 4) == [2, 2]  # nothing measured: uniform
    with pytest.raises(UpcycleError, match="cannot grow"):
        utility_copies(torch.ones(4), 3)


def _loss_slope_along_expert(model, ids, layer_index: int, expert: int) -> float:
    """dL/dalpha at alpha = 1, where every weight of one expert is multiplied by alpha (autograd through a
    functional call on scaled copies of the weights; float64 cross-entropy of the next token)."""
    from torch.func import functional_call

    alpha = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    prefix = f"model.layers.{layer_index}.mlp.experts."
    experts = model.model.layers[layer_index].mlp.experts
    scaled = {}
    for name, param in experts.named_parameters():
        pick = torch.zeros(param.shape[0], *([1] * (param.dim() - 1)), dtype=torch.float64)
        pick[expert] = 1.0
        scaled[prefix + name] = param.detach() * (1 + (alpha - 1) * pick)
    logits = functional_call(model, scaled, kwargs={"input_ids": ids}).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (slope,) = torch.autograd.grad(loss, alpha)
    return float(slope)


def test_expert_utility_is_the_squared_derivative_of_the_loss_along_each_expert() -> None:
    """sum_w w * dL/dw over an expert's weights is dL/dalpha at alpha = 1 when the expert's weights are scaled by
    alpha; the reference differentiates the loss along that one direction (float64), one batch, so utility is its
    square; a finite difference agrees with the reference to ~1%."""
    from moekit.data import CalibrationSet
    from moekit.upcycle import expert_utility

    model = build_tiny_model("qwen3_moe", num_experts=4, top_k=2).double()
    model.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    utility = expert_utility(model, [CalibrationSet("text", ids, torch.ones_like(ids))], batch_size=2)
    view = MoEModelView.from_model(model)
    assert sorted(utility) == [layer.index for layer in view.layers]
    for layer in view.layers:
        expected = torch.tensor([_loss_slope_along_expert(model, ids, layer.index, e) ** 2 for e in range(4)],
                                dtype=torch.float64)
        torch.testing.assert_close(utility[layer.index], expected, rtol=1e-3, atol=0)
        assert len(set(expected.tolist())) == 4  # the experts differ: a mix-up of experts would show
    assert all(p.requires_grad for p in model.parameters())  # flags restored (from_config: all trainable)
    # the reference itself against a central difference of the loss (a different computation)
    with torch.no_grad():
        experts = model.model.layers[view.layers[0].index].mlp.experts
        losses = []
        for alpha in (1.01, 0.99):
            for param in experts.parameters():
                param[0] *= alpha
            logits = model(input_ids=ids).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())))
            for param in experts.parameters():
                param[0] /= alpha
    slope = _loss_slope_along_expert(model, ids, view.layers[0].index, 0)
    assert abs((losses[0] - losses[1]) / 0.02 - slope) <= 0.02 * abs(slope)


def test_duplicating_by_copies_puts_each_experts_copies_next_to_each_other() -> None:
    model = build_tiny_model("qwen3_moe", num_experts=4, top_k=2)
    first = MoEModelView.from_model(model).layers[0]
    originals = [first.expert_weights(j).down.clone() for j in range(4)]
    rows = first.router_weight.detach().clone()
    layers = [layer.index for layer in MoEModelView.from_model(model).layers]
    copies = {index: [3, 1, 2, 2] for index in layers}
    view = duplicate_experts(model, 2, copies=copies)
    assert view.num_experts == 8 and model.config.num_experts == 8 and view.top_k == 2
    expected = [0, 0, 0, 1, 2, 2, 3, 3]
    layer = view.layers[0]
    for slot, source in enumerate(expected):
        assert torch.equal(layer.expert_weights(slot).down, originals[source])
        assert torch.equal(layer.router_weight[slot], rows[source])
    with pytest.raises(UpcycleError, match="at least one copy"):
        duplicate_experts(build_tiny_model("qwen3_moe", num_experts=4), 2, copies={i: [5, 1, 1, 0] for i in layers})


def test_upcycle_cli_duplicates_by_utility_and_records_it(tmp_path) -> None:
    source = tmp_path / "moe"
    model = build_tiny_model("qwen3_moe", num_experts=4, top_k=2)
    model.save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    text = tmp_path / "code.jsonl"
    text.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1\n"}) + "\n"
                            for i in range(40)))
    result = runner.invoke(app, ["upcycle", str(source), "--factor", "2", "--utility-data", f"code={text}",
                                 "--utility-tokens", "512", "--seq-len", "64", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "moekit_plan.json").read_text())
    details = record["duplication_details"]
    assert record["duplication"] == "utility" and record["experts"] == {"before": 4, "after": 8}
    assert 0 < details["data"]["code"] <= 512
    for index, counts in details["copies"].items():
        assert sum(counts) == 8 and min(counts) >= 1
        utility = details["utility"][index]
        # the most useful expert gets at least as many copies as the least useful one
        assert counts[utility.index(max(utility))] >= counts[utility.index(min(utility))]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_experts == 8
    assert "not exact at step 0" in result.output


def test_utility_duplication_refuses_bad_inputs_before_writing(tmp_path) -> None:
    dense = tmp_path / "dense"
    _dense(LlamaConfig).save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    result = runner.invoke(app, ["upcycle", str(dense), "--experts", "4", "--utility-data", f"t={text}",
                                 "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--factor" in result.output and not (tmp_path / "a").exists()
    moe = tmp_path / "moe"
    build_tiny_model("qwen3_moe", num_experts=4).save_pretrained(moe)
    byte_tokenizer().save_pretrained(moe)
    result = runner.invoke(app, ["upcycle", str(moe), "--factor", "2", "--utility-data",
                                 f"t={tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "missing.jsonl" in result.output and not (tmp_path / "b").exists()


def test_copies_read_cosine_one_to_double_precision() -> None:
    """Exact copies have weight cosine 1 up to float64 round-off (float32 sums left ~1e-7 .. 2e-4 of it)."""
    from moekit.score.similarity import expert_weight_cosine

    model = build_tiny_model("qwen3_moe", num_experts=2, top_k=1)
    view = duplicate_experts(model, 2)
    cosine = expert_weight_cosine(view.layers[0])
    assert cosine.dtype == torch.float64
    assert abs(float(cosine[0, 1]) - 1.0) < 1e-12 and abs(float(cosine[2, 3]) - 1.0) < 1e-12
    assert float(cosine[0, 2]) < 0.999  # different experts are not
