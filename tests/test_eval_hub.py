"""Built-in tasks from the hub when no local benchmark folder is there (moekit.eval.hub).

No network here: ``hub._load`` (the one call of ``datasets.load_dataset``) is replaced by the hub's rows in the
hub datasets' own schema, rebuilt from the local files by the inverse mapping written out below; a task built
from them must equal the task built from the local files item for item.
"""

from __future__ import annotations

import os

import pytest

from moekit.eval import EvalError, build_task, hub
from moekit.eval import data as eval_data

DATA = eval_data.default_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "arc_easy.jsonl").is_file(), reason=f"eval files not found in {DATA}")
LIMIT = 20


def _arc(path):
    docs = []
    for row in eval_data.read_choice_file(path):
        labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
        docs.append({"question": row["query"].removeprefix("Question: "),
                     "choices": {"text": row["choices"], "label": labels}, "answerKey": labels[row["gold"]]})
    return docs


def _piqa(path):
    return [{"goal": row["query"].removeprefix("Question: ").removesuffix("\n"), "sol1": row["choices"][0],
             "sol2": row["choices"][1], "label": row["gold"]} for row in eval_data.read_choice_file(path)]


def _winogrande(path):
    docs = []
    for row in eval_data.read_winogrande(path):
        a, b = row["context_options"]
        common = os.path.commonprefix([a, b])  # noqa: RUF071 -- strings, character by character, as meant
        prefix = common[:common.rfind(" ") + 1]
        docs.append({"sentence": prefix + "_ " + row["continuation"], "option1": a[len(prefix):],
                     "option2": b[len(prefix):], "answer": str(row["gold"] + 1)})
    return docs


def _lambada(path):
    return [{"text": row["context"] + " " + row["continuation"]} for row in eval_data.read_lambada(path)]


def _gsm8k(path):
    return [{"question": row["context"], "answer": row["chain_of_thought"] + "\n#### " + row["answer"]}
            for row in eval_data.read_gsm8k(path)]


def _hellaswag(path):
    return [{**doc, "label": str(doc["label"])} for doc in eval_data.read_hellaswag_raw(path)]


def _mmlu(path, split):
    return [{"subject": subject, **row} for subject, splits in eval_data.read_mmlu(path).items()
            for row in splits[split]]


HUB = {
    ("allenai/ai2_arc", "ARC-Easy", "test"): lambda: _arc(DATA / "arc_easy.jsonl"),
    ("allenai/ai2_arc", "ARC-Challenge", "test"): lambda: _arc(DATA / "arc_challenge.jsonl"),
    ("baber/piqa", None, "validation"): lambda: _piqa(DATA / "piqa.jsonl"),
    ("Rowan/hellaswag", None, "validation"): lambda: _hellaswag(DATA / "hellaswag_val_full.txt.bz2"),
    ("allenai/winogrande", "winogrande_xl", "validation"): lambda: _winogrande(DATA / "winogrande.jsonl"),
    ("EleutherAI/lambada_openai", "default", "test"): lambda: _lambada(DATA / "lambada_openai.jsonl"),
    ("openai/gsm8k", "main", "test"): lambda: _gsm8k(DATA / "gsm8k.jsonl"),
    ("cais/mmlu", "all", "test"): lambda: _mmlu(DATA / "mmlu.tar.xz", "test"),
    ("cais/mmlu", "all", "dev"): lambda: _mmlu(DATA / "mmlu.tar.xz", "dev"),
}


@pytest.fixture
def no_local_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(eval_data.DATA_ENV, raising=False)
    monkeypatch.setattr(eval_data, "default_data_dir", lambda: tmp_path / "no-eval-files")
    calls = []

    def load(path, name, split):
        calls.append((path, name, split))
        return HUB[(path, name, split)]()

    monkeypatch.setattr(hub, "_load", load)
    return calls


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada_openai",
                                  "gsm8k", "mmlu"])
def test_a_built_in_task_from_the_hub_equals_the_task_from_the_local_file(task, no_local_folder) -> None:
    local = build_task(task, DATA, limit=LIMIT)
    from_hub = build_task(task, limit=LIMIT)
    assert no_local_folder, "the hub was not asked"
    if task == "winogrande":  # the inverse mapping above assumes the blank follows a space; compare those items
        pairs = [(a, b) for a, b in zip(local.items, from_hub.items, strict=True)]
        same = [a == b for a, b in pairs]
        assert sum(same) >= LIMIT - 3, same
    else:
        assert from_hub.items == local.items
    assert from_hub.num_fewshot == local.num_fewshot and len(from_hub.items) == len(local.items)


def test_without_local_files_or_hub_the_error_names_data_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(eval_data.DATA_ENV, raising=False)
    monkeypatch.setattr(eval_data, "default_data_dir", lambda: tmp_path / "no-eval-files")

    def offline(path, name, split):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode)")

    monkeypatch.setattr(hub, "_load", offline)
    with pytest.raises(EvalError, match=r"arc_easy.jsonl not found.*--data-dir FOLDER.*from the hub instead "
                                        r"\(allenai/ai2_arc ARC-Easy.*ConnectionError"):
        build_task("arc_easy", limit=2)


def test_a_named_folder_is_never_replaced_by_the_hub(tmp_path, monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the hub must not be asked when the user named a folder")

    monkeypatch.setattr(hub, "_load", refuse)
    with pytest.raises(EvalError, match=r"not found in .*--data-dir"):
        build_task("piqa", tmp_path, limit=2)
    monkeypatch.setenv(eval_data.DATA_ENV, str(tmp_path))
    with pytest.raises(EvalError, match="not found in"):
        build_task("piqa", limit=2)


def test_hub_rows_are_checked_like_local_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(eval_data.DATA_ENV, raising=False)
    monkeypatch.setattr(eval_data, "default_data_dir", lambda: tmp_path / "no-eval-files")
    bad = [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"},
           {"question": "q", "choices": {"text": ["only one"], "label": ["A"]}, "answerKey": "A"}]
    monkeypatch.setattr(hub, "_load", lambda *args: bad)
    with pytest.raises(EvalError, match=r"hub copy of arc_easy\.jsonl item 2"):
        build_task("arc_easy")
