"""Garbage profiles are refused: corrupted statistics or metadata at load, double-counted or mixed merges."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moekit.cli import app
from moekit.profile import Profile, ProfileError, merge_profiles, profile_model
from moekit.profile.profile_file import FORMAT, META_FILE, TENSOR_FILE

runner = CliRunner()


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "prose.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"The river {i} runs quietly past the old mill."})
                              for i in range(40)))
    return path


@pytest.fixture(scope="module")
def real_profile(tiny_checkpoint, text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A profile of a tiny Mixtral on real (tokenised, packed) text, as ``moekit profile`` writes it."""
    out = tmp_path_factory.mktemp("profiles") / "prof"
    profile_model(tiny_checkpoint("mixtral"), [f"prose={text}"], out, seq_len=32, max_tokens=300, progress=False)
    return out


def _copy(profile: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(profile, tmp_path / "copy"))


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / TENSOR_FILE))
    edit(tensors)
    save_file(tensors, str(path / TENSOR_FILE), metadata={"format": FORMAT})


def _edit_meta(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((path / META_FILE).read_text())
    edit(meta)
    (path / META_FILE).write_text(json.dumps(meta))


def _set_value(name: str, value: float, index: tuple[int, ...] = (0, 1)) -> Callable[[dict], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][index] = value
    return edit


TENSOR_CORRUPTIONS: dict[str, tuple[Callable[[dict], None], str]] = {
    "nan gate sum": (_set_value("layers.1.gate_sum", float("nan")), "layers.1.gate_sum holds NaN or infinite"),
    "inf maximum": (_set_value("layers.0.norm_max", float("inf")), "layers.0.norm_max holds NaN or infinite"),
    "negative count": (_set_value("layers.2.count", -3.0), "layers.2.count holds negative"),
    "negative entropy": (_set_value("layers.0.router_entropy_sum", -1.0, (0,)), "router_entropy_sum holds negative"),
    "tokens off": (_set_value("layers.0.tokens", 7.0, (0,)), "counts 7 tokens"),
    "odd layer index": (lambda t: t.__setitem__("layers.x.count", t["layers.0.count"].clone()),
                        "odd tensor name 'layers.x.count'"),
    "no layer prefix": (lambda t: t.__setitem__("foo", torch.zeros(1)), "odd tensor name 'foo'"),
}


@pytest.mark.parametrize("case", list(TENSOR_CORRUPTIONS))
def test_corrupted_statistics_are_refused(case: str, real_profile: Path, tmp_path: Path) -> None:
    edit, message = TENSOR_CORRUPTIONS[case]
    path = _copy(real_profile, tmp_path)
    _edit_tensors(path, edit)
    with pytest.raises(ProfileError, match="corrupted") as error:
        Profile.load(path)
    assert message in str(error.value)
    assert str(path / TENSOR_FILE) in str(error.value)


def _delete(*keys: str) -> Callable[[dict], None]:
    def edit(meta: dict[str, Any]) -> None:
        *parents, last = keys
        for key in parents:
            meta = meta[key]
        del meta[last]
    return edit


def _set_meta(value: Any, *keys: Any) -> Callable[[dict], None]:
    def edit(meta: Any) -> None:
        *parents, last = keys
        for key in parents:
            meta = meta[key]
        meta[last] = value
    return edit


META_CORRUPTIONS: dict[str, tuple[Callable[[dict], None], str]] = {
    "negative tokens": (_set_meta(-5, "sets", 0, "tokens"), "set 'prose': 'tokens' must be an integer >= 0"),
    "tokens not a number": (_set_meta("many", "sets", 0, "tokens"), "'tokens' must be an integer >= 0"),
    "negative sequences": (_set_meta(-1, "sets", 0, "sequences"), "'sequences' must be an integer >= 0"),
    "no sets": (_delete("sets"), "'sets' must be a non-empty list"),
    "empty sets": (_set_meta([], "sets"), "'sets' must be a non-empty list"),
    "set without a name": (_delete("sets", 0, "name"), "every set needs a non-empty string 'name'"),
    "set without data": (_delete("sets", 0, "data"), "set 'prose': 'data' must describe the data"),
    "duplicate sets": (lambda m: m["sets"].append(dict(m["sets"][0])), "set names must be unique"),
    "no model": (_delete("model"), "'model' must be an object with a 'fingerprint'"),
    "no fingerprint": (_delete("model", "fingerprint"), "'model' must be an object with a 'fingerprint'"),
    "no moe layers": (_delete("model", "fingerprint", "moe_layers"), "fingerprint 'moe_layers' must be"),
    "no expert counts": (_delete("model", "fingerprint", "num_experts"), "fingerprint 'num_experts' must be"),
    "expert counts short": (_set_meta([8, 8], "model", "fingerprint", "num_experts"),
                            "fingerprint 'num_experts' must be"),
    "no top-k": (_delete("model", "fingerprint", "top_k"), "fingerprint 'top_k' must be"),
    "no model type": (_delete("model", "fingerprint", "model_type"), "fingerprint 'model_type' must be"),
    "no options": (_delete("options"), "'options' must be an object with a true/false 'neuron_stats'"),
    "no neuron_stats": (_delete("options", "neuron_stats"), "'neuron_stats'"),
    "other chunk sizes": (_set_meta([4, 16, 32], "options", "chunk_sizes"), "chunk sizes [4, 16, 32]"),
}


@pytest.mark.parametrize("case", list(META_CORRUPTIONS))
def test_corrupted_metadata_is_refused(case: str, real_profile: Path, tmp_path: Path) -> None:
    edit, message = META_CORRUPTIONS[case]
    path = _copy(real_profile, tmp_path)
    _edit_meta(path, edit)
    with pytest.raises(ProfileError) as error:
        Profile.load(path)
    assert message in str(error.value)
    assert str(path / META_FILE) in str(error.value)


def test_the_intact_profile_loads(real_profile: Path) -> None:
    profile = Profile.load(real_profile)
    assert profile.set_names == ["prose"] and profile.meta["sets"][0]["tokens"] == 300


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_analyze_and_report_refuse_a_nan_profile(command: str, real_profile: Path, tmp_path: Path) -> None:
    path = _copy(real_profile, tmp_path)
    _edit_tensors(path, _set_value("layers.1.count", float("nan")))
    args = ["analyze", str(path)] if command == "analyze" else ["report", "--profile", str(path), "--out",
                                                                str(tmp_path / "report")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "layers.1.count holds NaN or infinite values" in " ".join(result.stderr.split())
    assert not (tmp_path / "report").exists()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Text files: ``big`` (many documents, drawn in part), ``other`` (different documents), ``copy`` (= big)."""
    root = tmp_path_factory.mktemp("corpus")
    big = root / "big.jsonl"
    big.write_text("\n".join(json.dumps({"text": f"Note {i}: the mill wheel turned {i % 7} times."})
                             for i in range(200)))
    other = root / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": f"Line {i} of another text about boats."}) for i in range(60)))
    copy = root / "copy" / "big.jsonl"
    copy.parent.mkdir()
    shutil.copy(big, copy)
    return {"big": big, "other": other, "copy": copy}


def _profile(tiny_checkpoint, tmp_path: Path, name: str, data: str, **options: Any) -> Path:
    out = tmp_path / name
    profile_model(tiny_checkpoint("mixtral"), [data], out, progress=False, **{"seq_len": 32, "max_tokens": 256,
                                                                                **options})
    return out


def test_merging_a_profile_with_itself_is_refused(real_profile: Path, tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="count the same tokens twice"):
        merge_profiles(Profile.load(real_profile), Profile.load(real_profile))
    result = runner.invoke(app, ["profile", "merge", str(real_profile), str(real_profile), "--out",
                                 str(tmp_path / "twice")])
    assert result.exit_code == 2, result.output
    assert "set 'prose'" in result.stderr and "same seed 0" in " ".join(result.stderr.split())
    assert not (tmp_path / "twice").exists()


def test_the_same_documents_under_another_path_are_the_same_data(tiny_checkpoint, corpus, tmp_path: Path) -> None:
    a = _profile(tiny_checkpoint, tmp_path, "a", f"d={corpus['big']}")
    b = _profile(tiny_checkpoint, tmp_path, "b", f"d={corpus['copy']}", seq_len=16, max_tokens=100)
    with pytest.raises(ProfileError, match="same seed 0: merging would count the same tokens twice"):
        merge_profiles(Profile.load(a), Profile.load(b))


def test_other_seeds_over_every_document_are_the_same_data(tiny_checkpoint, corpus, tmp_path: Path) -> None:
    a = _profile(tiny_checkpoint, tmp_path, "a", f"d={corpus['other']}", max_tokens=None)
    b = _profile(tiny_checkpoint, tmp_path, "b", f"d={corpus['other']}", max_tokens=None, seed=1)
    with pytest.raises(ProfileError, match="used every one of the documents"):
        merge_profiles(Profile.load(a), Profile.load(b))


def test_differing_options_are_recorded_per_source(tiny_checkpoint, corpus, tmp_path: Path) -> None:
    """Two partial draws with other seeds (and other lengths, dtypes) merge; the merged options hold only
    what agrees, the rest is listed and kept per source."""
    a = _profile(tiny_checkpoint, tmp_path, "a", f"d={corpus['big']}")
    b = _profile(tiny_checkpoint, tmp_path, "b", f"d={corpus['big']}", seed=1, seq_len=16, dtype="float32")
    c = _profile(tiny_checkpoint, tmp_path, "c", f"e={corpus['other']}")
    result = runner.invoke(app, ["profile", "merge", str(a), str(b), str(c), "--out", str(tmp_path / "abc")])
    assert result.exit_code == 0, result.output
    merged = Profile.load(tmp_path / "abc")
    assert merged.set_names == ["d", "e"] and merged.meta["sets"][0]["tokens"] == 512
    assert merged.meta["options_differ"] == ["dtype", "seed", "seq_len"]
    assert "seed" not in merged.meta["options"] and "seq_len" not in merged.meta["options"]
    assert merged.meta["options"]["max_tokens"] == 256 and merged.meta["options"]["neuron_stats"] is False
    sources = merged.meta["merged_from"]
    assert [s["options"]["seed"] for s in sources] == [0, 1, 0]
    assert [s["options"]["seq_len"] for s in sources] == [32, 16, 32]
    assert [s["sets"] for s in sources] == [["d"], ["d"], ["e"]]
    assert all("seconds" in s["timing"] for s in sources) and "timing" not in merged.meta


def test_profiles_with_other_chunk_sizes_do_not_merge(real_profile: Path) -> None:
    other = Profile.load(real_profile)
    other.meta["options"]["chunk_sizes"] = [4, 8, 16]
    other.meta["sets"][0]["data"] = {}
    with pytest.raises(ProfileError, match="chunk"):
        merge_profiles(Profile.load(real_profile), other)
