"""Benchmark tasks: what is asked of the model for each item, built from the shared eval files.

Every task is registered under its name (``TASKS.get("arc_easy")``); a builder takes the data folder,
the number of few-shot exemplars (None: the task's default) and ``limit`` and returns a ``Task``
whose prompts are exactly lm-eval's (0.4.x task YAMLs named per builder):

* arc_easy / arc_challenge / piqa — ``"Question: {question}\\nAnswer:"`` + ``" " + choice``; acc, acc_norm.
* hellaswag — ``query`` + ``" " + ending`` after lm-eval's preprocessing (see ``data``); acc, acc_norm.
* winogrande — partial scoring: one context per option, the shared ``" " + continuation`` scored; acc.
* mmlu — ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``, then
  ``num_fewshot`` dev exemplars ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n"`` (the
  first n, lm-eval's ``first_n`` sampler), then the question ending in ``"Answer:"``; choices
  ``" A"`` .. ``" D"``; acc, overall = mean over all items (lm-eval weights subjects by size).
  ``limit`` applies per subject, as in lm-eval.
* lambada_openai — ``(context, " " + last word)``; acc = greedy match, perplexity = exp(−mean ll).
* gsm8k — ``"Question: {question}\\nAnswer:"`` greedy until ``"Question:"`` / ``"</s>"`` /
  ``"<|im_end|>"`` / EOS, at most 256 tokens; exact_match of strict and flexible extraction. The file
  holds the test split only, so exemplars (default 5, as lm-eval) are the first n *other* test items
  ``"Question: q\\nAnswer: solution\\n#### N\\n\\n"`` (lm-eval's ``first_n`` on its own split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias, TypeVar

from moekit.eval import data
from moekit.eval.errors import EvalError
from moekit.registry import Registry

Kind: TypeAlias = Literal["multiple_choice", "loglikelihood", "generation", "perplexity"]


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: a (context, continuation) request per choice."""

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]  # the texts whose character lengths normalise acc_norm (lm-eval's doc_to_choice)
    gold: int
    group: str = ""  # e.g. the MMLU subject


@dataclass(frozen=True)
class ContinuationItem:
    """One (context, continuation) pair scored alone: log-likelihood and greedy match."""

    context: str
    continuation: str


@dataclass(frozen=True)
class GenerationItem:
    """One prompt to complete greedily and its expected answer."""

    prompt: str
    target: str


@dataclass(frozen=True)
class TextItem:
    """One text whose perplexity is measured."""

    text: str


Item: TypeAlias = ChoiceItem | ContinuationItem | GenerationItem | TextItem


@dataclass(frozen=True)
class Task:
    """A named list of items, the metrics it reports and how (``answer``: how generations are scored)."""

    name: str
    kind: Kind
    items: tuple[Item, ...]
    metrics: tuple[str, ...]
    num_fewshot: int = 0
    version: str = "1.0"  # the lm-eval task version the prompts follow ("custom" for user tasks)
    until: tuple[str, ...] = ()
    max_new_tokens: int = 256
    answer: Literal["gsm8k", "exact", "refusal"] = "exact"  # refusal: the prompts go into the chat template


TaskBuilder: TypeAlias = Callable[[Path | None, int | None, int | None], Task]
TASKS: Registry[TaskBuilder] = Registry("eval task")

# What each built-in task is, for ``moekit eval --list-tasks`` (a test checks that every registered task has one).
TASK_DESCRIPTIONS = {
    "arc_easy": "ARC-Easy, grade-school science questions, multiple choice (acc, acc_norm); arc_easy.jsonl",
    "arc_challenge": "ARC-Challenge, the harder ARC questions, multiple choice (acc, acc_norm); arc_challenge.jsonl",
    "piqa": "PIQA, physical commonsense, two choices (acc, acc_norm); piqa.jsonl",
    "hellaswag": "HellaSwag, sentence endings, four choices (acc, acc_norm); hellaswag_val_full.txt.bz2",
    "winogrande": "Winogrande, pronoun resolution, partial scoring (acc); winogrande.jsonl",
    "mmlu": "MMLU, 57 subjects, 0- or 5-shot from the dev exemplars (acc); mmlu.tar.xz",
    "lambada_openai": "LAMBADA (OpenAI), last-word prediction (acc, perplexity); lambada_openai.jsonl",
    "gsm8k": "GSM8K, grade-school math, generation, strict and flexible answer extraction (exact match); "
             "gsm8k.jsonl (test split only: few-shot exemplars are other test items)",
}


T = TypeVar("T")


def first(items: Sequence[T], limit: int | None) -> list[T]:
    """The first ``limit`` items (all when None)."""
    return list(items if limit is None else items[:limit])


def _no_fewshot(name: str, num_fewshot: int | None) -> int:
    if num_fewshot:
        raise EvalError(f"{name} has no exemplar split in its file, so it runs 0-shot only; few-shot is "
                        "available for mmlu, gsm8k and user-defined tasks")
    return 0


def question_prompt(query: str) -> str:
    """lm-eval's ``"Question: {q}\\nAnswer:"`` from an llm-foundry query (PIQA's already ends in a newline)."""
    return query + ("Answer:" if query.endswith("\n") else "\nAnswer:")


def _choice_task(name: str, filename: str, data_dir: Path | None, num_fewshot: int | None,
                 limit: int | None) -> Task:
    shots = _no_fewshot(name, num_fewshot)
    rows = data.load_rows(data_dir, filename, data.read_choice_file)
    items = tuple(
        ChoiceItem(requests=tuple((question_prompt(r["query"]), " " + c) for c in r["choices"]),
                   choices=tuple(r["choices"]), gold=r["gold"])
        for r in first(rows, limit))
    return Task(name, "multiple_choice", items, ("acc", "acc_norm"), shots)


