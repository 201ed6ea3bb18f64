"""NAEE's search time with cached expert outputs against a block forward per candidate, and that both keep the
same experts.

On the bundled demo model (16 experts, top-4, 4 layers; ``--tiny-64x8`` adds a tiny random Qwen3-MoE with 64
experts, top-8, hidden 32, where a block forward costs little and the cache gains nothing -- slow to measure):
``make_naee_plan`` (beam search, width 4) at 50% and 75% removed, on ``--tokens`` calibration tokens of the demo
texts, with ``cache_bytes`` at its default and at 0 (block forwards). The two are run alternately, ``--repeats``
times each after one warm-up, and the plans' kept experts are compared.

    python benchmarks/naee_speed.py            # writes benchmarks/results/naee_speed.{json,md}
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

from moekit.data import CalibrationSet
from moekit.demo import MODEL_DIR, TEXTS_DIR
from moekit.model_io import load_model
from moekit.plan import PlanRequest
from moekit.plan.naee import make_naee_plan
from moekit.tiny import build_tiny_model

OUT = Path(__file__).resolve().parent / "results"


def demo_tokens(tokens: int) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    text = "\n".join(json.loads(line)["text"] for p in sorted(TEXTS_DIR.glob("*-calibration.jsonl"))
                     for line in p.read_text().splitlines() if line.strip())
    ids = torch.tensor(tokenizer(text)["input_ids"][: tokens // 256 * 256])
    return ids.view(-1, 256)


def timed_plan(model: Any, sets: list[CalibrationSet], ratio: float, cache_bytes: int | None) -> tuple[float, Any]:
    kwargs = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    start = time.perf_counter()
    plan = make_naee_plan(model, sets, PlanRequest("naee", ratio=ratio), search="beam", max_tokens=sets[0].num_tokens,
                          batch_size=8, progress=False, **kwargs)
    return time.perf_counter() - start, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny-64x8", action="store_true", help="also the tiny random 64-expert model")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = demo_tokens(args.tokens)
    models = {"demo-qwen3-16x4": load_model(MODEL_DIR, dtype=torch.float32)}
    if args.tiny_64x8:
        models["tiny-qwen3-64x8"] = build_tiny_model("qwen3_moe", num_experts=64, top_k=8, vocab_size=49152)
    rows = []
    for name, model in models.items():
        sets = [CalibrationSet("demo", ids, torch.ones_like(ids))]
        for ratio in (0.5, 0.75):
            times: dict[str, list[float]] = {"cached": [], "block": []}
            plans = {}
            timed_plan(model, sets, ratio, None)  # warm-up
            for _ in range(args.repeats):
                for how, cache in (("cached", None), ("block", 0)):
                    seconds, plans[how] = timed_plan(model, sets, ratio, cache)
                    times[how].append(seconds)
            same = all(plans["cached"]["layers"][k]["kept"] == plans["block"]["layers"][k]["kept"]
                       for k in plans["block"]["layers"])
            rows.append({"model": name, "ratio": ratio, "tokens": int(ids.numel()),
                         "cached_seconds": times["cached"], "block_seconds": times["block"],
                         "speedup_median": statistics.median(times["block"]) / statistics.median(times["cached"]),
                         "same_kept_experts": same,
                         "evaluated_subsets": sum(x["evaluated"]
                                                  for x in plans["cached"]["details"]["naee"]["layers"])})
            print(rows[-1], flush=True)
    result = {"rows": rows, "device": "cpu", "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "naee_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# NAEE search: cached expert outputs vs a block forward per candidate", "",
             f"`benchmarks/naee_speed.py`, CPU ({result['threads']} threads), beam search width 4, "
             f"{rows[0]['tokens']:,} calibration tokens, {args.repeats} alternating runs each after a warm-up "
             "(all times listed: shared CPU machines are noisy).", "",
             "| model | removed | subsets scored | cached s | block s | speed-up (medians) | same experts kept |",
             "|---|---:|---:|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ratio']:.0%} | {r['evaluated_subsets']:,} | "
                     f"{', '.join(f'{t:.1f}' for t in r['cached_seconds'])} | "
                     f"{', '.join(f'{t:.1f}' for t in r['block_seconds'])} | {r['speedup_median']:.1f}x | "
                     f"{'yes' if r['same_kept_experts'] else 'no'} |")
    lines += ["", "Times include the profile pass NAEE makes to find super experts and record the data (the same in "
              "both). What it does not show: GPU times (the cache turns many small block launches into one gather "
              "per candidate, so the gain there is expected to be larger, not measured here).", ""]
    (args.out / "naee_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
