"""recover: short training of an MoE (routers only or all weights), with or without a teacher."""

from __future__ import annotations

import json

import pytest
import torch
from test_moefy import dense_llama
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moekit.cli import app
from moekit.data import CalibrationSet
from moekit.moefy import moefy_model
from moekit.recover import RecoveryError, RecoverySettings, _lr_scale, recover_training, token_losses
from moekit.tiny import byte_tokenizer

runner = CliRunner()


def sharp_dense():
    """A tiny dense Llama whose next-token distributions are far from uniform (so KL has room to fall)."""
    dense = dense_llama()
    with torch.no_grad():
        dense.lm_head.weight.mul_(40)
    return dense


def token_set(rows: int = 16, length: int = 24, seed: int = 1) -> CalibrationSet:
    ids = torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet("text", ids, torch.ones_like(ids))


def test_kl_matches_its_definition_and_ignores_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    labels = torch.randint(11, (2, 5), generator=gen)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1)[mask.bool()].mean()
    torch.testing.assert_close(token_losses(student, labels, mask, teacher), expected)
    assert float(token_losses(teacher, labels, mask, teacher)) == pytest.approx(0.0, abs=1e-6)
    changed = student.clone()
    changed[1, 4] += 100  # a padded position: must not move the loss
    torch.testing.assert_close(token_losses(changed, labels, mask, teacher), expected)
    ce = torch.nn.functional.cross_entropy(student[mask.bool()], labels[mask.bool()])
    torch.testing.assert_close(token_losses(student, labels, mask, None), ce)


