"""The streaming checkpoint editor: the same checkpoint as the in-memory path on every family, bytes
unchanged, shards, FP8 scales, refused sources, and memory that does not grow with the model."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ALL_FAMILIES, random_ids
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import moekit.edit
from moekit.arch import MoEModelView
from moekit.edit import _prune_in_memory, prune_experts, prune_to_checkpoint
from moekit.edit.safetensors_io import OutputTensor, Piece, write_sharded
from moekit.model_io import ModelLoadError, load_structure
from moekit.tiny import build_tiny_model, byte_tokenizer, save_tiny_model

DEMO = Path(moekit.__file__).parent / "demo" / "model"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory``, read with safetensors itself."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = handle.get_tensor(name)
    return out


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        a, b = got[name], want[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert _raw(a) == _raw(b), name


def _keep(source: Path, ids: list[int]) -> dict[int, list[int]]:
    return {layer.index: ids for layer in MoEModelView.from_model(load_structure(source)).layers}


def _no_load(*args, **kwargs):
    raise AssertionError("the streaming editor loaded the model")


def _loads_cleanly(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_streamed_checkpoint_equals_the_in_memory_one(family, tiny_checkpoint, tmp_path, monkeypatch):
    source = tiny_checkpoint(family)
    keep = _keep(source, [0, 2, 5, 7])  # two of each half: also valid for group-limited routing
    with monkeypatch.context() as patch:
        patch.setattr(moekit.edit, "load_model", _no_load)
        streamed = prune_to_checkpoint(source, keep, tmp_path / "streamed")
    reference = _prune_in_memory(source, keep, tmp_path / "in-memory")

    _assert_same_tensors(_tensors(streamed.out), _tensors(reference.out))
    read = lambda p: json.loads((p / "config.json").read_text())  # noqa: E731
    assert read(streamed.out) == read(reference.out)
    assert streamed.before == reference.before and streamed.after == reference.after
    assert streamed.plan == reference.plan
    assert sorted(p.name for p in streamed.out.iterdir()) == sorted(p.name for p in reference.out.iterdir())

    pruned = AutoModelForCausalLM.from_pretrained(source).eval()
    prune_experts(MoEModelView.from_model(pruned), keep)
    reloaded = _loads_cleanly(streamed.out)
    ids = random_ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_keeping_every_expert_copies_every_tensor_byte_for_byte(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    out = prune_to_checkpoint(source, _keep(source, list(range(8))), tmp_path / "same", allow_no_removal=True).out
    _assert_same_tensors(_tensors(out), _tensors(source))


def _reshard(source: Path, out: Path, max_shard_size: str) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    byte_tokenizer().save_pretrained(out)
    return out


def _check_index(out: Path) -> dict[str, str]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(out.glob("*.safetensors"))
    assert {out / f for f in weight_map.values()} == set(shards) and len(shards) > 1
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            assert sorted(handle.keys()) == sorted(k for k, f in weight_map.items() if f == shard.name)
    assert index["metadata"]["total_size"] == sum(_tensors(out)[k].nbytes for k in weight_map)
    return weight_map


def test_sharded_source_gives_a_sharded_output_with_an_index(tiny_checkpoint, tmp_path):
    source = _reshard(tiny_checkpoint("qwen3_moe"), tmp_path / "sharded", "40KB")
    assert len(list(source.glob("*.safetensors"))) > 3
    keep = _keep(source, [1, 3, 4, 6])
    streamed = prune_to_checkpoint(source, keep, tmp_path / "streamed").out
    _check_index(streamed)
    largest = max(f.stat().st_size for f in source.glob("*.safetensors"))
    assert all(f.stat().st_size <= largest for f in streamed.glob("*.safetensors"))
    reference = _prune_in_memory(source, keep, tmp_path / "in-memory").out
    _assert_same_tensors(_tensors(streamed), _tensors(reference))
    _loads_cleanly(streamed)


def test_bundled_demo_model_streams_equal_to_the_in_memory_path(tmp_path):
    keep = _keep(DEMO, [0, 1, 2, 3, 8, 9, 10, 11])
    streamed = prune_to_checkpoint(DEMO, keep, tmp_path / "streamed")
    reference = _prune_in_memory(DEMO, keep, tmp_path / "in-memory")
    _assert_same_tensors(_tensors(streamed.out), _tensors(reference.out))
    assert json.loads((streamed.out / "config.json").read_text()) == json.loads(
        (reference.out / "config.json").read_text())
    assert _tensors(streamed.out)["model.embed_tokens.weight"].dtype == torch.bfloat16  # tied head: not stored
    _loads_cleanly(streamed.out)


def test_hand_written_shards_are_read_by_safetensors(tmp_path):
    source = tmp_path / "src.safetensors"
    parts = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.arange(5, dtype=torch.bfloat16),
             "c": torch.ones(3, dtype=torch.float8_e4m3fn), "d": torch.arange(4, dtype=torch.int64)}
    save_file(parts, str(source))
    with safe_open(str(source), "pt") as handle:
        names = list(handle.keys())
    from moekit.edit.safetensors_io import read_header

    infos = {i.name: i for i in read_header(source)}
    assert sorted(infos) == sorted(names)
    wanted = [OutputTensor(f"x.{n}", i.dtype, i.shape, [Piece(i.path, i.begin, i.nbytes)]) for n, i in infos.items()]
    row = infos["a"].nbytes // 2  # the second row of "a" alone, as the editor slices experts
    wanted.append(OutputTensor("x.a1", "F32", (1, 3), [Piece(source, infos["a"].begin + row, row)]))
    files = write_sharded(tmp_path, wanted, max_shard_size=16)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    got = _tensors(tmp_path)
    for name, tensor in parts.items():
        assert _raw(got[f"x.{name}"]) == _raw(tensor) and got[f"x.{name}"].dtype == tensor.dtype
    assert torch.equal(got["x.a1"], parts["a"][1:])
    for file in files:
        (length,) = struct.unpack("<Q", (tmp_path / file).read_bytes()[:8])
        assert length % 8 == 0
        header = json.loads((tmp_path / file).read_bytes()[8:8 + length])
        assert header["__metadata__"] == {"format": "pt"}


def _fp8_checkpoint(tiny_checkpoint, out: Path) -> Path:
    """A tiny DeepSeek-V3 in the DeepSeek-V3 FP8 format: float8_e4m3fn weights with float32 block scales
    ``weight_scale_inv [ceil(out/128), ceil(in/128)]``, for every expert and for one attention projection."""
    source = tiny_checkpoint("deepseek_v3")
    shutil.copytree(source, out)
    tensors = _tensors(source)
    gen = torch.Generator().manual_seed(3)
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight") and (".experts." in name or name.endswith("self_attn.o_proj.weight")):
            stored[name] = tensor.to(torch.float8_e4m3fn)
            blocks = [math.ceil(d / 128) for d in tensor.shape]
            stored[name + "_scale_inv"] = torch.rand(blocks, generator=gen) + 0.5
        else:
            stored[name] = tensor
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_fp8_experts_and_their_scales_are_copied_never_dequantised(tiny_checkpoint, tmp_path, monkeypatch):
    source = _fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8")
    keep = _keep(source, [0, 2, 5, 7])
    monkeypatch.setattr(moekit.edit, "load_model", _no_load)
    out = prune_to_checkpoint(source, keep, tmp_path / "pruned").out
    before, after = _tensors(source), _tensors(out)
    expert_names = [n for n in after if ".experts." in n]
    assert expert_names and all(after[n].dtype == torch.float8_e4m3fn for n in expert_names
                                if n.endswith(".weight"))
    for layer, ids in keep.items():
        prefix = f"model.layers.{layer}.mlp"
        for new, old in enumerate(ids):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in (".weight", ".weight_scale_inv"):
                    a = after[f"{prefix}.experts.{new}.{proj}{suffix}"]
                    b = before[f"{prefix}.experts.{old}.{proj}{suffix}"]
                    assert a.dtype == b.dtype and _raw(a) == _raw(b)
        assert not any(n.startswith(f"{prefix}.experts.{len(ids)}.") for n in after)
        assert torch.equal(after[f"{prefix}.gate.weight"], before[f"{prefix}.gate.weight"][ids])
        bias = f"{prefix}.gate.e_score_correction_bias"
        assert torch.equal(after[bias], before[bias][ids])
    scale = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    assert _raw(after[scale]) == _raw(before[scale])
    removed = sum(1 for n in before if ".experts." in n) // 2  # half of the experts' tensors go
    assert len(after) == len(before) - removed
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == 4


def _leaves_nothing(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_pickle_sources_are_refused(tiny_checkpoint, tmp_path):
    source = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), source)
    torch.save(_tensors(source), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"pickle.*safetensors"):
        prune_to_checkpoint(source, _keep(source, [0, 1, 2, 3]), tmp_path / "out")
    _leaves_nothing(tmp_path / "out")


@pytest.mark.parametrize("damage", ["cut", "header"])
def test_truncated_shards_are_refused_before_anything_is_written(damage, tiny_checkpoint, tmp_path):
    source = _reshard(tiny_checkpoint("qwen3_moe"), tmp_path / "sharded", "40KB")
    last = sorted(source.glob("*.safetensors"))[-1]
    data = last.read_bytes()
    if damage == "cut":
        last.write_bytes(data[: len(data) - 100])
    else:  # a header size beyond the file
        last.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(ModelLoadError, match=f"cannot load the weights.*{last.name}.*truncated"):
        prune_to_checkpoint(source, _keep(source, [0, 1, 2, 3]), tmp_path / "out")
    _leaves_nothing(tmp_path / "out")


@pytest.mark.parametrize("name", ["model.layers.1.mlp.gate.tid2eid", "model.layers.1.mlp.experts.gate_up_proj",
                                  "model.layers.9.mlp.experts.0.up_proj.weight"])
def test_a_tensor_of_an_moe_layer_that_cannot_be_classified_is_an_error_naming_it(name, tiny_checkpoint, tmp_path):
    source = tmp_path / "odd"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), source)
    tensors = _tensors(source)
    tensors[name] = torch.zeros(8, 2)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        prune_to_checkpoint(source, _keep(source, [0, 1, 2, 3]), tmp_path / "out")
    _leaves_nothing(tmp_path / "out")


def test_tensors_whose_size_equals_the_expert_count_are_not_sliced(tmp_path):
    """head_dim == E (both 16 here, as 128 and 128 in real models): only names decide what is a router."""
    source = save_tiny_model("qwen3_moe", tmp_path / "collide", num_experts=16)
    norm = "model.layers.0.self_attn.q_norm.weight"
    assert tuple(_tensors(source)[norm].shape) == (16,)
    keep = _keep(source, list(range(0, 16, 2)))
    out = prune_to_checkpoint(source, keep, tmp_path / "out").out
    assert torch.equal(_tensors(out)[norm], _tensors(source)[norm])
    _loads_cleanly(out)


def test_a_config_that_does_not_match_the_weights_is_refused(tiny_checkpoint, tmp_path):
    source = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 48}))
    with pytest.raises(ModelLoadError, match="does not match its weights"):
        prune_to_checkpoint(source, _keep(source, [0, 1, 2, 3]), tmp_path / "out")
    _leaves_nothing(tmp_path / "out")


_MEASURE = textwrap.dedent("""
    import re, sys
    from moekit.arch import MoEModelView
    from moekit.edit import _prune_in_memory, prune_to_checkpoint
    from moekit.model_io import load_structure
    mode, source, out = sys.argv[1:]
    view = MoEModelView.from_model(load_structure(source))
    keep = {layer.index: list(range(0, layer.num_experts, 2)) for layer in view.layers}
    if mode == "stream":
        prune_to_checkpoint(source, keep, out)
    elif mode == "memory":
        _prune_in_memory(source, keep, out)
    status = open("/proc/self/status").read()
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
""")


def _peak_rss(mode: str, source: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(moekit.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", _MEASURE, mode, str(source), str(out)], env=env, check=True,
                          capture_output=True, text=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak resident set from /proc")
def test_streaming_memory_does_not_grow_with_the_model(tmp_path):
    """Peak resident memory of a prune in a fresh process, above the same process that only builds the meta
    structure. tracemalloc does not see torch's CPU allocations (torch allocates outside Python's allocator),
    so the test measures the peak resident set instead: ``VmHWM``, the high-water mark of the process's own
    memory map. (``ru_maxrss`` would not do: Linux carries it across fork and exec, so a child of the pytest
    process starts with pytest's peak.) The test also checks that this measure sees the in-memory path
    materialise the model, so that it could catch the streaming editor doing so."""
    source = save_tiny_model("qwen3_moe", tmp_path / "big", num_experts=64, hidden_size=256,
                             moe_intermediate_size=256, num_hidden_layers=4)
    size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    assert size > 180 * 2**20
    largest = max(t.nbytes for t in _tensors(source).values())
    baseline = _peak_rss("structure", source, tmp_path / "none")
    streamed = _peak_rss("stream", source, tmp_path / "streamed") - baseline
    in_memory = _peak_rss("memory", source, tmp_path / "in-memory") - baseline
    assert in_memory > 0.9 * size, (in_memory, size)  # the measure sees a model in memory
    assert streamed < 2 * largest + 48 * 2**20, (streamed, largest)
    assert streamed < size / 4
    _assert_same_tensors(_tensors(tmp_path / "streamed"), _tensors(tmp_path / "in-memory"))


def test_hub_ids_keep_the_in_memory_path(monkeypatch, tmp_path):
    calls = []
    model = build_tiny_model("qwen3_moe")
    monkeypatch.setattr(moekit.edit, "load_structure", lambda source: build_tiny_model("qwen3_moe").to("meta"))
    monkeypatch.setattr(moekit.edit, "load_model", lambda source, dtype="auto": calls.append(source) or model)
    result = prune_to_checkpoint("someone/tiny-moe", {i: [0, 1, 2, 3] for i in range(3)}, tmp_path / "out")
    assert calls == ["someone/tiny-moe"] and result.after.num_experts == 4
    _loads_cleanly(result.out)


def _hand_written(path: Path, entries: dict[str, tuple[str, list[int], int, int]], data: bytes) -> Path:
    header = {name: {"dtype": d, "shape": s, "data_offsets": [a, b]} for name, (d, s, a, b) in entries.items()}
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize(("entries", "size"), [
    ({"a": ("F32", [2], 0, 8), "b": ("F32", [2], 8, 16)}, 20),  # bytes left over after the last tensor
    ({"a": ("F32", [3], 0, 8)}, 8),  # 3 floats in 8 bytes
    ({"a": ("F32", [2], 0, 8), "b": ("F32", [1], 12, 16)}, 16),  # a gap between tensors
    ({"a": ("F32", [2], 0, 8), "b": ("F32", [2], 4, 12)}, 12),  # overlapping tensors
], ids=["trailing", "size", "gap", "overlap"])
def test_headers_safetensors_refuses_are_refused_without_mapping_the_file(entries, size, tmp_path):
    from safetensors import SafetensorError, safe_open

    from moekit.edit.safetensors_io import read_header

    path = _hand_written(tmp_path / "bad.safetensors", entries, bytes(size))
    with pytest.raises((SafetensorError, OSError)):  # the library's own verdict on the same bytes
        with safe_open(str(path), "pt"):
            pass
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        read_header(path)


def test_fp8_and_int8_headers_are_accepted(tmp_path):
    from safetensors import safe_open

    from moekit.edit.safetensors_io import read_header

    path = _hand_written(tmp_path / "ok.safetensors", {"w": ("F8_E4M3", [2, 4], 0, 8), "s": ("F32", [1], 8, 12),
                                                       "q": ("I8", [4], 12, 16)}, bytes(16))
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == ["q", "s", "w"]
    assert [(t.name, t.nbytes) for t in read_header(path)] == [("w", 8), ("s", 4), ("q", 4)]
