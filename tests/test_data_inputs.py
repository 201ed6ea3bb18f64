"""Inputs that used to be accepted silently: a model directory without a tokenizer, and calibration
sets loaded with memory that followed the corpus size instead of the token budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moekit.data import DataError

NO_FILES = r"has no tokenizer files .*; pass --tokenizer DIR"


def without_tokenizer(model_dir: Path, out: Path) -> Path:
    """A copy of a saved model with every tokenizer file removed."""
    shutil.copytree(model_dir, out)
    for path in out.iterdir():
        if "token" in path.name or path.name in ("vocab.json", "merges.txt"):
            path.unlink()
    return out


# --- tokenizer --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])  # one loads an empty tokenizer, one fails obscurely
def test_model_without_tokenizer_files_is_a_clear_error(family: str, tiny_checkpoint, tmp_path) -> None:
    from moekit.profile.collect import load_tokenizer  # the name callers have imported so far

    bare = without_tokenizer(tiny_checkpoint(family), tmp_path / "bare")
    with pytest.raises(DataError, match=f"{bare} " + NO_FILES):
        load_tokenizer(bare)


def test_profile_of_a_model_without_tokenizer_fails_and_writes_nothing(tiny_checkpoint, tmp_path) -> None:
    from moekit.profile import profile_model

    bare = without_tokenizer(tiny_checkpoint("qwen3_moe"), tmp_path / "bare")
    (tmp_path / "d.txt").write_text("some calibration text " * 20)
    with pytest.raises(DataError, match=NO_FILES):  # it used to profile one EOS token per document, exit 0
        profile_model(bare, [f"d={tmp_path / 'd.txt'}"], tmp_path / "prof", seq_len=16, progress=False)
    assert not (tmp_path / "prof").exists()


def test_eval_of_a_model_without_tokenizer_fails_before_loading_it(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    import moekit.model_io
    from moekit.eval import TaskSpec, evaluate
    from moekit.pipeline import evaluate_model

    bare = without_tokenizer(tiny_checkpoint("qwen3_moe"), tmp_path / "bare")
    (tmp_path / "d.txt").write_text("some text to measure")

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(moekit.model_io, "load_model", no_weights)
    with pytest.raises(DataError, match=NO_FILES):
        evaluate_model(bare, texts={"t": tmp_path / "d.txt"}, progress=False)
    (tmp_path / "t.jsonl").write_text(json.dumps({"x": "hello"}) + "\n")
    spec = TaskSpec(name="t", kind="perplexity", data_path=tmp_path / "t.jsonl", text="{x}")
    with pytest.raises(DataError, match=NO_FILES):
        evaluate(str(bare), tasks=[spec], progress=False)


def test_saved_empty_tokenizer_is_refused(tiny_checkpoint, tmp_path) -> None:
    from transformers import AutoTokenizer

    from moekit.data import load_tokenizer

    bare = without_tokenizer(tiny_checkpoint("qwen3_moe"), tmp_path / "bare")
    AutoTokenizer.from_pretrained(str(bare)).save_pretrained(tmp_path / "empty")  # files, but no vocabulary
    with pytest.raises(DataError, match=r"the tokenizer loaded from .*empty is unusable: 1 tokens"):
        load_tokenizer(tmp_path / "empty")


def test_normal_tokenizer_loads_without_remote_code(tiny_checkpoint, monkeypatch) -> None:
    import transformers

    from moekit.data import load_tokenizer
    from moekit.profile import collect
    from moekit.tiny import byte_tokenizer

    model = tiny_checkpoint("qwen3_moe")
    tokenizer = load_tokenizer(model)
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == byte_tokenizer()("ab")["input_ids"]
    assert collect.load_tokenizer is load_tokenizer
    seen: list[dict] = []
    original = transformers.AutoTokenizer.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    load_tokenizer(model)
    load_tokenizer(model, trust_remote_code=True)
    assert [kwargs["trust_remote_code"] for kwargs in seen] == [False, True]
