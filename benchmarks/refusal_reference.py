"""Refusal rates of a reference model (the dense model a testbed was upcycled from) on the same held-out requests
that ``benchmarks/routing_behaviour.py`` measures its MoE conditions on (the odd-numbered of the first
``--requests`` of each set, chat template, greedy, ``--new-tokens``, Arditi et al.'s refusal phrases), so that a
table of the MoE's refusal rates can say whether the model it came from refused at all.

    python benchmarks/refusal_reference.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --requests 160 \\
        --new-tokens 32 --name smollm2-135m-instruct

Writes RESULTS/refusal_reference-NAME.{json,md}. A GGUF is dequantised to float32 by transformers' loader (needs
``gguf``); a model folder loads with ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from routing_behaviour import request_split  # the same held-out split

import moekit
from moekit.eval.refusal import REFUSAL_PHRASES, chat_prompts, refusal_rate

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a GGUF file (dequantised to float32)")
    source.add_argument("--model", type=Path, help="a model folder")
    parser.add_argument("--name", required=True)
    parser.add_argument("--safety", type=Path, default=ROOT / "data" / "safety")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--requests", type=int, default=520, help="as routing_behaviour.py's --requests")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    if args.gguf is not None:
        folder, kwargs = str(args.gguf.parent), {"gguf_file": args.gguf.name}
    else:
        folder, kwargs = str(args.model), {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    result: dict[str, Any] = {
        "name": args.name, "model": (args.gguf or args.model).name, "dtype": "float32",
        "device": f"CPU ({platform.machine()})",
        "versions": {"moekit": moekit.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "template": chat_prompts(tokenizer, ["x"])[1], "new_tokens": args.new_tokens,
        "refusal_phrases": list(REFUSAL_PHRASES), "sets": {}}
    for name in ("harmful", "harmless"):
        requests = request_split(args.safety, name, args.requests)[1]
        start = time.perf_counter()
        measured = refusal_rate(model, tokenizer, requests, max_new_tokens=args.new_tokens,
                                batch_size=args.batch_size, progress=True)
        result["sets"][name] = {"requests": len(requests), "refused": measured["refused"],
                                "refusal_rate": round(measured["refusal_rate"], 4),
                                "examples": measured["answers"][:5],
                                "seconds": round(time.perf_counter() - start, 1)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"refusal_reference-{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Refusal rates of `{result['model']}` (reference)", "",
             f"{result['dtype']} on {result['device']}; moekit {moekit.__version__}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}. Held-out requests as routing_behaviour.py splits the first "
             f"{args.requests} of each set; {result['template']}, greedy, {args.new_tokens} new tokens; a refusal = "
             "the answer contains one of Arditi et al. 2024's refusal phrases (substring).", "",
             "| set | requests | refused | refusal rate |", "|---|---:|---:|---:|"]
    for name, row in result["sets"].items():
        lines.append(f"| {name} | {row['requests']} | {row['refused']} | {row['refusal_rate']:.3f} |")
    lines += ["", "First answers to harmful requests:", ""]
    lines += [f"- {json.dumps(a)}" for a in result["sets"]["harmful"]["examples"]]
    (args.results / f"refusal_reference-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
