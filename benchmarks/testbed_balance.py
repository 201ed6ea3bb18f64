"""Summarise the testbeds' training records: balance per layer against the bar of released MoEs, training length,
held-out perplexity and specialisation, one row per record.

Reads every ``*.json`` training record (written by ``benchmarks/train_moe.py``) under ``benchmarks/results/testbeds``
(its sub-folders are rounds: ``pooled-balancing/`` the first testbeds, trained with transformers' pooled loss;
``side-by-side-h200/`` seven runs trained at once on one GPU) and writes ``balance.json`` and ``balance.md`` there.
Records without a ``balance`` entry (written before it existed) get it from their ``load_share`` fields, which hold
the same held-out per-domain loads.

    python benchmarks/testbed_balance.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moekit.profile.analyze import NEARLY_DEAD_SHARE, STARVED_SHARE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_moe import balance_bar_met

ROOT = Path(__file__).resolve().parent / "results" / "testbeds"


def balance_from_load_share(record: dict[str, Any]) -> dict[str, Any]:
    """Per layer, from the per-domain load shares: the all-domain load (domains averaged) and its MaxVio, share of
    experts below a quarter of the mean and below 1% of it -- the fields ``train_moe.balance_of`` records."""
    shares = record["specialisation"]["load_share"]
    domains = sorted(shares)
    rows = []
    for layer in shares[domains[0]]:
        load = [sum(shares[d][layer][j] for d in domains) / len(domains) for j in range(len(shares[domains[0]][layer]))]
        mean = sum(load) / len(load)
        rows.append({"layer": int(layer), "max_violation": round(max(load) / mean - 1, 4),
                     "below_quarter_of_mean": round(sum(x < STARVED_SHARE * mean for x in load) / len(load), 4),
                     "below_1pct_of_mean": round(sum(x < NEARLY_DEAD_SHARE * mean for x in load) / len(load), 4)})
    return {"layers": rows, "bar_met": balance_bar_met(rows), "derived_from": "load_share (domains averaged)"}


def summarise(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text())
    balance = record.get("balance") or balance_from_load_share(record)
    layers = balance["layers"]
    recipe = record["recipe"]
    ppl = record["heldout_perplexity"]
    return {"record": str(path.relative_to(ROOT)), "testbed": record["testbed"],
            "round": path.parent.name if path.parent != ROOT else "current",
            "balancing": recipe.get("balancing", "DeepSeek-V3 correction-bias updates"
                                    if record["config"]["model_type"] == "deepseek_v3"
                                    else "transformers' pooled load_balancing_loss_func"),
            "aux_coefficient": recipe.get("aux_coefficient", 0.01), "steps": recipe["steps"],
            "minutes": recipe["minutes"], "device": record.get("device"),
            "max_violation": [min(r["max_violation"] for r in layers), max(r["max_violation"] for r in layers)],
            "most_starved_share": max(r["below_quarter_of_mean"] for r in layers),
            "most_nearly_dead_share": max(r["below_1pct_of_mean"] for r in layers),
            "bar_met": balance["bar_met"], "heldout_perplexity_mean": sum(ppl.values()) / len(ppl),
            "heldout_perplexity_en": ppl.get("en"),
            "mean_top_expert_jaccard": record["specialisation"]["mean_jaccard"]}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Testbed balance and training", "",
             "Per record: per-layer MaxVio (max load / mean load - 1; range over MoE layers), the largest share of a "
             "layer's experts below a quarter of the mean load (starved) and below 1% of it (nearly dead), on 65,536 "
             "held-out tokens of every domain; the bar of released MoEs is MaxVio <= 0.5 and no starved expert in "
             "every layer. Perplexity: held-out, mean over the ten domains, and English. Jaccard: mean overlap of "
             "domains' most-used experts (lower = more specialised). Written by `benchmarks/testbed_balance.py`.", "",
             "| record | balancing | coef | steps | min | MaxVio | starved | nearly dead | bar | ppl mean | ppl en | "
             "Jaccard |", "|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        balancing = ("per-layer Switch" if "per MoE layer" in r["balancing"] else
                     "DeepSeek-V3 bias" if "bias" in r["balancing"] else "pooled (transformers)")
        lines.append(f"| {r['record']} | {balancing} | {r['aux_coefficient']} | {r['steps']:,} | {r['minutes']} | "
                     f"{r['max_violation'][0]:.2f}-{r['max_violation'][1]:.2f} | {r['most_starved_share']:.0%} | "
                     f"{r['most_nearly_dead_share']:.0%} | {'met' if r['bar_met'] else 'missed'} | "
                     f"{r['heldout_perplexity_mean']:.1f} | {r['heldout_perplexity_en']:.1f} | "
                     f"{r['mean_top_expert_jaccard']:.2f} |")
    side = [r for r in rows if r["round"] == "side-by-side-h200"]
    alone = next((r for r in rows if r["round"] == "current" and r["testbed"] == "demo-qwen3-16x4"), None)
    shared = next((r for r in side if r["testbed"] == "demo-qwen3-16x4"), None)
    if side and alone and shared:
        slowdown = (alone["steps"] / alone["minutes"]) / (shared["steps"] / shared["minutes"])
        lines += ["", f"`side-by-side-h200/`: {len(side)} runs trained at the same time on one H200; sharing the GPU, "
                  f"each ran {slowdown:.1f}x fewer steps per minute than alone (demo model: {shared['steps']:,} steps "
                  f"in {shared['minutes']} minutes side by side, {alone['steps']:,} in {alone['minutes']} alone), so "
                  "they are undertrained (higher perplexity) and their balance is that of an early model."]
    solo = [r for r in rows if r["round"] in ("current", "other-coefficients") and r["minutes"] <= 2.5]
    if solo:
        lines += ["", f"Top-level records trained in {max(r['minutes'] for r in solo)} minutes or less "
                  f"({', '.join(sorted({r['testbed'] for r in solo}))}): each trained alone on one H200, one run after "
                  "the other, by `benchmarks/balanced_testbeds.sh solo NAME COEFS` (a few minutes per run so that "
                  "training and the method comparison fit one 10-minute device call; the fine-grained testbed's "
                  "weights cannot come back from that machine, so they are regenerated with the experiments), on the "
                  "corpus subset of 8M training tokens per domain (`benchmarks/corpus/subset.py`). The coefficient "
                  "was chosen by the rule fixed before the runs (`choose_testbeds.py`: the smallest that meets the "
                  "bar); `other-coefficients/` holds the runs it did not choose. Short training: these are earlier "
                  "models than the demo model (higher perplexity), the fine-grained one most of all."]
    lines += ["", "`pooled-balancing/`: the first testbeds (H100, each alone), trained with transformers' pooled loss, "
              "which balances experts summed over layers rather than each layer.", ""]
    return "\n".join(lines)


def main() -> None:
    rows = [summarise(p) for p in sorted(ROOT.rglob("*.json")) if p.name != "balance.json"]
    rows.sort(key=lambda r: (r["round"] != "current", r["round"], r["testbed"], r["aux_coefficient"]))
    (ROOT / "balance.json").write_text(json.dumps(rows, indent=1) + "\n")
    (ROOT / "balance.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
