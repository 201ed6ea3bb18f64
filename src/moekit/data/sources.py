"""Reading calibration text: documents from files, directories, jsonl, parquet and saved datasets.

A *source* is one path. What it holds decides how it is read:

- a ``.jsonl`` file: one JSON object per line with a ``text`` string, or a ``messages`` list
  (chat turns ``{"role", "content"}``) rendered with the tokenizer's chat template;
- a ``.parquet`` file: a ``text`` or ``messages`` column, read the same way;
- a directory written by ``datasets.Dataset.save_to_disk`` (it holds ``dataset_info.json`` or
  ``dataset_dict.json``): the same columns; of a ``DatasetDict`` the ``train`` split, or its only split;
- any other directory: every file in it (recursively, sorted, hidden files skipped), each read by
  these rules; files that are not UTF-8 text (images, compiled files) are skipped and listed;
- any other file: plain UTF-8 text, one document.

Every error names the file (and line) and says what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.errors import UserError

RenderChat = Callable[[list[dict[str, Any]]], str]


class DataError(UserError):
    """Calibration data is missing, unreadable or not in a form moekit reads."""


class NotTextError(DataError):
    """A file is not UTF-8 text."""


@dataclass(frozen=True)
class DataSpec:
    """A named calibration set: ``NAME=PATH`` on the command line (``PATH`` alone names it after the file)."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        name, sep, path = text.partition("=")
        if not sep:
            name, path = Path(text).stem or "data", text
        name = name.strip()
        if not name or not path:
            raise DataError(f"--data {text!r}: expected NAME=PATH (for example code=./my_code_dir)")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise DataError(f"--data {text!r}: the set name {name!r} may hold only letters, digits, '-' and '_'")
        return cls(name, Path(path))


def _document(record: Any, where: str, render_chat: RenderChat | None) -> str:
    if isinstance(record, dict):
        text = record.get("text")
        if isinstance(text, str):
            return text
        messages = record.get("messages")
        if isinstance(messages, list):
            if render_chat is None:
                raise DataError(f"{where}: 'messages' need a tokenizer with a chat template to be rendered")
            return render_chat(messages)
        raise DataError(f"{where}: no 'text' string and no 'messages' list (found keys: {sorted(record)})")
    raise DataError(f"{where}: expected a JSON object with a 'text' field, found {type(record).__name__}")


def _read_jsonl(path: Path, render_chat: RenderChat | None) -> Iterator[str]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            yield _document(record, f"{path}:{number}", render_chat)


def _read_table(rows: Iterator[dict[str, Any]], where: str, render_chat: RenderChat | None) -> Iterator[str]:
    for number, row in enumerate(rows):
        yield _document(row, f"{where} row {number}", render_chat)


def _read_parquet(path: Path, render_chat: RenderChat | None) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several kinds for a damaged file
        raise DataError(f"{path}: cannot read as parquet: {err}") from None
    columns = [c for c in ("text", "messages") if c in table.column_names]
    if not columns:
        raise DataError(f"{path}: no 'text' or 'messages' column (columns: {table.column_names})")
    yield from _read_table(iter(table.select(columns).to_pylist()), str(path), render_chat)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_saved_dataset(path: Path, render_chat: RenderChat | None) -> Iterator[str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: cannot load with datasets.load_from_disk: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise DataError(f"{path}: a DatasetDict with splits {splits} and no 'train'; save the split you "
                            "want on its own")
    columns = [c for c in ("text", "messages") if c in loaded.column_names]
    if not columns:
        raise DataError(f"{path}: no 'text' or 'messages' column (columns: {loaded.column_names})")
    yield from _read_table(iter(loaded.select_columns(columns)), str(path), render_chat)


class _open_text:
    """Open a UTF-8 text file with an error that names it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Any:
        try:
            self.handle = self.path.open(encoding="utf-8")
        except OSError as err:
            raise DataError(f"cannot read {self.path}: {err.strerror}") from None
        return self

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.handle
        except UnicodeDecodeError:
            raise NotTextError(f"{self.path} is not UTF-8 text") from None

    def read(self) -> str:
        try:
            return str(self.handle.read())
        except UnicodeDecodeError:
            raise NotTextError(f"{self.path} is not UTF-8 text") from None

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def _files(directory: Path) -> list[Path]:
    found = []
    for path in sorted(directory.rglob("*")):
        parts = path.relative_to(directory).parts
        if path.is_file() and not any(part.startswith(".") for part in parts):
            found.append(path)
    return found


def read_documents(path: str | Path, render_chat: RenderChat | None = None,
                   skipped: list[Path] | None = None) -> Iterator[str]:
    """Every document in ``path``, in a fixed order (see the module docstring for the formats).

    Files of a directory that are not UTF-8 text are skipped and appended to ``skipped``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"calibration data {path} does not exist")
    if path.is_dir():
        if _is_saved_dataset(path):
            yield from _read_saved_dataset(path, render_chat)
            return
        files = _files(path)
        if not files:
            raise DataError(f"calibration directory {path} holds no files")
        for file in files:
            try:
                documents = list(read_documents(file, render_chat))
            except NotTextError:
                if skipped is not None:
                    skipped.append(file)
                continue
            yield from documents
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, render_chat)
    elif suffix == ".parquet":
        yield from _read_parquet(path, render_chat)
    else:
        with _open_text(path) as handle:
            yield handle.read()
