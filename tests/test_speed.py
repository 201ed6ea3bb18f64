"""moekit.eval.speed: parameter bytes, checkpoint size, speed and errors, on tiny models (CPU, offline).

No timing thresholds are asserted: speeds only have to be positive, finite numbers.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from moekit.arch.view import MoEModelView
from moekit.edit import prune_to_checkpoint
from moekit.eval.errors import EvalError
from moekit.eval.speed import build_prompt_ids, checkpoint_bytes, format_speed_table, measure_footprint_and_speed
from moekit.model_io import load_model
from moekit.summary import summarize
from moekit.tiny import TINY_CONTEXT, save_tiny_model

KEEP = {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
SMALL = dict(batch_size=2, prompt_tokens=12, new_tokens=3, repeats=2, rounds=2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speed")
    original = save_tiny_model("qwen3_moe", root / "original")
    pruned = prune_to_checkpoint(original, KEEP, root / "pruned").out
    return {"original": original, "pruned": pruned}


@pytest.fixture(scope="module")
def result(pair: dict[str, Path]) -> dict[str, Any]:
    return measure_footprint_and_speed(pair, **SMALL)


def direct_bytes(path: Path) -> dict[str, int]:
    """The byte counts computed here, independently: numel x element_size over the loaded parameters."""
    model = load_model(path)
    view = MoEModelView.from_model(model)
    summary = summarize(view)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    routed = sum(p.numel() * p.element_size() for layer in view.layers for p in layer.experts.parameters())
    size = {p.element_size() for p in model.parameters()}
    assert size == {4}  # tiny models are float32: the summary's parameter counts times 4 are bytes
    return {"total_bytes": total, "routed_expert_bytes": routed, "non_expert_bytes": total - routed,
            "active_bytes": summary.active_parameters * 4, "summary_total": summary.total_parameters * 4,
            "summary_routed": summary.routed_expert_parameters * 4}


def test_parameter_bytes_equal_a_direct_computation(pair, result):
    for name, path in pair.items():
        entry = result["models"][name]
        direct = direct_bytes(path)
        for key in ("total_bytes", "routed_expert_bytes", "non_expert_bytes", "active_bytes"):
            assert entry[key] == direct[key], (name, key)
        assert entry["total_bytes"] == direct["summary_total"]
        assert entry["routed_expert_bytes"] == direct["summary_routed"]
        assert entry["shared_expert_bytes"] == 0  # qwen3_moe has no shared experts
        assert entry["dtype"] == "float32"


def test_pruned_model_is_smaller_with_the_summary_active_rule(result):
    original, pruned = result["models"]["original"], result["models"]["pruned"]
    assert pruned["num_experts"] == 4 and original["num_experts"] == 8
    assert pruned["total_bytes"] < original["total_bytes"]
    assert pruned["routed_expert_bytes"] * 2 == original["routed_expert_bytes"]
    assert pruned["checkpoint_bytes"] < original["checkpoint_bytes"]
    # Same top-k: the routed bytes a token uses stay the same; only the routers shrink.
    for entry in (original, pruned):
        routed_active = entry["routed_expert_bytes"] * entry["top_k"] // entry["num_experts"]
        assert entry["active_bytes"] == entry["non_expert_bytes"] + routed_active
        assert entry["active_bytes"] == entry["active_parameters"] * 4
    assert pruned["ratios"]["routed_expert_bytes"] == pytest.approx(0.5)
    assert pruned["ratios"]["total_bytes"] == pytest.approx(pruned["total_bytes"] / original["total_bytes"])


def test_checkpoint_size_is_the_sum_of_weight_files(pair, result):
    for name, path in pair.items():
        files = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")))
        assert files
        assert result["models"][name]["checkpoint_bytes"] == sum(f.stat().st_size for f in files)
        assert result["models"][name]["checkpoint_files"] == [f.name for f in files]
        assert checkpoint_bytes(path)[0] == sum(f.stat().st_size for f in files)


def test_checkpoint_size_counts_one_format(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 10)
    assert checkpoint_bytes(tmp_path) == (10, ["pytorch_model.bin"])
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 3)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 4)
    assert checkpoint_bytes(tmp_path) == (7, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    assert checkpoint_bytes(tmp_path / "missing") == (0, [])


def test_speeds_are_positive_and_the_result_is_json(result):
    assert json.loads(json.dumps(result)) == result
    assert result["device"] == "cpu" and result["device_name"]
    assert result["torch"] and result["transformers"]
    assert result["reference"] == "original"
    assert "CUDA only" in result["peak_memory_note"]
    for entry in result["models"].values():
        assert entry["peak_memory_bytes"] is None and entry["weights_memory_bytes"] is None
        # two rounds of two timed runs each, pooled
        assert len(entry["prefill_seconds"]) == 4 == len(entry["decode_seconds"])
        assert entry["prefill_seconds_median"] == pytest.approx(statistics.median(entry["prefill_seconds"]))
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            assert entry[key] > 0 and math.isfinite(entry[key])
        assert entry["decode_tokens_per_s"] == pytest.approx(
            SMALL["batch_size"] * SMALL["new_tokens"] / entry["decode_seconds_median"])
        assert entry["prefill_tokens_per_s"] == pytest.approx(
            SMALL["batch_size"] * SMALL["prompt_tokens"] / entry["prefill_seconds_median"])
    assert all(v in (1.0, None) for v in result["models"]["original"]["ratios"].values())


def test_rounds_alternate_the_order_and_are_said(result, pair):
    assert result["order"] == [["original", "pruned"], ["pruned", "original"]]
    assert "order reversed every other round (original pruned; pruned original)" in format_speed_table(result)
    once = measure_footprint_and_speed(pair, **{**SMALL, "rounds": 1})
    assert once["order"] == [["original", "pruned"]]
    assert all(len(m["prefill_seconds"]) == 2 for m in once["models"].values())
    assert "use more than one round" in format_speed_table(once)
    with pytest.raises(EvalError, match="rounds must be a whole number of at least 1"):
        measure_footprint_and_speed(pair, **{**SMALL, "rounds": 0})


def test_table_lists_every_model_with_ratios(result):
    table = format_speed_table(result)
    assert "| original | 8 (top-2) |" in table
    assert "| pruned | 4 (top-2) |" in table
    assert "(0.50x)" in table  # routed experts halved
    assert "CUDA only" in table


def test_prompts_are_deterministic_and_shared(pair):
    tokenizer = AutoTokenizer.from_pretrained(str(pair["original"]))
    a = build_prompt_ids(272, tokenizer, None, batch_size=3, prompt_tokens=20, seed=5)
    b = build_prompt_ids(272, tokenizer, None, batch_size=3, prompt_tokens=20, seed=5)
    assert a.shape == (3, 20) and a.equal(b)
    assert not set(a.flatten().tolist()) & set(tokenizer.all_special_ids)
    texts = build_prompt_ids(272, tokenizer, ["ab", "xyz"], batch_size=3, prompt_tokens=5)
    assert texts.shape == (3, 5)
    assert tokenizer.decode(texts[0]) == "ababa" and tokenizer.decode(texts[1]) == "xyzxy"
    assert tokenizer.decode(texts[2]) == "ababa"


def test_text_prompts_run(pair):
    out = measure_footprint_and_speed(pair, ["def f(x):\n    return x"], batch_size=1, prompt_tokens=8,
                                      new_tokens=2, repeats=1)
    assert "text(s)" in out["settings"]["prompts"]
    assert all(m["decode_tokens_per_s"] > 0 for m in out["models"].values())


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(batch_size=0), "batch_size must be a whole number of at least 1"),
    (dict(new_tokens=0), "new_tokens must be"),
    (dict(repeats=0), "repeats must be"),
    (dict(warmup=-1), "warmup must be"),
    (dict(batch_size=1.5), "batch_size must be a whole number"),
    (dict(prompt_tokens=TINY_CONTEXT - 5, new_tokens=10), "max_position_embeddings"),
    (dict(prompts="one string"), "not one string"),
    (dict(prompts=[]), "prompts is empty"),
])
def test_bad_settings_raise(pair, kwargs, message):
    with pytest.raises(EvalError, match=message):
        measure_footprint_and_speed(pair, **{**SMALL, **kwargs})


def test_no_models_raise():
    with pytest.raises(EvalError, match="no models"):
        measure_footprint_and_speed({})


def test_missing_directory_raises(pair, tmp_path):
    with pytest.raises(EvalError, match=r"model 'gone': directory .* does not exist"):
        measure_footprint_and_speed({"original": pair["original"], "gone": tmp_path / "nope"}, **SMALL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match=r"no config\.json"):
        measure_footprint_and_speed({"empty": tmp_path / "empty"}, **SMALL)


def test_different_vocabularies_raise(pair, tmp_path):
    other = save_tiny_model("qwen3_moe", tmp_path / "bigger-vocab", vocab_size=300)
    with pytest.raises(EvalError, match=r"tokenizer mismatch.*vocab_size 272 vs 300"):
        measure_footprint_and_speed({"original": pair["original"], "other": other}, **SMALL)

    retok = tmp_path / "retokenised"
    shutil.copytree(pair["original"], retok)
    tokenizer = AutoTokenizer.from_pretrained(str(retok))
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(retok)
    with pytest.raises(EvalError, match="tokenizer mismatch: the tokenizers of models 'original' and 'retok'"):
        measure_footprint_and_speed({"original": pair["original"], "retok": retok}, **SMALL)


def test_differences_inside_the_spread_of_the_runs_are_said_to_be_noise() -> None:
    from moekit.eval.speed import within_noise

    reference = {"prefill_seconds": [1.1, 1.3, 1.2], "decode_seconds": [2.0, 2.1]}
    overlapping = {"prefill_seconds": [1.0, 1.15], "decode_seconds": [1.0, 1.2]}
    assert within_noise(overlapping, reference) == {"prefill": True, "decode": False}
    assert within_noise({"prefill_seconds": [], "decode_seconds": [3.0]}, reference) == {"prefill": None,
                                                                                          "decode": False}


def test_report_shows_a_speed_result_as_a_short_table_and_a_figure(result, tmp_path):
    """A ``moekit speed`` result in a report: seven chosen columns with ratios (not its ~30 raw fields), and a
    figure of the ratios."""
    from moekit.report.build import build_report

    md, _ = build_report(tmp_path / "rep", speed=result)
    text = md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert header == ("| model | experts | weights | routed experts | active / token | checkpoint | prefill tok/s | "
                      "decode tok/s |")  # no peak GPU memory column on CPU, no raw fields
    pruned_row = next(line for line in text.splitlines() if line.startswith("| pruned |"))
    assert "(0.50x)" in pruned_row  # routed experts halved
    assert "2 round(s), the order reversed" in text
    figure = tmp_path / "rep" / "figures" / "speed.png"
    assert figure.stat().st_size > 5000
