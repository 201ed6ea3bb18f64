"""Inputs that used to be accepted silently: a model directory without a tokenizer, and calibration
sets loaded with memory that followed the corpus size instead of the token budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moekit.data import DataError

NO_FILES = r"has no tokenizer files .*; pass --tokenizer DIR"


def without_tokenizer(model_dir: Path, out: Path) -> Path:
    """A copy of a saved model with every tokenizer file removed."""
    shutil.copytree(model_dir, out)
    for path in out.iterdir():
        if "token" in path.name or path.name in ("vocab.json", "merges.txt"):
            path.unlink()
    return out


# --- tokenizer --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])  # one loads an empty tokenizer, one fails obscurely
def test_model_without_tokenizer_files_is_a_clear_error(family: str, tiny_checkpoint, tmp_path) -> None:
    from moekit.profile.collect import load_tokenizer  # the name callers have imported so far

    bare = without_tokenizer(tiny_checkpoint(family), tmp_path / "bare")
    with pytest.raises(DataError, match=f"{bare} " + NO_FILES):
        load_tokenizer(bare)


def test_profile_of_a_model_without_tokenizer_fails_and_writes_nothing(tiny_checkpoint, tmp_path) -> None:
    from moekit.profile import profile_model

    bare = without_tokenizer(tiny_checkpoint("qwen3_moe"), tmp_path / "bare")
    (tmp_path / "d.txt").write_text("some calibration text " * 20)
    with pytest.raises(DataError, match=NO_FILES):  # it used to profile one EOS token per document, exit 0
        profile_model(bare, [f"d={tmp_path / 'd.txt'}"], tmp_path / "prof", seq_len=16, progress=False)
    assert not (tmp_path / "prof").exists()


def test_eval_of_a_model_without_tokenizer_fails_before_loading_it(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    import moekit.model_io
    from moekit.eval import TaskSpec, evaluate
    from moekit.pipeline import evaluate_model

    bare = without_tokenizer(tiny_checkpoint("qwen3_moe"), tmp_path / "bare")
    (tmp_path / "d.txt").write_text("some text to measure")

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(moekit.model_io, "load_model", no_weights)
    with pytest.raises(DataError, match=NO_FILES):
        evaluate_model(bare, texts={"t": tmp_path / "d.txt"}, progress=False)
    (tmp_path / "t.jsonl").write_text(json.dumps({"x": "hello"}) + "\n")
    spec = TaskSpec(name="t", kind="perplexity", data_path=tmp_path / "t.jsonl", text="{x}")
    with pytest.raises(DataError, match=NO_FILES):
        evaluate(str(bare), tasks=[spec], progress=False)


def test_saved_empty_tokenizer_is_refused(tiny_checkpoint, tmp_path) -> None:
    from transformers import AutoTokenizer

    from moekit.data import load_tokenizer

    bare = without_tokenizer(tiny_checkpoint("qwen3_moe"), tmp_path / "bare")
    AutoTokenizer.from_pretrained(str(bare)).save_pretrained(tmp_path / "empty")  # files, but no vocabulary
    with pytest.raises(DataError, match=r"the tokenizer loaded from .*empty is unusable: 1 tokens"):
        load_tokenizer(tmp_path / "empty")


def test_normal_tokenizer_loads_without_remote_code(tiny_checkpoint, monkeypatch) -> None:
    import transformers

    from moekit.data import load_tokenizer
    from moekit.profile import collect
    from moekit.tiny import byte_tokenizer

    model = tiny_checkpoint("qwen3_moe")
    tokenizer = load_tokenizer(model)
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == byte_tokenizer()("ab")["input_ids"]
    assert collect.load_tokenizer is load_tokenizer
    seen: list[dict] = []
    original = transformers.AutoTokenizer.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    load_tokenizer(model)
    load_tokenizer(model, trust_remote_code=True)
    assert [kwargs["trust_remote_code"] for kwargs in seen] == [False, True]


# --- calibration sets: memory follows the token budget, results as before ---------------------------------------------

EVAL = Path(__file__).resolve().parents[1] / "../shared/data/eval"
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "benchmarks/corpus/smollm2_tokenizer"
needs_eval = pytest.mark.skipif(not (EVAL / "gsm8k.jsonl").is_file(), reason=f"eval files not found in {EVAL}")


def eval_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (EVAL / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smollm2():
    from moekit.data import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)  # a real BPE tokenizer with a chat template


def reference_documents(path: Path, render) -> tuple[list[str], list[Path]]:
    """Every document, read the plain way: whole files, everything into one list."""
    if (path / "dataset_info.json").is_file():
        import datasets

        return [row["text"] for row in datasets.load_from_disk(str(path))], []
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts)) if path.is_dir() else [path]
    documents: list[str] = []
    skipped: list[Path] = []
    for file in files:
        try:
            if file.suffix == ".jsonl":
                with file.open(encoding="utf-8") as handle:
                    records = [json.loads(line) for line in handle if line.strip()]
                found = [r["text"] if "text" in r else render(r["messages"]) for r in records]
            elif file.suffix == ".parquet":
                import pyarrow.parquet as pq

                found = [row["text"] for row in pq.read_table(file).to_pylist()]
            else:
                found = [file.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            skipped.append(file)
            continue
        documents += found
    return documents, skipped


def reference_set(path: Path, tokenizer, seq_len: int, max_tokens: int | None, seed: int):
    """Read everything, shuffle the indices with the seed, pack; hash every document in reading order."""
    import hashlib
    import random

    from moekit.data import pack_documents

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False)

    documents, skipped = reference_documents(path, render)
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    ids, mask, used = pack_documents([documents[i] for i in order], tokenizer, seq_len, max_tokens)
    digest = hashlib.sha256()
    for text in documents:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return ids, mask, {"documents": len(documents), "documents_used": used,
                       "content_sha256": digest.hexdigest()[:16], "skipped_files": [str(p) for p in skipped]}


def write_jsonl(path: Path, records: list[dict], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + newline)
    return path


def gsm8k_texts() -> list[str]:
    return [row["context"] + "\n" + row["chain_of_thought"] for row in eval_rows("gsm8k.jsonl")]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Calibration paths of every kind, built from the real text of the shared eval files."""
    root = tmp_path_factory.mktemp("corpora")
    texts = gsm8k_texts()
    plain = write_jsonl(root / "gsm8k.jsonl", [{"text": t} for t in texts])
    with plain.open("a", encoding="utf-8") as handle:  # blank lines are not documents; blank texts are
        handle.write("\n   \n" + json.dumps({"text": "  \n"}) + "\n")
    write_jsonl(root / "crlf.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts[:300])], newline="\r\n")
    arc = eval_rows("arc_easy.jsonl")
    write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": row["query"]},
                                                    {"role": "assistant", "content": row["choices"][row["gold"]]}]}
                                      for row in arc[:800]])
    mixed = root / "mixed"
    for number, row in enumerate(eval_rows("human_eval.jsonl")[:60]):
        folder = mixed / "code" / f"part{number % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"task{number:03d}.py").write_text(row["prompt"] + row["canonical_solution"], encoding="utf-8")
    (mixed / "code" / "windows.txt").write_bytes(b"line one\r\nline two\r\n")
    write_jsonl(mixed / "gsm8k.jsonl", [{"text": t} for t in texts[:400]])
    (mixed / "binary.dat").write_bytes(bytes(range(256)) * 4)
    bad_jsonl = write_jsonl(mixed / "latin1.jsonl", [{"text": t} for t in texts[400:450]])
    with bad_jsonl.open("ab") as handle:  # valid lines first, then one in Latin-1: the whole file is skipped
        handle.write(json.dumps({"text": "café"}, ensure_ascii=False).encode("latin-1") + b"\n")
    (mixed / ".hidden.txt").write_text("never read")
    (mixed / "empty.txt").write_text("  \n")
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": [row["query"] for row in arc], "gold": [row["gold"] for row in arc]})
    table.to_parquet(str(mixed / "arc.parquet"), batch_size=97)  # several row groups
    table.to_parquet(str(root / "arc.parquet"), batch_size=97)
    table.save_to_disk(str(root / "saved"))
    return {"jsonl": plain, "crlf": root / "crlf.jsonl", "chat": root / "chat.jsonl", "mixed": mixed,
            "parquet": root / "arc.parquet", "saved": root / "saved"}


