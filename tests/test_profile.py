"""The profiler: capture exactness, accumulators against a per-token reference, sets, merge, padding, files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ALL_FAMILIES, random_ids
from profile_reference import reference_profile

from moekit.arch.view import MoEModelView
from moekit.data import CalibrationSet
from moekit.outputs import OutputError
from moekit.profile import Profile, ProfileError, capturing, collect_profile, merge_profiles
from moekit.profile.profile_file import META_FILE, TENSOR_FILE
from moekit.tiny import build_tiny_model

REFERENCE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "granitemoe", "llama4_text",
                      "dbrx"]


def _set(name: str, seed: int, batch: int = 2, length: int = 40, pad: int = 0) -> CalibrationSet:
    ids = random_ids(seed, batch, length)
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, length - pad:] = 0
        ids[-1, length - pad:] = 0
    return CalibrationSet(name, ids, mask)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_capture_computes_what_the_default_implementation_computes(family: str) -> None:
    model = build_tiny_model(family)
    view = MoEModelView.from_model(model)
    ids = random_ids(1, 2, 24)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with capturing(view) as capture:
            capture.state.begin_batch(0, torch.ones_like(ids))
            captured = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    if family in ("llama4_text", "dbrx"):  # undecorated: our grouped computation vs their loop / dense bmm
        torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-5)
    else:  # same kernel, same order: bit-identical to grouped_mm
        assert torch.equal(captured, expected)
    assert torch.equal(after, expected), "the capture must leave the model as it was"
    assert model.config._experts_implementation == ("eager" if family in ("llama4_text", "dbrx") else "grouped_mm")


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_accumulators_equal_a_per_token_reference(family: str) -> None:
    model = build_tiny_model(family)
    calibration = _set("data", seed=3, pad=7)
    profile = collect_profile(model, [calibration], batch_size=2, neuron_stats=True, progress=False)
    reference = reference_profile(model, calibration.input_ids, calibration.attention_mask)
    assert sorted(profile.layers) == sorted(reference)
    for layer, expected in reference.items():
        for name, value in expected.items():
            got = profile.stat(layer, name)
            torch.testing.assert_close(got.double(), value.double(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name, i=layer: f"{family} layer {i} {n}: {m}")
        assert float(expected["count"].sum()) == (2 * 40 - 7) * profile.fingerprint["top_k"]
    assert set(profile.meta["easy_ep_input"].values()) == {"residual stream"}


def test_named_sets_stay_separate() -> None:
    model = build_tiny_model("qwen3_moe")
    code, prose = _set("code", seed=1), _set("prose", seed=2)
    both = collect_profile(model, [code, prose], batch_size=2, progress=False)
    only_code = collect_profile(model, [code], batch_size=2, progress=False)
    only_prose = collect_profile(model, [prose], batch_size=2, progress=False)
    assert both.set_names == ["code", "prose"]
    for layer in both.layers:
        for name in both.layers[layer]:
            assert torch.equal(both.stat(layer, name, "code"), only_code.stat(layer, name))
            assert torch.equal(both.stat(layer, name, "prose"), only_prose.stat(layer, name))
        assert not torch.equal(both.stat(layer, "count", "code"), both.stat(layer, "count", "prose"))
    assert [s["tokens"] for s in both.meta["sets"]] == [80, 80]


def test_merge_equals_the_profile_of_the_union() -> None:
    model = build_tiny_model("deepseek_v3")
    part_a, part_b = _set("data", seed=4, batch=4), _set("data", seed=5, batch=2, pad=9)
    union = CalibrationSet("data", torch.cat([part_a.input_ids, part_b.input_ids]),
                           torch.cat([part_a.attention_mask, part_b.attention_mask]))
    whole = collect_profile(model, [union], batch_size=2, progress=False)
    merged = merge_profiles(collect_profile(model, [part_a], batch_size=2, progress=False),
                            collect_profile(model, [part_b], batch_size=2, progress=False))
    for layer in whole.layers:
        for name in whole.layers[layer]:
            torch.testing.assert_close(merged.stat(layer, name), whole.stat(layer, name), rtol=1e-12, atol=0)
    assert merged.meta["sets"][0]["tokens"] == whole.meta["sets"][0]["tokens"] == 6 * 40 - 9


def test_merge_keeps_differently_named_sets_side_by_side() -> None:
    model = build_tiny_model("mixtral")
    a = collect_profile(model, [_set("code", 1)], progress=False)
    b = collect_profile(model, [_set("prose", 2)], progress=False)
    merged = merge_profiles(a, b)
    assert merged.set_names == ["code", "prose"]
    layer = merged.fingerprint["moe_layers"][0]
    assert torch.equal(merged.stat(layer, "count", "prose"), b.stat(layer, "count"))


def test_padding_does_not_count() -> None:
    """A padded batch gives the statistics of its real tokens run alone."""
    model = build_tiny_model("qwen2_moe")
    padded = _set("data", seed=6, batch=2, length=32, pad=12)
    alone = [CalibrationSet("data", padded.input_ids[:1], padded.attention_mask[:1]),
             CalibrationSet("data", padded.input_ids[1:, :20], padded.attention_mask[1:, :20])]
    profile = collect_profile(model, [padded], batch_size=2, progress=False)
    separate = merge_profiles(collect_profile(model, alone[:1], progress=False),
                              collect_profile(model, alone[1:], progress=False))
    for layer in profile.layers:
        for name in profile.layers[layer]:
            if name.startswith("chunk"):
                continue  # chunks straddling padding are skipped, never counted as chunks of the shorter row
            torch.testing.assert_close(profile.stat(layer, name), separate.stat(layer, name), rtol=1e-5, atol=1e-6)
    assert profile.meta["sets"][0]["tokens"] == 32 + 20


def test_profile_saves_loads_and_checks_the_model(tmp_path) -> None:
    model = build_tiny_model("olmoe")
    profile = collect_profile(model, [_set("data", 1)], progress=False)
    profile.save(tmp_path / "prof")
    loaded = Profile.load(tmp_path / "prof")
    assert loaded.meta == json.loads(json.dumps(profile.meta))
    for layer in profile.layers:
        for name, tensor in profile.layers[layer].items():
            assert torch.equal(loaded.layers[layer][name], tensor)
    loaded.check_model(MoEModelView.from_model(model))
    other = build_tiny_model("olmoe", num_experts=6)
    with pytest.raises(ProfileError, match=r"collected on another model.*num_experts"):
        loaded.check_model(MoEModelView.from_model(other))
    with pytest.raises(ProfileError, match="collected on another model"):
        loaded.check_model(MoEModelView.from_model(build_tiny_model("olmoe", num_hidden_layers=4)))
    with pytest.raises(OutputError, match="already exists"):
        profile.save(tmp_path / "prof")


def test_broken_profiles_are_clear_errors(tmp_path) -> None:
    profile = collect_profile(build_tiny_model("mixtral"), [_set("data", 1)], progress=False)
    path = profile.save(tmp_path / "prof")
    (path / TENSOR_FILE).write_bytes((path / TENSOR_FILE).read_bytes()[:200])
    with pytest.raises(ProfileError, match="corrupted"):
        Profile.load(path)
    path = profile.save(tmp_path / "prof2")
    (path / META_FILE).unlink()
    with pytest.raises(ProfileError, match="not a complete profile"):
        Profile.load(path)
    path = profile.save(tmp_path / "prof3")
    (path / META_FILE).write_text("{not json")
    with pytest.raises(ProfileError, match="corrupted"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="not a profile directory"):
        Profile.load(tmp_path / "missing")
    with pytest.raises(ProfileError, match="different models"):
        merge_profiles(profile, collect_profile(build_tiny_model("qwen3_moe"), [_set("data", 1)], progress=False))


def test_left_padding_and_bad_sets_are_refused() -> None:
    from moekit.data import DataError

    model = build_tiny_model("mixtral")
    bad = _set("data", 1)
    bad.attention_mask[0, :3] = 0
    with pytest.raises(DataError, match="padded on the left"):
        collect_profile(model, [bad], progress=False)
    with pytest.raises(DataError, match="unique"):
        collect_profile(model, [_set("a", 1), _set("a", 2)], progress=False)
    empty = CalibrationSet("e", torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(DataError, match="no tokens"):
        collect_profile(model, [empty], progress=False)


def _profile_on_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        profile = collect_profile(build_tiny_model("qwen3_moe"), [_set("a", 1, batch=5), _set("b", 2, batch=3, pad=5)],
                                  batch_size=2, progress=False, distributed=True)
        if rank == 0:
            profile.save(out)
    finally:
        dist.destroy_process_group()


def test_data_parallel_profiling_equals_one_process(tmp_path) -> None:
    """Two gloo ranks, each running every other sequence, all-reduce to the single-process profile."""
    import torch.multiprocessing as mp

    mp.spawn(_profile_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "prof")), nprocs=2, join=True)
    together = Profile.load(tmp_path / "prof")
    alone = collect_profile(build_tiny_model("qwen3_moe"), [_set("a", 1, batch=5), _set("b", 2, batch=3, pad=5)],
                            batch_size=2, progress=False)
    for layer in alone.layers:
        for name in alone.layers[layer]:
            torch.testing.assert_close(together.stat(layer, name, "a"), alone.stat(layer, name, "a"),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(together.stat(layer, name, "b"), alone.stat(layer, name, "b"),
                                       rtol=1e-5, atol=1e-6)


def test_an_interrupted_save_leaves_nothing_that_looks_like_a_profile(tmp_path, monkeypatch) -> None:
    import moekit.profile.profile_file as profile_file

    profile = collect_profile(build_tiny_model("mixtral"), [_set("data", 1)], progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile_file, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile.save(tmp_path / "prof")
    assert list(tmp_path.iterdir()) == []
