"""Write the bundled demo model's card (``src/moekit/demo/model/README.md``) from its ``training.json``.

Every number in the card comes from the training record that ``benchmarks/train_moe.py`` wrote.

    python benchmarks/demo_card.py src/moekit/demo/model
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def card(record: dict) -> str:
    config, recipe = record["config"], record["recipe"]
    balance = record.get("balance") or {}
    layers = balance.get("layers", [])
    worst = max((row["max_violation"] for row in layers), default=float("nan"))
    starved = max((row["below_quarter_of_mean"] for row in layers), default=float("nan"))
    lines = [
        "---", "library_name: transformers", "tags:", "- moekit", "- mixture-of-experts", f"- {config['model_type']}",
        "---", "", "# moekit demo model: a small Qwen3-MoE trained on code and prose", "",
        "The model `moekit demo` runs on, shipped inside the moekit package so the demo works offline.",
        f"A stock transformers `Qwen3MoeForCausalLM` ({config['num_hidden_layers']} layers, hidden "
        f"{config['hidden_size']}, {config['num_experts']} experts per layer of intermediate size "
        f"{config['moe_intermediate_size']}, top-{config['num_experts_per_tok']} with renormalisation, "
        f"{config['num_attention_heads']} query / {config['num_key_value_heads']} key-value heads, tied embeddings, "
        f"{record['parameters']:,} parameters, bfloat16) with the SmolLM2 tokenizer (49,152 tokens).", "",
        "## Training", "",
        f"Trained from random initialisation by `python benchmarks/train_moe.py --testbed {record['testbed']} "
        f"--aux-coef {recipe.get('aux_coefficient', 0.01)}` (moekit repository) on one {record['device']} for "
        f"{recipe['minutes']} minutes: {recipe['steps']:,} steps of {recipe['batch_size']} x {recipe['seq_len']} "
        f"tokens ({recipe['tokens_seen']:,} tokens), AdamW (lr {recipe['lr']}, cosine), bf16 autocast, seed "
        f"{recipe['seed']}. Load balancing: {recipe.get('balancing', 'pooled auxiliary loss')}, coefficient "
        f"{recipe.get('aux_coefficient', 0.01)}. Data: the moekit multi-domain corpus (`benchmarks/corpus`): Python "
        "(CPython stdlib), C (Linux), Go, Java; English, German, French, Spanish, Russian prose (Wikipedia "
        "summaries, State of the Union addresses, Debian and GNOME documentation, man pages); math (competition "
        "problems and CAS manuals), every sequence drawn from a domain chosen uniformly. `training.json` holds the "
        "full record (loss curve, balance per layer, versions), `loss.png` the curve.", "",
        f"Sequences were {recipe['seq_len']} tokens: score with a window of at most {recipe['seq_len']} (the config "
        f"allows more positions, the model never saw more than {recipe['seq_len']}).", "",
        "## Held-out perplexity (65,536 tokens per domain)", "", "| domain | perplexity |", "|---|---:|",
        *[f"| {domain} | {ppl:.2f} |" for domain, ppl in record["heldout_perplexity"].items()], "",
        "## Routing", "",
    ]
    if layers:
        lines.append(f"Balance on held-out text of every domain: the largest per-layer MaxVio (max load / mean load "
                     f"- 1) is {worst:.2f}; the largest share of a layer's experts below a quarter of the mean load is "
                     f"{starved:.0%}; the bar of released MoEs (MaxVio <= 0.5, none below a quarter) is "
                     f"{'met' if balance.get('bar_met') else 'not met'} in every layer.")
        lines.append("")
    lines += [f"Routing is specialised: averaged over pairs of domains, the Jaccard overlap of their most-used "
              f"experts is {record['specialisation']['mean_jaccard']:.2f} (1 would be identical expert use), "
              "measured with moekit's profiler.", "", "It is a testbed for compression methods, not a useful "
              "language model.", ""]
    return "\n".join(lines)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "src/moekit/demo/model")
    record = json.loads((folder / "training.json").read_text())
    (folder / "README.md").write_text(card(record))


if __name__ == "__main__":
    main()
