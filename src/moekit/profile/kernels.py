"""One fused GPU kernel for the per-neuron statistics (``--neuron-stats``), written in Triton.

``segment_square_stats(values, scale, lengths)``: for pairs sorted by expert (``lengths [E]`` pairs per expert), the
per-expert sum and maximum over its pairs of (scale_p values_{p,n})^2, i.e. ``neuron_energy`` and the square of
``neuron_max`` of one batch. The plain torch path (``moekit.profile.stats``) writes a float32 [P, I] copy of the
squares and reads it twice (a segmented sum and a segmented max); this kernel reads the [P, I] activations once, in
their own dtype, and keeps the sums and maxima in registers: each program owns one expert and one block of neurons
and walks down that expert's pairs. The arithmetic is the same (float32 products and squares, float32 sums); only
the order of the additions differs, so sums agree to float32 round-off and maxima exactly.

Why our own kernel: no library offers a segmented (per-expert) column reduction that reads its input once;
``torch.segment_reduce`` takes one reduction per call. Used on CUDA when Triton is installed (it comes with
PyTorch's CUDA builds) and ``MOEKIT_FUSED_STATS`` is not 0; ``benchmarks/neuron_stats_kernel.py`` checks it against
the torch path on the GPU and times both.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def _kernel():  # compiled on first use: importing moekit never needs Triton
    import triton
    import triton.language as tl

    @triton.jit
    def segment_square_stats_kernel(values_ptr, scale_ptr, starts_ptr, ends_ptr, energy_ptr, peak_ptr, width,
                                    stride, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        expert = tl.program_id(0)
        block = tl.program_id(1)
        first = tl.load(starts_ptr + expert)  # the expert's pairs: rows first..end-1
        end = tl.load(ends_ptr + expert)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < width
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        peak = tl.zeros([BLOCK_N], dtype=tl.float32)
        while first < end:  # (a while loop: Triton's interpreter, used by the tests, cannot range over loaded ends)
            rows = first + tl.arange(0, BLOCK_P)
            row_ok = rows < end
            s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
            x = tl.load(values_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            v = x * s[:, None]
            v = v * v
            total += tl.sum(v, axis=0)
            peak = tl.maximum(peak, tl.max(v, axis=0))
            first += BLOCK_P
        tl.store(energy_ptr + expert * width + cols, total, mask=col_ok)
        tl.store(peak_ptr + expert * width + cols, peak, mask=col_ok)

    return segment_square_stats_kernel


_FAILED: list[str] = []  # why the kernel failed once in this process (then the torch ops run)


def fused_stats_available(tensor: torch.Tensor) -> bool:
    """Whether :func:`segment_square_stats` can run on ``tensor`` (CUDA, Triton importable, not turned off, not
    failed before in this process)."""
    return (tensor.device.type == "cuda" and os.environ.get("MOEKIT_FUSED_STATS", "1") != "0" and not _FAILED
            and _triton_importable())


@functools.cache
def _triton_importable() -> bool:  # asked once per process: the check runs for every layer of every batch
    return importlib.util.find_spec("triton") is not None


def fused_or_none(values: torch.Tensor, scale: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`segment_square_stats` where it can run, else None (the caller's torch ops run). A kernel that fails to
    compile or launch (an unsupported GPU, a Triton too old) is reported once as a warning and not tried again."""
    if not fused_stats_available(values):
        return None
    try:
        return segment_square_stats(values, scale, lengths)
    except Exception as err:  # any compile or launch failure: fall back, and say so once
        import warnings

        _FAILED.append(f"{type(err).__name__}: {err}")
        warnings.warn(f"moekit's fused neuron-statistics kernel failed ({_FAILED[0][:300]}); the torch ops run "
                      "instead (slower, same statistics). MOEKIT_FUSED_STATS=0 silences this.", stacklevel=2)
        return None


def segment_square_stats(values: torch.Tensor, scale: torch.Tensor, lengths: torch.Tensor,
                         block_p: int = 32, block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, max) over each expert's pairs of (scale_p values_{p,n})^2, float32 ``[E, I]`` each; ``values [P, I]``
    sorted by expert, ``scale [P]``, ``lengths [E]`` pairs per expert. CUDA or Triton's interpreter only
    (``TRITON_INTERPRET=1``, tests)."""
    import triton

    values = values if values.stride(-1) == 1 else values.contiguous()
    experts, width = int(lengths.numel()), int(values.shape[1])
    ends = torch.cumsum(lengths, 0).to(torch.int32)
    starts = ends - lengths.to(torch.int32)
    energy = torch.empty(experts, width, dtype=torch.float32, device=values.device)
    peak = torch.empty_like(energy)
    grid = (experts, triton.cdiv(width, block_n))
    _kernel()[grid](values, scale.float().contiguous(), starts, ends, energy, peak, width, values.stride(0),
                    BLOCK_P=block_p, BLOCK_N=block_n)
    return energy, peak


__all__ = ["fused_or_none", "fused_stats_available", "segment_square_stats"]
