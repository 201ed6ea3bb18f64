"""Time to plan and to write a merged checkpoint, per merging method, on MoE layers shaped like Qwen3-30B-A3B's.

The model: ``--layers`` decoder layers of Qwen3-30B-A3B's shape (hidden 2048, 128 experts, top-8, expert
intermediate 768, 32 query / 4 key-value heads of 128) with random bfloat16 weights, saved as a safetensors
checkpoint; its vocabulary is cut to ``--vocab`` (default 8,192 instead of 151,936: merging never reads the
embeddings, and the copy of those bytes is the same for every method). It is profiled once with the merge
statistics (``merge_stats``, what ``moekit profile --merge-stats`` collects) on ``--tokens`` random tokens.

Then, at ``--ratio`` of the experts removed (default 0.5: 128 -> 64 per layer), for the pruning criterion
``frequency`` (the reference: what a prune of the same size costs) and each merging method, alternately,
``--repeats`` times after one warm-up round:

- plan: ``make_prune_plan`` / ``make_merge_plan`` (m_smoe and dern read every layer's expert weights from the
  checkpoint, layer by layer; dern computes its neuron cosines on ``--device``, as ``moekit merge --device``);
- write: ``moekit.pipeline.apply_plan`` from the checkpoint directory to a new one (the streaming writer: each
  merging layer read, merged in float64 on the CPU, written back).

dern runs with ``threshold`` -1 here: on random weights no neuron pair reaches the default cosine 0.6, so every
segment would be discarded and nothing merged; at -1 every dropped neuron is merged into a kept one, the most
work dern can do. Apart from dern's cosines, planning and merging run on this machine's CPU, so the times
depend on its cores (recorded); per layer = total / layers.

    python benchmarks/merge_speed.py [--layers 2] [--tokens 8192] [--repeats 3]

Writes benchmarks/results/merge_speed-<host tag>.json and .md (``--tag``, default cpu / cuda by the profile device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moekit.arch import MoEModelView
from moekit.data import CalibrationSet
from moekit.merge.methods import MERGE_METHODS, make_merge_plan
from moekit.pipeline import apply_plan
from moekit.plan import PlanRequest, make_prune_plan
from moekit.profile import collect_profile

OUT = Path(__file__).resolve().parent / "results"


def qwen3_30b_a3b_layers(layers: int, vocab: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def plan_for(method: str, source: Path, view: MoEModelView, profile: Any, ratio: float,
             device: str) -> dict[str, Any]:
    if method in MERGE_METHODS:
        extra = {"threshold": -1.0} if method == "dern" else {}
        return make_merge_plan(source, view, profile, PlanRequest(method, ratio=ratio, extra=extra), device=device)
    return make_prune_plan(view, profile, PlanRequest(method, ratio=ratio))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=8192, help="random calibration tokens for the profile")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["frequency", *MERGE_METHODS])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the profile runs and dern computes its cosines (the rest runs on the CPU)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="merge-speed-", dir=args.work))
    try:
        record = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tag = args.tag or ("cuda" if args.device.startswith("cuda") else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"merge_speed-{tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(record)
    (args.out / f"merge_speed-{tag}.md").write_text(text)
    print(text)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = qwen3_30b_a3b_layers(args.layers, args.vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    source = work / "model"
    model.save_pretrained(source)
    model.to(args.device)
    view = MoEModelView.from_model(model)
    seq_len = 512
    ids = torch.randint(0, args.vocab, (max(1, args.tokens // seq_len), seq_len),
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    profile = collect_profile(model, [CalibrationSet("random", ids, torch.ones_like(ids))], batch_size=8,
                              progress=False, merge_stats=True, source=str(source))
    profile_seconds = time.perf_counter() - start
    model.to("cpu")
    times: dict[str, dict[str, list[float]]] = {m: {"plan": [], "write": []} for m in args.methods}
    outputs: dict[str, int] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for method in args.methods:
            start = time.perf_counter()
            plan = plan_for(method, source, view, profile, args.ratio, args.device)
            planned = time.perf_counter()
            out = work / f"out-{method}"
            apply_plan(source, plan, out)
            written = time.perf_counter()
            outputs[method] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            shutil.rmtree(out)
            if round_:
                times[method]["plan"].append(planned - start)
                times[method]["write"].append(written - planned)
            print(f"round {round_} {method}: plan {planned - start:.2f} s, write {written - planned:.2f} s", flush=True)
    return {
        "benchmark": "merge_speed",
        "model": f"Qwen3-30B-A3B layer shape, {args.layers} layers, vocabulary {args.vocab}, random bf16 weights",
        "layers": args.layers, "experts": 128, "top_k": 8, "expert_intermediate": 768, "hidden": 2048,
        "ratio": args.ratio, "kept_per_layer": 128 - round(128 * args.ratio), "repeats": args.repeats,
        "profile": {"device": args.device, "tokens": int(ids.numel()), "merge_stats": True,
                    "seconds": profile_seconds},
        "dern_threshold": -1.0, "dern_device": args.device,
        "results": {m: {"plan_seconds": spread(t["plan"]), "write_seconds": spread(t["write"]),
                        "plan_seconds_per_layer": statistics.median(t["plan"]) / args.layers,
                        "write_seconds_per_layer": statistics.median(t["write"]) / args.layers,
                        "safetensors_bytes": outputs[m]} for m, t in times.items()},
        "cpu": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def markdown(record: dict[str, Any]) -> str:
    cpu = record["cpu"]
    lines = [f"# Merging speed: {record['model']}", "",
             f"{record['ratio']:.0%} of the experts removed (128 -> {record['kept_per_layer']} per layer); median of "
             f"{record['repeats']} alternating rounds after a warm-up, min-max in brackets. Merging runs on the CPU: "
             f"{cpu['cores']} cores, {cpu['torch_threads']} torch threads. Profile with merge statistics: "
             f"{record['profile']['tokens']:,} tokens on {record['profile']['device']} in "
             f"{record['profile']['seconds']:.1f} s. dern's cosines on {record['dern_device']}, at threshold -1 "
             "(every dropped neuron merged; random weights reach no cosine of 0.6). frequency = a pruning plan of the "
             "same size, for reference.", "",
             "| method | plan s | write s | plan s / layer | write s / layer | safetensors MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, r in record["results"].items():
        p, w = r["plan_seconds"], r["write_seconds"]
        lines.append(f"| {method} | {p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f}) | {w['median']:.2f} "
                     f"({w['min']:.2f}-{w['max']:.2f}) | {r['plan_seconds_per_layer']:.2f} | "
                     f"{r['write_seconds_per_layer']:.2f} | {r['safetensors_bytes'] / 1e6:,.0f} |")
    lines += ["", "What this does not show: quality (see `compare_methods-*.md`); times of a 48-layer model are ~48x "
                  "the per-layer times plus the copy of the other tensors; a faster CPU or more cores change them."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
