"""Layer-by-layer profiling (``moekit.layerwise``): the same profile as the whole model, one layer in memory,
resumable, data parallel, chosen when the model does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALL_FAMILIES
from typer.testing import CliRunner

from moekit.cli import app
from moekit.data import CalibrationSet
from moekit.layerwise import LayerwiseModel
from moekit.model_io import ModelLoadError, load_model
from moekit.profile import Profile, collect_profile
from moekit.profile.collect import collect_profile_layerwise
from moekit.profile.resume import resume_dir

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _sets() -> list[CalibrationSet]:
    """Two named sets with right padding, so the per-set and padding paths both run."""
    ids = torch.randint(3, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[4, 15:] = 0
    mask[5, 7:] = 0
    return [CalibrationSet("a", ids[:4], mask[:4], {"source": "test"}),
            CalibrationSet("b", ids[4:], mask[4:], {"source": "test"})]


def _assert_same_statistics(one: Profile, two: Profile, rtol: float = 0.0) -> None:
    assert sorted(one.layers) == sorted(two.layers)
    for layer, stats in one.layers.items():
        assert sorted(stats) == sorted(two.layers[layer])
        for name, tensor in stats.items():
            other = two.layers[layer][name]
            if rtol == 0.0:
                assert torch.equal(tensor, other), (layer, name, (tensor.double() - other.double()).abs().max())
            else:
                assert torch.allclose(other.double(), tensor.double(), rtol=rtol, atol=0), (layer, name)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_layer_by_layer_profile_equals_the_whole_model_profile(family: str, tiny_checkpoint) -> None:
    """Every statistic, bit for bit on the CPU: each layer is called with the arguments the model passes it
    (dense first layers, shared experts, hybrid attention/mamba/linear-attention layers included)."""
    path = tiny_checkpoint(family)
    whole = collect_profile(load_model(path), _sets(), batch_size=2, neuron_stats=True, progress=False)
    with LayerwiseModel(path) as run_:
        layered = collect_profile_layerwise(run_, _sets(), batch_size=2, neuron_stats=True, progress=False)
    _assert_same_statistics(whole, layered)
    assert layered.meta["easy_ep_input"] == whole.meta["easy_ep_input"]


def test_only_the_running_layer_holds_weights(tiny_checkpoint) -> None:
    path = tiny_checkpoint("deepseek_v3")
    with LayerwiseModel(path) as model:
        model.embed([torch.randint(3, 256, (2, 8))])
        assert all(p.is_meta for p in model.model.get_input_embeddings().parameters())  # needed only to start
        for index in model.layer_indices:
            with model.loaded(index) as layer:
                for other, module in enumerate(model.layers):
                    on_meta = all(p.is_meta for p in module.parameters())
                    assert on_meta == (other != index), (index, other)
                assert not any(b.is_meta for b in layer.buffers())
                model.forward(index, 0)
            assert all(p.is_meta for p in layer.parameters())
        head = model.model.get_output_embeddings()
        assert all(p.is_meta for p in head.parameters())  # the LM head is never loaded


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "jamba", "nemotron_h"])
def test_per_expert_tensors_are_read_straight_into_their_stacked_parameter(family: str, tiny_checkpoint) -> None:
    """Every stored per-expert tensor of these families is placed by moekit (no intermediate stack), and what it
    builds equals what from_pretrained builds."""
    path = tiny_checkpoint(family)
    reference = load_model(path).state_dict()
    with LayerwiseModel(path) as model:
        for index in model.layer_indices:
            stored = model._names_by_layer.get(index, [])
            placed, rest = model._placed_experts(stored)
            assert not [t.name for t in rest if ".experts." in t.name and "experts.gate" not in t.name], index
            state = model._stage(index)
            for rel, tensor in state.items():
                assert torch.equal(tensor, reference[f"{model.layer_list_path}.{index}.{rel}"]), (index, rel)
            assert bool(placed) == any(layer.index == index for layer in model.view.layers)


def test_missing_layer_weights_are_a_clear_error(tiny_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint("qwen3_moe")
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    tensors = load_file(source / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.2.self_attn.q_proj" not in k}, broken / "model.safetensors",
              metadata={"format": "pt"})
    with LayerwiseModel(broken) as model:
        model.embed([torch.randint(3, 256, (1, 8))])
        with model.loaded(0), model.loaded(1):
            pass
        with pytest.raises(ModelLoadError, match=r"missing from the checkpoint \(e.g. self_attn.q_proj.weight"), \
                model.loaded(2):
            pass
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.3.up_proj.weight"},
              broken / "model.safetensors", metadata={"format": "pt"})
    with LayerwiseModel(broken) as model, pytest.raises(ModelLoadError, match=r"lacks the stored tensors of expert"):
        model._stage(1)


def test_hub_ids_and_quantized_checkpoints_are_refused_before_loading(tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("qwen3_moe")
    quantized = tmp_path / "fp8"
    quantized.mkdir()
    for item in source.iterdir():
        (quantized / item.name).write_bytes(item.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quantized"):
        LayerwiseModel(quantized)
    with pytest.raises(ModelLoadError, match="one device"):
        LayerwiseModel(source, device="auto")
    with pytest.raises(ModelLoadError, match="local safetensors checkpoint"):
        LayerwiseModel("Qwen/Qwen3-30B-A3B")  # never fetched


def _profile_args(model: Path, texts: Path, out: Path, *extra: object) -> list[object]:
    return ["profile", model, "--data", f"code={texts}", "--seq-len", 32, "--max-tokens", 600, "--batch-size", 3,
            "--neuron-stats", "--out", out, *extra]


@pytest.fixture()
def code_dir(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("def add(x, y):\n    return x + y\n\n" * 30)
    (code / "b.py").write_text("for i in range(10):\n    print(i * i)\n" * 30)
    return code


def test_cli_sequential_and_the_automatic_choice(tiny_checkpoint, code_dir, tmp_path, monkeypatch) -> None:
    import moekit.needs as needs

    model = tiny_checkpoint("glm4_moe")
    whole = run(*_profile_args(model, code_dir, tmp_path / "whole", "--whole-model"))
    assert whole.exit_code == 0, whole.output
    layered = run(*_profile_args(model, code_dir, tmp_path / "layered", "--sequential"))
    assert layered.exit_code == 0, layered.output
    assert "layer by layer:" in layered.stderr
    one, two = Profile.load(tmp_path / "whole"), Profile.load(tmp_path / "layered")
    assert not one.meta["options"]["sequential"] and two.meta["options"]["sequential"]
    _assert_same_statistics(one, two)

    # a device too small for the whole model but large enough for one layer: chosen, and said
    probe = needs.profile_needs(model, tmp_path / "x", dtype="auto", device="cpu", batch_size=3, seq_len=32, sets=1,
                                neuron_stats=True, max_tokens=600)
    assert probe.layerwise_bytes < probe.whole_bytes
    monkeypatch.setattr(needs, "_device_free", lambda device: (probe.layerwise_bytes + probe.whole_bytes) // 2)
    auto = run(*_profile_args(model, code_dir, tmp_path / "auto"))
    assert auto.exit_code == 0, auto.output
    assert "profiling layer by layer (as --sequential)" in auto.stderr
    assert Profile.load(tmp_path / "auto").meta["options"]["sequential"]
    forced = run(*_profile_args(model, code_dir, tmp_path / "forced", "--whole-model"))
    assert forced.exit_code == 2 and "--sequential" in forced.stderr and not (tmp_path / "forced").exists()
    monkeypatch.setattr(needs, "_device_free", lambda device: probe.layerwise_bytes - 1)
    small = run(*_profile_args(model, code_dir, tmp_path / "small"))
    assert small.exit_code == 2 and "even layer by layer" in small.stderr and not (tmp_path / "small").exists()


def test_an_interrupted_run_resumes_to_the_uninterrupted_profile(tiny_checkpoint, code_dir, tmp_path,
                                                                 monkeypatch) -> None:
    model = tiny_checkpoint("deepseek_v3")
    monkeypatch.setenv("MOEKIT_RESUME_INTERVAL", "0")  # save after every layer
    done = run(*_profile_args(model, code_dir, tmp_path / "straight", "--sequential"))
    assert done.exit_code == 0, done.output
    out = tmp_path / "prof"
    state = resume_dir(out)

    calls = {"n": 0}
    original = LayerwiseModel.forward

    def interrupted(self, index, batch):
        if index == 2:  # killed in the last layer, after layers 0 and 1 were saved
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, index, batch)

    monkeypatch.setattr(LayerwiseModel, "forward", interrupted)
    stopped = run(*_profile_args(model, code_dir, out, "--sequential"))
    assert stopped.exit_code == 130 and not out.exists() and state.is_dir()
    assert "--resume" in stopped.stderr
    monkeypatch.setattr(LayerwiseModel, "forward", original)

    again = run(*_profile_args(model, code_dir, out, "--sequential"))  # the saved work is not thrown away
    assert again.exit_code == 2 and "--resume" in again.stderr and state.is_dir()
    other = run(*_profile_args(model, code_dir, out, "--sequential", "--resume", "--seed", 1))
    assert other.exit_code == 2 and "another run" in other.stderr and state.is_dir()

    resumed = run(*_profile_args(model, code_dir, out, "--sequential", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert not state.exists()
    profile = Profile.load(out)
    assert profile.meta["timing"]["resumed_at_layer"] == 2
    _assert_same_statistics(Profile.load(tmp_path / "straight"), profile)

    nothing = run(*_profile_args(model, code_dir, tmp_path / "new", "--sequential", "--resume"))
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.stderr
    whole = run(*_profile_args(model, code_dir, tmp_path / "new", "--resume"))
    assert whole.exit_code == 2 and "--sequential" in whole.stderr


def test_torchrun_layer_by_layer_equals_one_process(tiny_checkpoint, code_dir, tmp_path) -> None:
    """``torchrun --nproc-per-node 2 -m moekit profile --sequential`` (gloo): each rank streams every layer over
    its batches; the all-reduced profile equals one whole-model process."""
    model = tiny_checkpoint("qwen3_moe")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in both runs
    alone = subprocess.run([sys.executable, "-m", "moekit",
                            *map(str, _profile_args(model, code_dir, tmp_path / "alone", "--whole-model"))],
                           capture_output=True, text=True, timeout=300, env=env)
    assert alone.returncode == 0, alone.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekit"]
    together = subprocess.run([*launch, *map(str, _profile_args(model, code_dir, tmp_path / "together",
                                                                "--sequential"))],
                              capture_output=True, text=True, timeout=300, env=env)
    assert together.returncode == 0, together.stderr
    one, two = Profile.load(tmp_path / "alone"), Profile.load(tmp_path / "together")
    assert two.meta["options"]["world_size"] == 2 and two.meta["options"]["sequential"]
    assert not resume_dir(tmp_path / "together").exists()
    _assert_same_statistics(one, two, rtol=1e-12)


@pytest.mark.parametrize(("family", "progressive"), [("qwen3_moe", False), ("qwen3_moe", True),
                                                     ("deepseek_v3", True), ("gpt_oss", False)])
def test_naee_layer_by_layer_makes_the_whole_model_plan(family: str, progressive: bool, tiny_checkpoint) -> None:
    """The same retained sets and the same losses: each MoE block sees the inputs it sees in the whole model
    (with the earlier layers' experts masked, in progressive mode), truncated to the same token budget."""
    from moekit.plan import PlanRequest
    from moekit.plan.naee import make_naee_plan, make_naee_plan_layerwise

    path = tiny_checkpoint(family, num_experts=6)
    request = PlanRequest(method="naee", keep=4, protect_super=False)
    options = dict(search="exhaustive", progressive=progressive, max_tokens=40, batch_size=2, progress=False)
    whole = make_naee_plan(load_model(path), _sets(), request, **options)
    with LayerwiseModel(path) as model:
        layered = make_naee_plan_layerwise(model, _sets(), request, **options)
    assert {k: v["kept"] for k, v in layered["layers"].items()} == {k: v["kept"] for k, v in whole["layers"].items()}
    losses = [(e["layer"], e["tokens"], e["evaluated"]) for e in whole["details"]["naee"]["layers"]]
    assert [(e["layer"], e["tokens"], e["evaluated"]) for e in layered["details"]["naee"]["layers"]] == losses
    for mine, theirs in zip(layered["details"]["naee"]["layers"], whole["details"]["naee"]["layers"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-9)
    assert layered["details"]["naee"]["layer_by_layer"] and "layer_by_layer" not in whole["details"]["naee"]


def test_naee_from_the_command_line_layer_by_layer(tiny_checkpoint, tmp_path) -> None:
    source = tiny_checkpoint("mixtral", num_experts=6)
    text = tmp_path / "text.txt"
    text.write_text("a quick brown fox jumps over the lazy dog " * 40)
    args = ["prune", source, "--method", "naee", "--data", f"t={text}", "--keep", 4, "--naee-tokens", 256,
            "--no-protect-super", "--progressive", "--plan-only"]
    assert run(*args, "--whole-model", "--out", tmp_path / "whole.json").exit_code == 0
    result = run(*args, "--sequential", "--out", tmp_path / "layered.json")
    assert result.exit_code == 0, result.output
    whole = json.loads((tmp_path / "whole.json").read_text())
    layered = json.loads((tmp_path / "layered.json").read_text())
    assert layered["layers"] == whole["layers"] and layered["details"]["naee"]["progressive"]
