"""NAEE's beam search with its candidates scored one ``ExpertOutputCache.loss`` call at a time against scored in
batches (``ExpertOutputCache.losses``), on a tiny random Qwen3-MoE with 128 experts, top-8, and that both keep the
same experts.

The model: ``--layers`` decoder layers, hidden 192, ``moe_intermediate_size`` 48, 128 experts, top-8 (random
float32 weights, ``moekit.tiny``). Each MoE layer's inputs are ``--tokens`` random hidden states (normal, seed 0);
``search_layer`` runs a beam search (width ``--beam-width``, default 4) removing ``--ratio`` of the experts (default
25%: 32 of 128) with ``batched=False`` and ``batched=True``, alternately, ``--repeats`` times each after
``--warmup`` rounds (not timed). A round's time is the search of every layer on ``--device``, the cache's
construction included (the same in both). Reported: every time, the median and the spread (max - min), and
whether both searches kept the same experts with the same loss in every layer.

    python benchmarks/naee_search_speed.py --device cpu --tokens 512 --repeats 3
    python benchmarks/naee_search_speed.py --device cuda            # 8192 tokens

Writes benchmarks/results/naee_search_speed-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import moekit
from moekit.arch.view import MoEModelView
from moekit.plan.naee import LOSSES_BYTES, search_layer
from moekit.tiny import build_tiny_model

OUT = Path(__file__).resolve().parent / "results"
EXPERTS, TOP_K, HIDDEN, MOE_INTERMEDIATE = 128, 8, 192, 48


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed_round(view: MoEModelView, inputs: dict[int, torch.Tensor], remove: int, beam_width: int,
                batched: bool) -> tuple[float, list[Any]]:
    """Seconds to search every layer, and the per-layer results."""
    device = next(iter(inputs.values())).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    results = [search_layer(view, layer, inputs[layer.index], remove, search="beam", beam_width=beam_width,
                            batched=batched) for layer in view.layers]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens per layer")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.25, help="fraction of the experts removed")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_tiny_model("qwen3_moe", num_experts=EXPERTS, top_k=TOP_K, hidden_size=HIDDEN,
                             moe_intermediate_size=MOE_INTERMEDIATE, num_hidden_layers=args.layers).to(device)
    view = MoEModelView.from_model(model)
    generator = torch.Generator().manual_seed(0)
    inputs = {layer.index: torch.randn(args.tokens, HIDDEN, generator=generator).to(device) for layer in view.layers}
    remove = round(EXPERTS * args.ratio)
    times: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    results: dict[str, list[Any]] = {}
    for round_ in range(args.warmup + args.repeats):
        for how in times:
            seconds, results[how] = timed_round(view, inputs, remove, args.beam_width, how == "batched")
            if round_ >= args.warmup:
                times[how].append(seconds)
            print(f"round {round_} {how}: {seconds:.2f} s", flush=True)
    one, many = results["one_by_one"], results["batched"]
    same_kept = all(a.kept == b.kept for a, b in zip(one, many, strict=True))
    loss_gap = max(abs(a.loss - b.loss) / abs(a.loss) for a, b in zip(one, many, strict=True))
    median = {how: statistics.median(t) for how, t in times.items()}
    result = {
        "benchmark": "naee_search_speed", "device": args.device, "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "moekit": getattr(moekit, "__version__", "")},
        "settings": {"model": "tiny random qwen3_moe", "experts": EXPERTS, "top_k": TOP_K, "hidden": HIDDEN,
                     "moe_intermediate_size": MOE_INTERMEDIATE, "layers": args.layers, "tokens": args.tokens,
                     "removed": remove, "search": "beam", "beam_width": args.beam_width, "warmup": args.warmup,
                     "repeats": args.repeats, "losses_max_bytes": LOSSES_BYTES},
        "evaluated_subsets_per_round": sum(r.evaluated for r in many),
        "seconds": times, "median_seconds": median,
        "spread_seconds": {how: max(t) - min(t) for how, t in times.items()},
        "speedup_median": median["one_by_one"] / median["batched"],
        "same_kept_experts": same_kept, "max_relative_loss_gap": loss_gap,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"naee_search_speed-{args.device}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    s = result["settings"]
    lines = ["# NAEE beam search: candidates scored one by one vs in batches", "",
             f"`benchmarks/naee_search_speed.py --device {args.device} --tokens {args.tokens} --layers {args.layers} "
             f"--repeats {args.repeats} --warmup {args.warmup}` on {result['device_name']} "
             f"({result['threads']} CPU threads); torch {torch.__version__}, transformers {transformers.__version__}.",
             "", f"Tiny random Qwen3-MoE, {EXPERTS} experts, top-{TOP_K}, hidden {HIDDEN}, moe_intermediate_size "
             f"{MOE_INTERMEDIATE}, {args.layers} layer(s); {args.tokens:,} random hidden states per layer; beam search "
             f"(width {args.beam_width}) removing {remove} experts per layer: "
             f"{result['evaluated_subsets_per_round']:,} subsets scored per round. The two ways alternate; every "
             f"time is listed (seconds per round: every layer's search, the cache's construction included). "
             f"Batched: `ExpertOutputCache.losses` with its default budget ({s['losses_max_bytes'] >> 20} MiB).", "",
             "| scoring | seconds per round | median | spread (max - min) |", "|---|---|---:|---:|"]
    for how, label in (("one_by_one", "one `loss` call per candidate"), ("batched", "`losses`, in batches")):
        lines.append(f"| {label} | {', '.join(f'{t:.2f}' for t in times[how])} | {median[how]:.2f} | "
                     f"{result['spread_seconds'][how]:.2f} |")
    lines += ["", f"Speed-up (medians): {result['speedup_median']:.1f}x. Same experts kept in every layer: "
              f"{'yes' if same_kept else 'no'}; largest relative difference of the retained sets' losses: "
              f"{loss_gap:.1e}.", ""]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
