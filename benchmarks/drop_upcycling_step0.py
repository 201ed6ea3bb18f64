"""What Drop-Upcycling's partial re-initialisation costs the upcycled SmolLM2 at step 0, and how far apart it starts
the experts: one table from the ``step0`` stage of ``benchmarks/smollm2_upcycled_testbed.py`` run once per
``--reinit-ratio``.

Per ratio r: held-out perplexity per corpus domain (the same ``--eval-tokens`` per domain for every r), its ratio to
r = 0 (plain upcycling, which computes the dense model), the mean and largest pairwise weight cosine of the experts
(float64, every MoE layer) and the balance of the random router. No training: what recovery makes of it is not shown.

    for r in 0.0 0.1 0.25 0.5; do
      python benchmarks/smollm2_upcycled_testbed.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --corpus SUBSET \\
        --stages step0 --reinit-ratio $r --eval-tokens 4096 --device cpu --results RUNS \\
        --name smollm2_upcycled8x2-reinit$r-step0
    done
    python benchmarks/drop_upcycling_step0.py RUNS/smollm2_upcycled8x2-reinit*-step0.json

Writes ``benchmarks/results/smollm2_upcycled8x2-reinit-step0.{json,md}`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "smollm2_upcycled8x2-reinit-step0"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["reinit_ratio"])
    if not runs or runs[0]["reinit_ratio"] != 0:
        raise SystemExit("give the run with --reinit-ratio 0 too: every ratio is compared with it")
    for key in ("eval_tokens_per_domain", "seq_len", "domains", "experts", "top_k"):
        if len({json.dumps(r[key]) for r in runs}) > 1:
            raise SystemExit(f"the runs differ in {key}: measure every ratio the same way")
    base = runs[0]["stages"]["step0"]["heldout_perplexity"]
    rows = []
    for run in runs:
        step0 = run["stages"]["step0"]
        ppl = step0["heldout_perplexity"]
        ratio = {d: ppl[d] / base[d] for d in ppl}
        layers = step0.get("balance", {}).get("layers", [])
        rows.append({"reinit_ratio": run["reinit_ratio"], "heldout_perplexity": ppl, "perplexity_over_copies": ratio,
                     "geomean_perplexity_over_copies": math.exp(sum(math.log(v) for v in ratio.values()) / len(ratio)),
                     "step0_max_logit_difference": step0["step0_max_logit_difference"],
                     "divergence": step0.get("divergence"),
                     "max_violation_range": [min(x["max_violation"] for x in layers),
                                             max(x["max_violation"] for x in layers)] if layers else None})
    first = runs[0]
    return {"rows": rows, "experts": first["experts"], "top_k": first["top_k"], "domains": first["domains"],
            "eval_tokens_per_domain": first["eval_tokens_per_domain"], "seq_len": first["seq_len"],
            "source": first["source"], "device": first["device"], "versions": first["versions"]}


def markdown(summary: dict[str, Any]) -> str:
    domains = summary["domains"]
    lines = [f"# Drop-Upcycling at step 0: SmolLM2-135M-Instruct upcycled to {summary['experts']} experts, "
             f"top-{summary['top_k']}", "",
             "`benchmarks/drop_upcycling_step0.py` over the `step0` stage of `benchmarks/smollm2_upcycled_testbed.py` "
             "(`moekit upcycle --reinit-ratio r`: each expert redraws round(r x 1536) of its FFN neurons from the "
             "statistics of the weights they replace). No training. Held-out perplexity on "
             f"{summary['eval_tokens_per_domain']:,} tokens per domain, sequences of {summary['seq_len']}; "
             f"{summary['source']}; device {summary['device']}; torch {summary['versions']['torch']}, transformers "
             f"{summary['versions']['transformers']}.", "",
             "| r | perplexity / copies' (geometric mean) | " + " | ".join(domains) +
             " | mean pairwise expert cosine | largest | router MaxVio per layer |",
             "|---:|---:|" + "---:|" * len(domains) + "---:|---:|---|"]
    for row in summary["rows"]:
        div = row["divergence"] or {}
        vio = row["max_violation_range"]
        lines.append(f"| {row['reinit_ratio']:g} | {row['geomean_perplexity_over_copies']:.2f} | "
                     + " | ".join(f"{row['heldout_perplexity'][d]:.2f}" for d in domains)
                     + f" | {div.get('mean_pairwise_cosine', float('nan')):.4f} | "
                       f"{div.get('max_pairwise_cosine', float('nan')):.4f} | "
                     + (f"{vio[0]:.2f}-{vio[1]:.2f}" if vio else "-") + " |")
    lines += ["", "r = 0 is plain sparse upcycling: every expert a copy of the dense FFN, so the model computes the "
              "dense one (perplexities are the dense model's). Expected cosine for r > 0: about (1 - r)^2, the share "
              "of neurons two experts both kept. What this does not show: how much of the loss recovery training "
              "wins back, and whether the experts then stay apart; measured with few held-out tokens per domain "
              "(noise of a few percent between domains).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="results JSON of the step0 runs, one per --reinit-ratio")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    summary = summarise([json.loads(p.read_text()) for p in args.runs])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / f"{NAME}.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
