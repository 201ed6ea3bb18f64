"""The fused per-neuron statistics kernel against the torch ops it replaces, on one GPU.

``moekit.profile.kernels.segment_square_stats`` (Triton: one read of the [P, I] activations, per-expert sums and
maxima of (g a)^2 in registers) against the torch path of ``moekit.profile.stats`` (a float32 copy of the squares,
then two ``torch.segment_reduce`` calls), on random bf16 activations shaped like one MoE layer's pairs of a
8x2048-token batch: Qwen3-30B-A3B (128 experts, top-8, width 768) and DeepSeek-V3 (256 experts, top-8, width 2048),
with uneven expert loads and an empty expert. Reported: the largest relative difference of the sums, the largest
absolute difference of the maxima, and milliseconds per call (after a warm-up; five rounds of 20 calls, the two
paths alternating; median and range).

    python benchmarks/neuron_stats_kernel_check.py [--out benchmarks/results]

Writes neuron_stats_kernel-cuda.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moekit.profile.kernels import segment_square_stats

SHAPES = {"qwen3-30b-a3b": (128, 768), "deepseek-v3": (256, 2048)}
TOKENS = 8 * 2048
TOP_K = 8


def torch_path(values: torch.Tensor, scale: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    squares = (values * scale[:, None]).square_()
    return (torch.segment_reduce(squares, "sum", lengths=lengths, axis=0),
            torch.segment_reduce(squares, "max", lengths=lengths, axis=0, initial=0.0))


def timed(fn, calls: int = 20) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {}
    for name, (experts, width) in SHAPES.items():
        load = torch.rand(experts, device="cuda", generator=gen) + 0.2
        load[3] = 0.0  # an expert nobody chose in this batch
        lengths = (load / load.sum() * TOKENS * TOP_K).long()
        pairs = int(lengths.sum())
        values = torch.randn(pairs, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        scale = torch.rand(pairs, device="cuda", generator=gen)
        energy, peak = segment_square_stats(values, scale, lengths)
        want_energy, want_peak = torch_path(values, scale, lengths)
        rel = float(((energy - want_energy).abs() / want_energy.clamp(min=1e-30)).max())
        peak_diff = float((peak - want_peak).abs().max())
        rounds: dict[str, list[float]] = {"fused": [], "torch": []}
        segment_square_stats(values, scale, lengths)
        torch_path(values, scale, lengths)
        for _ in range(5):
            rounds["fused"].append(timed(lambda v=values, s=scale, n=lengths: segment_square_stats(v, s, n)))
            rounds["torch"].append(timed(lambda v=values, s=scale, n=lengths: torch_path(v, s, n)))
        results[name] = {"experts": experts, "width": width, "pairs": pairs, "sum_max_relative_difference": rel,
                         "max_max_absolute_difference": peak_diff,
                         **{f"{k}_ms": {"median": statistics.median(v), "min": min(v), "max": max(v)}
                            for k, v in rounds.items()}}
        print(name, json.dumps(results[name]))
    record = {"benchmark": "neuron_stats_kernel", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neuron_stats_kernel-cuda.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Fused neuron-statistics kernel against the torch ops ({record['device']}, torch {torch.__version__})",
             "", "One MoE layer's (token, expert) pairs of an 8x2048-token batch, top-8, bf16 activations; ms per "
             "call, median (min-max) of five rounds of 20 calls.", "",
             "| shape | experts | width | pairs | fused ms | torch ms | speed-up | sums: max rel. diff | maxima: max "
             "abs. diff |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        f, t = r["fused_ms"], r["torch_ms"]
        lines.append(f"| {name} | {r['experts']} | {r['width']} | {r['pairs']:,} | {f['median']:.3f} ({f['min']:.3f}-"
                     f"{f['max']:.3f}) | {t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f}) | "
                     f"{t['median'] / f['median']:.1f}x | {r['sum_max_relative_difference']:.2g} | "
                     f"{r['max_max_absolute_difference']:.2g} |")
    (args.out / "neuron_stats_kernel-cuda.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
