"""Where the documents of a calibration set are, so that a set is shuffled and packed without holding it.

``load_calibration_set`` shuffles every document of a set, then packs them until the token budget
is reached. Reading them all into a list for that made memory follow the corpus (a 79 MB jsonl
cost 67 MB more than an 8 MB one for the same 200k tokens). ``index_documents`` instead makes one
streaming pass that keeps, per document, where it is (20 bytes: its source, a byte offset or row
number, a size) and folds its hash into the set's ``content_sha256``; ``DocumentIndex.read`` then
reads documents again in any order, a group at a time, so memory follows what is packed.

Groups start at 64 KiB of text and double (up to 16 MiB): what is read beyond the budget is at most
about what was packed, and a parquet row group is decoded a few times (once per group it serves),
not once per document.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.data.sources import NotTextError, RenderChat, Source, read_again, scan, sources

FIRST_GROUP_BYTES = 64 << 10
LAST_GROUP_BYTES = 16 << 20


@dataclass
class DocumentIndex:
    """Every document of a calibration path, in reading order: its source, position and size."""

    sources: list[Source]
    render_chat: RenderChat | None = None
    source: array = field(default_factory=lambda: array("i"))  # index into ``sources``
    position: array = field(default_factory=lambda: array("q"))  # jsonl: byte offset; parquet, dataset: row
    size: array = field(default_factory=lambda: array("q"))  # jsonl: the line's bytes; else the text's UTF-8 bytes
    skipped: list[Path] = field(default_factory=list)  # files of a directory that are not UTF-8 text
    digest: Any = field(default_factory=hashlib.sha256)

    def __len__(self) -> int:
        return len(self.position)

    @property
    def content_sha256(self) -> str:
        """The set's fingerprint: sha256 over every document's sha256, in reading order (16 hex digits)."""
        return str(self.digest.hexdigest()[:16])

    def add(self, source: int, position: int, line_bytes: int, text: str) -> None:
        data = text.encode("utf-8")
        self.digest.update(hashlib.sha256(data).digest())
        self.source.append(source)
        self.position.append(position)
        self.size.append(line_bytes or len(data))

    def truncate(self, count: int, digest: Any) -> None:
        """Forget the documents after the first ``count`` (``digest``: the hash state at that point)."""
        del self.source[count:], self.position[count:], self.size[count:]
        self.digest = digest

    def read(self, order: Sequence[int]) -> Iterator[str]:
        """The documents numbered ``order``, in that order, read again one group at a time."""
        start, group_bytes = 0, FIRST_GROUP_BYTES
        while start < len(order):
            stop = self._group_end(order, start, group_bytes)
            group = [order[i] for i in range(start, stop)]
            texts = self._read_group(group)
            for number in group:
                yield texts.pop(number)
            start, group_bytes = stop, min(2 * group_bytes, LAST_GROUP_BYTES)

    def _group_end(self, order: Sequence[int], start: int, group_bytes: int) -> int:
        """Where the group from ``start`` ends: at least one document, then up to ``group_bytes``."""
        stop, total = start, 0
        while stop < len(order) and (stop == start or total < group_bytes):
            total += self.size[order[stop]]
            stop += 1
        return stop

    def _read_group(self, group: list[int]) -> dict[int, str]:
        by_source: dict[int, list[int]] = {}
        for number in sorted(group, key=self.position.__getitem__):
            by_source.setdefault(self.source[number], []).append(number)
        texts: dict[int, str] = {}
        for index, numbers in by_source.items():
            found = read_again(self.sources[index], [self.position[n] for n in numbers],
                               [self.size[n] for n in numbers], self.render_chat)
            texts.update(zip(numbers, found, strict=True))
        return texts


def index_documents(path: str | Path, render_chat: RenderChat | None = None) -> DocumentIndex:
    """One streaming pass over ``path`` (the formats of ``read_documents``, the same documents in the same
    order): where each document is, and the set's hash. Documents are hashed and dropped as they are read."""
    found, in_directory = sources(path)
    index = DocumentIndex(found, render_chat)
    for number, source in enumerate(found):
        count, digest = len(index), index.digest.copy()
        try:
            for position, line_bytes, text in scan(source, render_chat):
                index.add(number, position, line_bytes, text)
        except NotTextError:
            if not in_directory:
                raise
            index.truncate(count, digest)  # a file of a directory that is not text gives no documents
            index.skipped.append(source.path)
    return index