@needs_eval
@pytest.mark.parametrize("name", ["jsonl", "crlf", "chat", "mixed", "parquet", "saved"])
@pytest.mark.parametrize(("max_tokens", "seed"), [(3_000, 0), (60_000, 7), (None, 3)])
def test_calibration_set_is_what_reading_everything_gave(name: str, max_tokens: int | None, seed: int,
                                                         corpora, smollm2) -> None:
    import torch

    from moekit.data import DataSpec, load_calibration_set

    path = corpora[name]
    got = load_calibration_set(DataSpec(name, path), smollm2, 256, max_tokens, seed)
    ids, mask, description = reference_set(path, smollm2, 256, max_tokens, seed)
    assert torch.equal(got.input_ids, ids) and torch.equal(got.attention_mask, mask)
    assert {key: got.description[key] for key in description} == description
    if name == "mixed":
        assert description["skipped_files"] == [str(path / "binary.dat"), str(path / "latin1.jsonl")]


@needs_eval
def test_calibration_memory_follows_the_budget_not_the_corpus(tmp_path) -> None:
    """Loading 2k tokens from an 8 MB jsonl: only the documents packed (and a small index) are held."""
    import tracemalloc

    from moekit.data import DataSpec, load_calibration_set
    from moekit.tiny import byte_tokenizer

    texts = [row["context"] for row in eval_rows("lambada_openai.jsonl")]
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in texts * 5])
    assert path.stat().st_size > 8_000_000
    tokenizer = byte_tokenizer()
    tracemalloc.start()
    try:
        calibration = load_calibration_set(DataSpec("big", path), tokenizer, 256, 2_048)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calibration.num_tokens == 2_048 and calibration.description["documents"] == len(texts) * 5
    assert peak < 2_000_000, f"{peak:,} bytes traced at the peak for a {path.stat().st_size:,}-byte file"
