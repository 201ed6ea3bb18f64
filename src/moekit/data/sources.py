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

``read_documents`` gives the documents; ``scan`` gives each with where it is (a byte offset, a row
number), from which ``read_again`` reads it later, so that ``moekit.data.index`` can shuffle a set
without holding it.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
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


# A document found by ``scan``: (position, line bytes, text), what ``read_again`` needs to find it again.
# jsonl: the byte offset and the byte size of its line; parquet and saved datasets: the row number
# and 0; a text file: 0 and 0.
Found = tuple[int, int, str]


@dataclass(frozen=True)
class Source:
    """One thing documents are read from: a file, or a saved dataset directory, and how to read it."""

    path: Path
    kind: str  # "text", "jsonl", "parquet" or "dataset"


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def _jsonl_document(line: str, where: str, render_chat: RenderChat | None) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    return _document(record, where, render_chat)


def _scan_jsonl(path: Path, render_chat: RenderChat | None) -> Iterator[Found]:
    offset = 0
    # newline="": lines keep their own endings (\n, \r\n or \r), so their UTF-8 sizes add up to byte offsets
    with _open_text(path, newline="") as handle:
        for number, line in enumerate(handle, 1):
            size = len(line.encode("utf-8"))
            if line.strip():
                yield offset, size, _jsonl_document(line, f"{path}:{number}", render_chat)
            offset += size


def _parquet_file(path: Path) -> tuple[Any, list[str]]:
    """The open ``pyarrow.parquet.ParquetFile`` and the document columns it has."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several kinds for a damaged file
        raise DataError(f"{path}: cannot read as parquet: {err}") from None
    names = parquet.schema_arrow.names
    columns = [c for c in ("text", "messages") if c in names]
    if not columns:
        raise DataError(f"{path}: no 'text' or 'messages' column (columns: {names})")
    return parquet, columns


def _parquet_records(parquet: Any, columns: list[str], path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a parquet file, batch by batch, so that only a slice of the file is in memory at a time."""
    try:
        for batch in parquet.iter_batches(batch_size=1024, columns=columns):
            yield from batch.to_pylist()
    except Exception as err:  # pyarrow raises several kinds for a damaged file
        raise DataError(f"{path}: cannot read as parquet: {err}") from None


def _scan_parquet(path: Path, render_chat: RenderChat | None) -> Iterator[Found]:
    parquet, columns = _parquet_file(path)
    for row, record in enumerate(_parquet_records(parquet, columns, path)):
        yield row, 0, _document(record, f"{path} row {row}", render_chat)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _saved_dataset(path: Path) -> Any:
    """The document columns of a saved dataset (memory-mapped by ``datasets``, not read into memory)."""
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
    return loaded.select_columns(columns)


def _scan_dataset(path: Path, render_chat: RenderChat | None) -> Iterator[Found]:
    for row, record in enumerate(_saved_dataset(path)):
        yield row, 0, _document(record, f"{path} row {row}", render_chat)


def _scan_text(path: Path) -> Iterator[Found]:
    with _open_text(path) as handle:
        yield 0, 0, handle.read()


def scan(source: Source, render_chat: RenderChat | None = None) -> Iterator[Found]:
    """Every document of one source, in order, with what it takes to find it again (see ``Found``)."""
    if source.kind == "jsonl":
        return _scan_jsonl(source.path, render_chat)
    if source.kind == "parquet":
        return _scan_parquet(source.path, render_chat)
    if source.kind == "dataset":
        return _scan_dataset(source.path, render_chat)
    return _scan_text(source.path)


def _read_lines(path: Path, offsets: Sequence[int], sizes: Sequence[int], render_chat: RenderChat | None) -> list[str]:
    """The documents of the jsonl lines at byte ``offsets`` (``sizes`` bytes each)."""
    documents = []
    try:
        with path.open("rb") as handle:
            for offset, size in zip(offsets, sizes, strict=True):
                handle.seek(offset)
                line = handle.read(size).decode("utf-8")
                documents.append(_jsonl_document(line, f"{path} (the line at byte {offset})", render_chat))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} again ({err}); did it change while the set was loaded?") from None
    return documents


def _read_parquet_rows(path: Path, rows: Sequence[int], render_chat: RenderChat | None) -> list[str]:
    """Each row group that ``rows`` (ascending) fall in is decoded once, and only its document columns."""
    parquet, columns = _parquet_file(path)
    counts = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    starts = [0, *itertools.accumulate(counts)]
    documents = []
    for group, in_group in itertools.groupby(rows, key=lambda row: bisect.bisect_right(starts, row) - 1):
        wanted = list(in_group)
        try:
            table = parquet.read_row_group(group, columns=columns)
            records = table.take([row - starts[group] for row in wanted]).to_pylist()
        except Exception as err:  # pyarrow raises several kinds for a damaged file
            raise DataError(f"{path}: cannot read as parquet: {err}") from None
        documents += [_document(record, f"{path} row {row}", render_chat)
                      for row, record in zip(wanted, records, strict=True)]
    return documents


def read_again(source: Source, positions: Sequence[int], line_bytes: Sequence[int],
               render_chat: RenderChat | None = None) -> list[str]:
    """The documents of ``source`` that ``scan`` found at ``positions`` (ascending), read again."""
    if source.kind == "jsonl":
        return _read_lines(source.path, positions, line_bytes, render_chat)
    if source.kind == "parquet":
        return _read_parquet_rows(source.path, positions, render_chat)
    if source.kind == "dataset":
        rows = _saved_dataset(source.path)
        return [_document(rows[row], f"{source.path} row {row}", render_chat) for row in positions]
    with _open_text(source.path) as handle:
        return [handle.read() for _ in positions]


class _open_text:
    """Open a UTF-8 text file with an error that names it."""

    def __init__(self, path: Path, newline: str | None = None) -> None:
        self.path = path
        self.newline = newline

    def __enter__(self) -> Any:
        try:
            self.handle = self.path.open(encoding="utf-8", newline=self.newline)
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


def sources(path: str | Path) -> tuple[list[Source], bool]:
    """The sources a calibration path stands for, in reading order, and whether they are a directory's
    files (then a file that is not UTF-8 text is skipped rather than an error)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"calibration data {path} does not exist")
    if not path.is_dir():
        return [Source(path, _kind(path))], False
    if _is_saved_dataset(path):
        return [Source(path, "dataset")], False
    files = _files(path)
    if not files:
        raise DataError(f"calibration directory {path} holds no files")
    return [Source(file, _kind(file)) for file in files], True


def read_documents(path: str | Path, render_chat: RenderChat | None = None,
                   skipped: list[Path] | None = None) -> Iterator[str]:
    """Every document in ``path``, in a fixed order (see the module docstring for the formats).

    Files of a directory that are not UTF-8 text are skipped and appended to ``skipped``.
    """
    found, in_directory = sources(path)
    for source in found:
        if not in_directory:
            yield from (text for _, _, text in scan(source, render_chat))
            continue
        try:  # a file is read whole before its documents are given out, so a skipped file gives none
            documents = [text for _, _, text in scan(source, render_chat)]
        except NotTextError:
            if skipped is not None:
                skipped.append(source.path)
            continue
        yield from documents
