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