def test_router_only_training_moves_only_the_routers_and_lowers_the_kl() -> None:
    dense = sharp_dense()
    moe, _ = moefy_model(dense, experts=6, top_k=2)
    before = {name: p.detach().clone() for name, p in moe.named_parameters()}
    record = recover_training(moe, [token_set()], RecoverySettings(train="router", steps=40, batch_size=8, lr=0.05,
                                                                   warmup=2, log_every=1), teacher=dense,
                              progress=False)
    changed = {name for name, p in moe.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert record["trained_parameters"] == 2 * 6 * 64
    losses = [h["loss"] for h in record["loss_curve"]]
    assert min(losses[-5:]) < 0.9 * losses[0], losses
    assert all(p.requires_grad for p in moe.parameters())  # left trainable for whoever uses the model next


def test_all_weights_training_fits_the_language_modelling_loss() -> None:
    dense = dense_llama()
    moe, _ = moefy_model(dense, experts=4, top_k=2)
    data = token_set(rows=4)
    record = recover_training(moe, [data], RecoverySettings(train="all", steps=30, batch_size=4, lr=3e-3, warmup=1,
                                                            log_every=1), progress=False)
    losses = [h["loss"] for h in record["loss_curve"]]
    assert record["objective"] == "next-token cross-entropy"
    assert losses[-1] < 0.7 * losses[0]
    assert record["tokens_seen"] == 30 * 4 * 23
    assert record["trained_parameters"] == record["total_parameters"]


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    settings = RecoverySettings(steps=100, warmup=10)
    assert _lr_scale(0, settings) == pytest.approx(0.1)
    assert _lr_scale(9, settings) == pytest.approx(1.0)
    assert _lr_scale(10, settings) == pytest.approx(1.0)
    assert _lr_scale(100, settings) == pytest.approx(0.1)
    assert _lr_scale(40, settings) > _lr_scale(60, settings)


def test_bad_settings_are_refused() -> None:
    moe, _ = moefy_model(dense_llama(), experts=4, top_k=2)
    with pytest.raises(RecoveryError, match="--train"):
        recover_training(moe, [token_set()], RecoverySettings(train="experts"), progress=False)  # type: ignore
    with pytest.raises(RecoveryError, match="steps"):
        recover_training(moe, [token_set()], RecoverySettings(steps=0), progress=False)
    other = dense_llama(vocab_size=300)
    with pytest.raises(RecoveryError, match="vocabulary"):
        recover_training(moe, [token_set()], RecoverySettings(steps=1), teacher=other, progress=False)


@pytest.fixture()
def dense_and_moe(tmp_path):
    dense = sharp_dense()
    dense.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    result = runner.invoke(app, ["moefy", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2",
                                 "--out", str(tmp_path / "moe")])
    assert result.exit_code == 0, result.output
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    return tmp_path, text


def test_cli_recovers_and_keeps_the_moefy_record(dense_and_moe) -> None:
    tmp_path, text = dense_and_moe
    result = runner.invoke(app, ["recover", str(tmp_path / "moe"), "--teacher", str(tmp_path / "dense"), "--data",
                                 f"prose={text}", "--steps", "6", "--batch-size", "2", "--seq-len", "64",
                                 "--train", "router", "--out", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "rec" / "moekit_plan.json").read_text())
    assert record["format"] == "moekit.recover/1"
    assert record["settings"]["train"] == "router" and record["settings"]["steps"] == 6
    assert record["previous"]["format"] == "moekit.moefy/1" and len(record["previous"]["partitions"]) == 2
    assert record["sets"][0]["name"] == "prose" and record["sets"][0]["tokens"] > 0
    assert (tmp_path / "rec" / "recovery_loss.png").stat().st_size > 1000
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rec")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert not torch.equal(reloaded.model.layers[0].mlp.gate.weight, original.model.layers[0].mlp.gate.weight)
    torch.testing.assert_close(reloaded.model.layers[0].mlp.experts.down_proj,
                               original.model.layers[0].mlp.experts.down_proj, rtol=0, atol=0)


def test_cli_refuses_bad_inputs_before_training(dense_and_moe) -> None:
    tmp_path, text = dense_and_moe
    base = ["--data", f"prose={text}", "--steps", "1", "--seq-len", "32"]
    result = runner.invoke(app, ["recover", str(tmp_path / "dense"), *base, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "MoE" in result.output
    result = runner.invoke(app, ["recover", str(tmp_path / "moe"), *base, "--out", str(tmp_path / "moe")])
    assert result.exit_code == 2 and "is the source model" in result.output
    result = runner.invoke(app, ["recover", str(tmp_path / "moe"), *base, "--out", str(tmp_path / "dense")])
    assert result.exit_code == 2 and "exists" in result.output
    result = runner.invoke(app, ["recover", str(tmp_path / "moe"), *base, "--train", "experts",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--train" in result.output
    other = dense_llama(vocab_size=300)
    other.save_pretrained(tmp_path / "other")
    result = runner.invoke(app, ["recover", str(tmp_path / "moe"), *base, "--teacher", str(tmp_path / "other"),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "vocabulary" in result.output
    assert not (tmp_path / "x").exists()


def test_cards_show_paths_relative_to_the_output_not_this_machines_folders(dense_and_moe) -> None:
    """moefy's, upcycle's and recover's cards name their sources relative to the output (``../dense``); a card
    is published with the model and must not carry the absolute folders of the machine that wrote it."""
    tmp_path, text = dense_and_moe
    assert runner.invoke(app, ["upcycle", str(tmp_path / "dense"), "--experts", "2", "--out",
                               str(tmp_path / "up")]).exit_code == 0
    assert runner.invoke(app, ["recover", str(tmp_path / "moe"), "--teacher", str(tmp_path / "dense"), "--data",
                               f"prose={text}", "--steps", "1", "--batch-size", "2", "--seq-len", "32",
                               "--out", str(tmp_path / "rec")]).exit_code == 0
    for out, source in (("moe", "../dense"), ("up", "../dense"), ("rec", "../moe")):
        card = (tmp_path / out / "README.md").read_text()
        assert str(tmp_path) not in card, out
        assert f"`{source}`" in card, (out, card)


def test_balance_loss_is_the_switch_loss_of_every_layer_with_padding_left_out() -> None:
    """E * sum_j f_j P_j per layer, averaged over layers: a layer sending every token to experts 0 and 1 scores
    E * (0.5 P_0 + 0.5 P_1); a uniform router scores 1; a padded token does not count."""
    from moekit.arch.view import MoEModelView
    from moekit.recover import per_layer_balance_loss
    from moekit.tiny import build_tiny_model

    view = MoEModelView.from_model(build_tiny_model("qwen3_moe", num_experts=8, top_k=2))
    skewed = torch.zeros(4, 8)
    skewed[:, 0], skewed[:, 1] = 10.0, 9.0
    p = torch.softmax(skewed[0], dim=0)
    expected_skewed = 8 * (0.5 * float(p[0]) + 0.5 * float(p[1]))
    uniform = torch.zeros(8, 8)  # every expert equally likely: P_j = 1/8 whichever the router picks on ties
    layers = len(view.layers)
    loss = per_layer_balance_loss([skewed] + [torch.zeros(4, 8)] * (layers - 1), view)
    assert float(loss) == pytest.approx((expected_skewed + (layers - 1) * 1.0) / layers, rel=1e-5)
    assert float(per_layer_balance_loss([uniform] * layers, view)) == pytest.approx(1.0, rel=1e-6)
    padded = torch.cat([skewed, torch.full((1, 8), -5.0).index_fill_(1, torch.tensor([6, 7]), 20.0)])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert float(per_layer_balance_loss([padded] * layers, view, mask)) == pytest.approx(expected_skewed, rel=1e-5)
    with pytest.raises(RecoveryError, match="router logits for 1 layers"):
        per_layer_balance_loss([skewed], view)
