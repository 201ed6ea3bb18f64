"""The fused per-neuron statistics kernel (``moekit.profile.kernels``), run in Triton's interpreter on the CPU and
checked against per-expert sums and maxima computed in float64. The interpreter must be chosen before Triton is
first imported, so the kernel runs in a child process started with ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

CHECK = r"""
import json, torch
from moekit.profile.kernels import segment_square_stats
gen = torch.Generator().manual_seed(0)
lengths = torch.tensor([37, 0, 70, 1, 64, 0, 45])  # empty experts; segments not multiples of the row block
out = {}
for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
    values = torch.randn(int(lengths.sum()), 70, generator=gen).to(dtype)  # width not a multiple of the block
    scale = torch.rand(values.shape[0], generator=gen)
    scale[5] = 0.0  # a padding pair
    energy, peak = segment_square_stats(values, scale, lengths)
    worst_sum = worst_max = 0.0
    start = 0
    for expert, count in enumerate(lengths.tolist()):
        squares = (values[start:start + count].double() * scale[start:start + count, None].double()).square()
        want_sum = squares.sum(0) if count else torch.zeros(70, dtype=torch.float64)
        want_max = squares.amax(0) if count else torch.zeros(70, dtype=torch.float64)
        rel_sum = (energy[expert].double() - want_sum).abs() / want_sum.clamp(min=1e-30)
        rel_max = (peak[expert].double() - want_max).abs() / want_max.clamp(min=1e-30)
        worst_sum, worst_max = max(worst_sum, float(rel_sum.max())), max(worst_max, float(rel_max.max()))
        start += count
    out[name] = {"shape": list(energy.shape), "dtype": str(energy.dtype), "sum_rel": worst_sum, "max_rel": worst_max,
                 "empty_zero": bool((energy[1] == 0).all() and (peak[5] == 0).all())}
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (pip install -e .[dev] installs it)")
def test_segment_square_stats_are_each_experts_sum_and_max_of_squares() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for dtype in ("bfloat16", "float32"):
        got = result[dtype]
        assert got["shape"] == [7, 70] and got["dtype"] == "torch.float32" and got["empty_zero"], got
        assert got["sum_rel"] < 1e-5 and got["max_rel"] < 1e-6, got  # float32 sums; the same products and squares


def test_the_torch_path_is_used_off_cuda_and_when_turned_off(monkeypatch) -> None:
    from moekit.profile import kernels

    assert not kernels.fused_stats_available(torch.zeros(2, 2))  # CPU: the torch path
    monkeypatch.setenv("MOEKIT_FUSED_STATS", "0")
    assert not kernels.fused_stats_available(torch.zeros(2, 2, device="meta"))


def test_a_kernel_that_fails_falls_back_to_the_torch_ops_with_one_warning(monkeypatch) -> None:
    from moekit.profile import kernels

    def broken(*_args, **_kwargs):
        raise RuntimeError("no kernel for this GPU")

    calls = []
    monkeypatch.setattr(kernels, "_FAILED", [])
    monkeypatch.setattr(kernels, "segment_square_stats", lambda *a, **k: calls.append(1) or broken())
    monkeypatch.setattr(kernels, "fused_stats_available", lambda _t: not kernels._FAILED)  # as on a CUDA machine
    values = torch.zeros(4, 3)
    with pytest.warns(UserWarning, match="no kernel for this GPU"):
        assert kernels.fused_or_none(values, torch.ones(4), torch.tensor([4])) is None
    assert kernels.fused_or_none(values, torch.ones(4), torch.tensor([4])) is None  # not tried again, no warning
    assert len(calls) == 1