@TASKS.register("arc_easy")
def arc_easy(data_dir: Path | None, num_fewshot: int | None, limit: int | None) -> Task:
    return _choice_task("arc_easy", "arc_easy.jsonl", data_dir, num_fewshot, limit)


@TASKS.register("arc_challenge")
def arc_challenge(data_dir: Path | None, num_fewshot: int | None, limit: int | None) -> Task:
    return _choice_task("arc_challenge", "arc_challenge.jsonl", data_dir, num_fewshot, limit)


@TASKS.register("piqa")
def piqa(data_dir: Path | None, num_fewshot: int | None, limit: int | None) -> Task:
    return _choice_task("piqa", "piqa.jsonl", data_dir, num_fewshot, limit)


@TASKS.register("hellaswag")
def hellaswag(data_dir: Path | None, num_fewshot: int | None, limit: int | None) -> Task:
    shots = _no_fewshot("hellaswag", num_fewshot)
    rows = data.load_rows(data_dir, "hellaswag_val_full.txt.bz2", data.read_hellaswag)
    items = tuple(ChoiceItem(tuple((r["query"], " " + c) for c in r["choices"]), tuple(r["choices"]), r["gold"])
                  for r in first(rows, limit))
    return Task("hellaswag", "multiple_choice", items, ("acc", "acc_norm"), shots)


@TASKS.register("winogrande")
def winogrande(data_dir: Path | None, num_fewshot: int | None, limit: int | None) -> Task:
    shots = _no_fewshot("winogrande", num_fewshot)
    rows = data.load_rows(data_dir, "winogrande.jsonl", data.read_winogrande)
    items = tuple(
        ChoiceItem(requests=tuple((option, " " + r["continuation"]) for option in r["context_options"]),
                   choices=tuple(r["context_options"]), gold=r["gold"])
        for r in first(rows, limit))
    return Task("winogrande", "multiple_choice", items, ("acc",), shots)


def mmlu_question(row: dict) -> str:
    """lm-eval's MMLU ``doc_to_text``."""
    a, b, c, d = row["choices"]
    return f"{row['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def mmlu_prompt(subject: str, exemplars: Sequence[dict], row: dict) -> str:
    """Description, exemplars with their answer letters, then the question (lm-eval's fewshot_context)."""
    shots = "".join(f"{mmlu_question(ex)} {'ABCD'[ex['answer']]}\n\n" for ex in exemplars)
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return description + shots + mmlu_question(row)


@TASKS.register("mmlu")
def mmlu(data_dir: Path | None, num_fewshot: int | None, limit: int | None) -> Task:
    shots = 0 if num_fewshot is None else num_fewshot
    subjects = data.load_rows(data_dir, "mmlu.tar.xz", data.read_mmlu)
    items = []
    for subject, splits in subjects.items():
        if shots > len(splits["dev"]):
            raise EvalError(f"mmlu {subject} has {len(splits['dev'])} dev exemplars, fewer than num_fewshot={shots}")
        exemplars = splits["dev"][:shots]
        for row in first(splits["test"], limit):
            prompt = mmlu_prompt(subject, exemplars, row)
            items.append(ChoiceItem(tuple((prompt, " " + letter) for letter in "ABCD"), tuple("ABCD"),
                                    row["answer"], group=subject))
    return Task("mmlu", "multiple_choice", tuple(items), ("acc",), shots)


@TASKS.register("lambada_openai")
def lambada_openai(data_dir: Path | None, num_fewshot: int | None, limit: int | None) -> Task:
    shots = _no_fewshot("lambada_openai", num_fewshot)
    rows = data.load_rows(data_dir, "lambada_openai.jsonl", data.read_lambada)
    items = tuple(ContinuationItem(r["context"], " " + r["continuation"]) for r in first(rows, limit))
    return Task("lambada_openai", "loglikelihood", items, ("acc", "perplexity"), shots)


def gsm8k_question(row: dict) -> str:
    return f"Question: {row['context']}\nAnswer:"


def gsm8k_prompt(rows: Sequence[dict], index: int, shots: int) -> str:
    """The first ``shots`` other items as worked exemplars, then item ``index``'s question."""
    exemplars = [row for j, row in enumerate(rows) if j != index][:shots]
    text = "".join(f"{gsm8k_question(ex)} {ex['chain_of_thought']}\n#### {ex['answer']}\n\n" for ex in exemplars)
    return text + gsm8k_question(rows[index])


@TASKS.register("gsm8k")
def gsm8k(data_dir: Path | None, num_fewshot: int | None, limit: int | None) -> Task:
    shots = 5 if num_fewshot is None else num_fewshot
    rows = data.load_rows(data_dir, "gsm8k.jsonl", data.read_gsm8k)
    count = len(rows) if limit is None else min(limit, len(rows))
    items = tuple(GenerationItem(gsm8k_prompt(rows, i, shots), str(rows[i]["answer"])) for i in range(count))
    return Task("gsm8k", "generation", items, ("exact_match_strict", "exact_match_flexible"), shots, version="3.0",
                until=("Question:", "</s>", "<|im_end|>"), max_new_tokens=256, answer="gsm8k")


def build_task(name: str, data_dir: Path | None = None, num_fewshot: int | None = None,
               limit: int | None = None) -> Task:
    """The registered task ``name``; an unknown name is an error that lists the valid ones."""
    if name not in TASKS:
        raise EvalError(f"unknown eval task {name!r}; valid: {', '.join(TASKS.names())} "
                        "(or a path to a task YAML file, or a TaskSpec)")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"num_fewshot must be 0 or more, got {num_fewshot}")
    return TASKS.get(name)(data_dir, num_fewshot, limit)
