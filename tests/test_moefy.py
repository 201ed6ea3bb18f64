"""moefy: a dense Llama turned into a stock Mixtral MoE."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from moekit.cli import app
from moekit.moefy import MoefyError, moefy_model, partition_neurons
from moekit.tiny import byte_tokenizer

runner = CliRunner()


def dense_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    fields = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
    config = LlamaConfig(**{**fields, **overrides})
    return LlamaForCausalLM(config).eval()


def test_all_experts_active_reproduces_the_dense_model() -> None:
    dense = dense_llama()
    moe, _ = moefy_model(dense, experts=6, top_k=6, router="zero")
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        fewer, _ = moefy_model(dense, experts=6, top_k=2)
        assert (fewer(ids).logits - dense(ids).logits).abs().max() > 1e-3  # top-2 of 6 is a real change


def test_partition_is_balanced_and_covers_every_neuron_once() -> None:
    dense = dense_llama()
    mlp = dense.model.layers[0].mlp
    groups = partition_neurons(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, experts=8)
    assert [len(g) for g in groups] == [12] * 8
    assert sorted(n for g in groups for n in g) == list(range(96))
    again = partition_neurons(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, experts=8)
    assert groups == again


def test_checkpoint_reloads_with_stock_transformers(tmp_path) -> None:
    dense = dense_llama()
    dense.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    result = runner.invoke(app, ["moefy", str(tmp_path / "dense"), "--experts", "4", "--top-k", "4", "--router",
                                 "zero", "--out", str(tmp_path / "moe")])
    assert result.exit_code == 0, result.output
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 4
    ids = torch.randint(3, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "moe" / "tokenizer.json").is_file()


@pytest.mark.parametrize(("experts", "top_k", "message"), [(5, 2, "divide the FFN size 96"), (4, 5, "--top-k 5"),
                                                          (1, 1, "at least 2")])
def test_bad_settings(experts: int, top_k: int, message: str) -> None:
    with pytest.raises(MoefyError, match=message):
        moefy_model(dense_llama(), experts, top_k)


def test_model_type_without_mapping_and_cli_errors(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    result = runner.invoke(app, ["moefy", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no mapping" in result.stderr
    assert not (tmp_path / "out").exists()
