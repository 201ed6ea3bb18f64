"""Turning documents into fixed-length token sequences for profiling.

Packing: documents are shuffled with the seed, tokenised one by one (no special tokens, an EOS
token after each document where the tokenizer has one, and a BOS token before each where it adds
one by default) and concatenated into one stream that is cut into sequences of ``seq_len``. We
stop once ``max_tokens`` tokens are taken, so a huge corpus is never tokenised in full. The last
sequence is padded on the right; its ``attention_mask`` is 0 on padding, and every statistic
skips those positions. As in the REAP and llm-compressor calibration loaders, attention crosses
document boundaries inside a packed sequence (no per-document masks).

Documents are read lazily, in the shuffled order (see ``moekit.data.index``), so memory follows the
token budget, not the size of the corpus.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.data.index import index_documents
from moekit.data.sources import DataError, DataSpec


@dataclass
class CalibrationSet:
    """One named set, packed: ``input_ids`` and ``attention_mask`` are ``[sequences, seq_len]``."""

    name: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])


def _special(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return int(value) if isinstance(value, int) else None


def pack_documents(documents: Iterable[str], tokenizer: Any, seq_len: int, max_tokens: int | None,
                   name: str = "data") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, documents used) for ``documents`` packed into ``seq_len`` rows."""
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    eos, bos = _special(tokenizer, "eos"), _special(tokenizer, "bos")
    add_bos = bos is not None and bool(getattr(tokenizer, "add_bos_token", False))
    budget = max_tokens if max_tokens is not None else float("inf")
    stream = array("q")  # 8 bytes a token; a list of ints takes 36
    used = 0
    for text in documents:
        if len(stream) >= budget:
            break
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if add_bos:
            ids = [bos, *ids]
        if eos is not None:
            ids = [*ids, eos]
        stream.extend(ids)
        used += 1
    if not stream:
        raise DataError(f"calibration set {name!r} holds no text (every document is empty)")
    if len(stream) > budget:
        del stream[int(budget):]
    rows = -(-len(stream) // seq_len)
    pad = _special(tokenizer, "pad")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    input_ids = torch.full((rows * seq_len,), pad, dtype=torch.long)
    input_ids[: len(stream)] = torch.frombuffer(stream, dtype=torch.long)
    mask = torch.zeros(rows * seq_len, dtype=torch.long)
    mask[: len(stream)] = 1
    return input_ids.view(rows, seq_len), mask.view(rows, seq_len), used


def load_calibration_set(spec: DataSpec, tokenizer: Any, seq_len: int, max_tokens: int | None,
                         seed: int = 0) -> CalibrationSet:
    """Index, shuffle (seeded) and pack one named set, reading documents only until ``max_tokens`` are packed."""
    render = None
    if getattr(tokenizer, "chat_template", None):
        def render(messages: list[dict[str, Any]]) -> str:
            return str(tokenizer.apply_chat_template(messages, tokenize=False))
    index = index_documents(spec.path, render)
    skipped = index.skipped
    if not len(index):
        raise DataError(f"calibration set {spec.name!r} ({spec.path}) holds no documents"
                        + (f" ({len(skipped)} files skipped: not UTF-8 text)" if skipped else ""))
    order = array("q", range(len(index)))  # 8 bytes a document; shuffled exactly as a list would be
    random.Random(seed).shuffle(order)
    input_ids, mask, used = pack_documents(index.read(order), tokenizer, seq_len, max_tokens, spec.name)
    description = {
        "path": str(spec.path.resolve()), "documents": len(index), "documents_used": used,
        "content_sha256": index.content_sha256, "seq_len": seq_len, "max_tokens": max_tokens, "seed": seed,
        "skipped_files": [str(p) for p in skipped],
    }
    return CalibrationSet(spec.name, input_ids, mask, description)
