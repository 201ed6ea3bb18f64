"""The built-in tasks' data from the Hugging Face hub, for when no local benchmark folder is there.

Each built-in task reads one local file (``moekit.eval.data``); when that file is missing and no folder was
named (no ``--data-dir``, no ``$MOEKIT_EVAL_DATA``), the same benchmark is loaded with ``datasets`` from the
dataset lm-evaluation-harness 0.4.13's task YAML names (path, config and split as there) and turned into the
rows the local readers return, so the prompts and metrics are the same code either way:

| file | hub dataset (config, split) |
|---|---|
| arc_easy.jsonl / arc_challenge.jsonl | allenai/ai2_arc (ARC-Easy / ARC-Challenge, test) |
| piqa.jsonl | baber/piqa (validation) |
| hellaswag_val_full.txt.bz2 | Rowan/hellaswag (validation) |
| winogrande.jsonl | allenai/winogrande (winogrande_xl, validation) |
| lambada_openai.jsonl | EleutherAI/lambada_openai (default, test) |
| gsm8k.jsonl | openai/gsm8k (main, test) |
| mmlu.tar.xz | cais/mmlu (all: test and dev) |

What stays different from lm-eval: GSM8K's few-shot exemplars are still the first other test items (lm-eval
samples them from the train split), as with the local file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moekit.eval import data
from moekit.eval.errors import EvalError

Rows = list[dict[str, Any]]


def _load(path: str, name: str | None, split: str) -> Any:
    import datasets

    return datasets.load_dataset(path, name, split=split)


def arc_rows(docs: Any) -> Rows:
    return [{"query": "Question: " + d["question"], "choices": list(d["choices"]["text"]),
             "gold": list(d["choices"]["label"]).index(d["answerKey"])} for d in docs]


def piqa_rows(docs: Any) -> Rows:
    return [{"query": f"Question: {d['goal']}\n", "choices": [d["sol1"], d["sol2"]], "gold": int(d["label"])}
            for d in docs]


def hellaswag_rows(docs: Any) -> Rows:
    return [data.hellaswag_item(d["activity_label"], d["ctx_a"], d["ctx_b"], list(d["endings"]), int(d["label"]))
            for d in docs]


def winogrande_rows(docs: Any) -> Rows:
    """lm-eval's Winogrande preprocessing: the sentence up to ``_`` with each option, the rest as continuation."""
    rows = []
    for d in docs:
        cut = d["sentence"].index("_")
        rows.append({"context_options": [d["sentence"][:cut] + d["option1"], d["sentence"][:cut] + d["option2"]],
                     "continuation": d["sentence"][cut + 1:].strip(), "gold": int(d["answer"]) - 1})
    return rows


def lambada_rows(docs: Any) -> Rows:
    rows = []
    for d in docs:
        words = d["text"].split(" ")
        rows.append({"context": " ".join(words[:-1]), "continuation": words[-1]})
    return rows


def gsm8k_rows(docs: Any) -> Rows:
    rows = []
    for d in docs:
        reasoning, _, answer = d["answer"].rpartition("####")
        rows.append({"context": d["question"], "chain_of_thought": reasoning.strip(), "answer": answer.strip()})
    return rows


def mmlu_subjects(test: Any, dev: Any) -> dict[str, dict[str, Rows]]:
    subjects: dict[str, dict[str, Rows]] = {}
    for split, docs in (("test", test), ("dev", dev)):
        for d in docs:
            entry = subjects.setdefault(d["subject"], {"test": [], "dev": []})
            entry[split].append({"question": d["question"], "choices": list(d["choices"]),
                                 "answer": int(d["answer"])})
    return dict(sorted(subjects.items()))


SOURCES: dict[str, tuple[str, Callable[[], Any]]] = {
    "arc_easy.jsonl": ("allenai/ai2_arc ARC-Easy", lambda: arc_rows(_load("allenai/ai2_arc", "ARC-Easy", "test"))),
    "arc_challenge.jsonl": ("allenai/ai2_arc ARC-Challenge",
                            lambda: arc_rows(_load("allenai/ai2_arc", "ARC-Challenge", "test"))),
    "piqa.jsonl": ("baber/piqa", lambda: piqa_rows(_load("baber/piqa", None, "validation"))),
    "hellaswag_val_full.txt.bz2": ("Rowan/hellaswag",
                                   lambda: hellaswag_rows(_load("Rowan/hellaswag", None, "validation"))),
    "winogrande.jsonl": ("allenai/winogrande winogrande_xl",
                         lambda: winogrande_rows(_load("allenai/winogrande", "winogrande_xl", "validation"))),
    "lambada_openai.jsonl": ("EleutherAI/lambada_openai",
                             lambda: lambada_rows(_load("EleutherAI/lambada_openai", "default", "test"))),
    "gsm8k.jsonl": ("openai/gsm8k main", lambda: gsm8k_rows(_load("openai/gsm8k", "main", "test"))),
    "mmlu.tar.xz": ("cais/mmlu all", lambda: mmlu_subjects(_load("cais/mmlu", "all", "test"),
                                                           _load("cais/mmlu", "all", "dev"))),
}


def hub_rows(filename: str, missing: EvalError) -> Any:
    """The rows of ``filename`` loaded from the hub; ``missing`` (the local file's error) is re-raised with why
    the hub did not work either."""
    if filename not in SOURCES:
        raise missing
    where, load = SOURCES[filename]
    try:
        return load()
    except Exception as err:
        raise EvalError(f"{missing}. Loading it from the hub instead ({where}, through datasets) failed too: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
