"""The command line, end to end: inspect, prune, and a clear error (and no output) for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from moekit.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_json_reports_structure_and_parameter_counts(tiny_checkpoint):
    result = run("inspect", tiny_checkpoint("qwen2_moe"), "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_type"] == "qwen2_moe" and data["num_experts"] == 8 and data["top_k"] == 2
    assert data["moe_layers"] == [0, 1, 2]
    per_expert = 3 * 64 * 32  # gate, up, down of one expert
    assert data["routed_expert_parameters"] == 3 * 8 * per_expert
    assert data["total_parameters"] - data["active_parameters"] == 3 * (8 - 2) * per_expert
    assert data["layers"][0]["shared_experts"] == ["model.layers.0.mlp.shared_expert",
                                                   "model.layers.0.mlp.shared_expert_gate"]


def test_inspect_verify_checks_routing_on_the_real_weights(tiny_checkpoint):
    result = run("inspect", tiny_checkpoint("gpt_oss"), "--verify", "--json", "-")
    assert result.exit_code == 0, result.output
    assert max(json.loads(result.stdout)["routing_max_gate_difference"].values()) < 1e-6


def test_inspect_table(tiny_checkpoint):
    result = run("inspect", tiny_checkpoint("deepseek_v3"))
    assert result.exit_code == 0, result.output
    assert "sigmoid_topk" in result.output and "shared_experts" in result.output


def test_prune_then_inspect(tiny_checkpoint, tmp_path):
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({str(i): [0, 3, 5, 6] for i in range(3)}))
    out = tmp_path / "pruned"
    result = run("prune", tiny_checkpoint("olmoe"), "--keep-json", keep, "--out", out)
    assert result.exit_code == 0, result.output
    assert "8 -> 4 experts" in " ".join(result.stdout.split())
    assert json.loads(run("inspect", out, "--json", "-").stdout)["num_experts"] == 4
    # an existing output is replaced only on request
    assert run("prune", tiny_checkpoint("olmoe"), "--keep-json", keep, "--out", out).exit_code == 2
    inside = run("prune", tiny_checkpoint("olmoe"), "--keep-json", out / "moekit_plan.json", "--out", out,
                 "--overwrite")  # replacing OUT would delete the input that lies inside it
    assert inside.exit_code == 2 and "contains the input" in inside.output
    again = run("prune", tiny_checkpoint("olmoe"), "--keep-json", keep, "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "pruned"]  # no temp dirs left


def test_tiny_model_command(tmp_path):
    result = run("tiny-model", "mixtral", "--out", tmp_path / "m", "--experts", "4")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_local_experts"] == 4
    bad = run("tiny-model", "bert", "--out", tmp_path / "b")
    assert bad.exit_code == 2 and "choose one of" in bad.output


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dense") / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(path)
    return path


KEEP_ALL_LAYERS = {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}


@pytest.mark.parametrize(("keep", "message"), [
    ({"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}, "does not cover MoE layer"),
    ({"0": [0, 1, 2, 3], "1": [0, 1, 2], "2": [0, 1, 2, 3]}, "same number of experts"),
    ({"0": [0], "1": [1], "2": [2]}, "keep at least 2"),
    ({"0": [0, 1, 2, 9], "1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}, "do not exist"),
    ({"0": [0, 1, 1, 3], "1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}, "more than once"),
    ({**KEEP_ALL_LAYERS, "7": [0, 1, 2, 3]}, "not MoE layers"),
    ({"first": [0, 1]}, "not an integer layer index"),
    ([0, 1, 2], "must be a JSON object"),
])
def test_bad_keep_files(keep, message, tiny_checkpoint, tmp_path):
    keep_file = tmp_path / "keep.json"
    keep_file.write_text(json.dumps(keep))
    result = run("prune", tiny_checkpoint("mixtral"), "--keep-json", keep_file, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def _prune_error(tmp_path: Path, model, out, keep_text: str | None = None, extra: tuple = ()) -> str:
    keep_file = tmp_path / "keep.json"
    keep_file.write_text(keep_text if keep_text is not None else json.dumps(KEEP_ALL_LAYERS))
    result = run("prune", model, "--keep-json", keep_file, "--out", out, *extra)
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def test_corrupted_json(tiny_checkpoint, tmp_path):
    message = _prune_error(tmp_path, tiny_checkpoint("mixtral"), tmp_path / "out", '{"0": [0, 1,')
    assert "not valid JSON" in message and not (tmp_path / "out").exists()


def test_missing_keep_file_and_missing_option(tiny_checkpoint, tmp_path):
    result = run("prune", tiny_checkpoint("mixtral"), "--keep-json", tmp_path / "nope.json", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = run("prune", tiny_checkpoint("mixtral"), "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--keep-json" in result.output
    assert not (tmp_path / "o").exists()


def test_unsupported_model_lists_supported_types(dense_checkpoint, tmp_path):
    message = _prune_error(tmp_path, dense_checkpoint, tmp_path / "out")
    assert "no MoE layers" in message and "qwen3_moe" in message and "mixtral" in message
    assert not (tmp_path / "out").exists()
    result = run("inspect", dense_checkpoint)
    assert result.exit_code == 2 and "supported model types" in result.output


def test_model_directory_that_does_not_hold_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _prune_error(tmp_path, tmp_path / "empty", tmp_path / "out")
    assert "no config.json" in message and not (tmp_path / "out").exists()


def test_output_equal_to_input_or_containing_it_is_refused(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    before = sorted(p.name for p in source.iterdir())
    assert "is the source model" in _prune_error(tmp_path, source, source, extra=("--overwrite",))
    assert "contains the source model" in _prune_error(tmp_path, source, source.parent, extra=("--overwrite",))
    assert sorted(p.name for p in source.iterdir()) == before


def test_existing_output_is_refused_and_left_alone(tiny_checkpoint, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert "already exists" in _prune_error(tmp_path, tiny_checkpoint("mixtral"), out)
    assert (out / "mine.txt").read_text() == "keep me"
