"""Compressed token shards and their manifest: writing them, and loading them back for training.

A shard file (`<domain>/<split>-NNNNN.tok.xz`) is an xz (LZMA) stream of two .npy arrays, one after the
other: `offsets` (int64, n_docs + 1, starting at 0) and `tokens` (uint16, the documents' token ids
concatenated). Document i is `tokens[offsets[i]:offsets[i + 1]]`. Only the standard library and numpy
read it; the bytes are deterministic (no timestamps), so the manifest's sha256 is reproducible.

Training code needs nothing else from this folder:

    import sys; sys.path.insert(0, "benchmarks/corpus")
    from shards import load_split
    split = load_split("benchmarks/corpus/out", "code_python", "train")
    stream = split.with_separator(split.separator_id)   # one uint16 array, <|endoftext|> between documents
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".tok.xz"
FORMAT = "moekit-corpus-shard-v1"
TOKEN_DTYPE = np.uint16  # SmolLM2's vocabulary has 49,152 ids
LZMA_PRESET = 9


def encode_shard(docs: Sequence[Sequence[int] | np.ndarray]) -> bytes:
    """xz-compressed bytes of a shard holding these documents (lists or arrays of token ids)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError("token ids must fit in uint16")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, offsets, allow_pickle=False)
    np.lib.format.write_array(buf, tokens.astype(TOKEN_DTYPE), allow_pickle=False)
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, preset=LZMA_PRESET)


def decode_shard(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16, offsets int64) of a shard's bytes; checks that the offsets describe the tokens."""
    buf = io.BytesIO(lzma.decompress(data))
    offsets = np.lib.format.read_array(buf, allow_pickle=False)
    tokens = np.lib.format.read_array(buf, allow_pickle=False)
    if offsets.dtype != np.int64 or tokens.dtype != TOKEN_DTYPE or offsets[0] != 0 or offsets[-1] != tokens.size:
        raise ValueError("corrupt shard: offsets do not match tokens")
    return tokens, offsets


def shard_name(split: str, index: int) -> str:
    """File name of a split's index-th shard."""
    return f"{split}-{index:05d}{SHARD_SUFFIX}"


def chunk_docs(docs: Sequence[Sequence[int]], max_tokens: int) -> Iterator[Sequence[Sequence[int]]]:
    """Consecutive groups of documents with at most max_tokens tokens each (a longer document goes alone)."""
    start, size = 0, 0
    for i, doc in enumerate(docs):
        if i > start and size + len(doc) > max_tokens:
            yield docs[start:i]
            start, size = i, 0
        size += len(doc)
    if start < len(docs):
        yield docs[start:]


def write_split(out_dir: Path, domain: str, split: str, docs: Sequence[Sequence[int]],
                max_tokens_per_shard: int = 2_000_000) -> list[dict]:
    """Write a split's documents as shards under out_dir/domain/; returns one manifest record per shard.

    Keeping shards to a few million tokens bounds the memory a reader needs and lets a transfer skip
    domains it does not want.
    """
    (out_dir / domain).mkdir(parents=True, exist_ok=True)
    records = []
    for index, group in enumerate(chunk_docs(docs, max_tokens_per_shard)):
        data = encode_shard(group)
        rel = f"{domain}/{shard_name(split, index)}"
        (out_dir / rel).write_bytes(data)
        records.append({"file": rel, "docs": len(group), "tokens": int(sum(len(d) for d in group)),
                        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return records


@dataclass
class TokenSplit:
    """The documents of one domain's split: token ids concatenated, and where each document starts."""

    tokens: np.ndarray  # uint16
    offsets: np.ndarray  # int64, n_docs + 1
    separator_id: int | None = None  # <|endoftext|>, from the manifest

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document i (a view, no copy)."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def docs(self) -> list[np.ndarray]:
        """All documents, as views into tokens."""
        return [self.doc(i) for i in range(self.n_docs)]

    def with_separator(self, separator_id: int | None = None) -> np.ndarray:
        """One stream for packed training: every document followed by the separator token."""
        sep = self.separator_id if separator_id is None else separator_id
        if sep is None:
            raise ValueError("no separator id given and none in the manifest")
        out = np.empty(self.n_tokens + self.n_docs, dtype=self.tokens.dtype)
        positions = self.offsets[1:] + np.arange(self.n_docs)  # where each separator goes
        mask = np.ones(out.size, dtype=bool)
        mask[positions] = False
        out[mask] = self.tokens
        out[positions] = sep
        return out


def load_manifest(out_dir: str | Path) -> dict:
    """The corpus manifest (token counts, files, sha256, sources) of a built corpus folder."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the corpus first (python benchmarks/corpus/build_corpus.py)")
    return json.loads(path.read_text())


def corpus_fingerprint(manifest: dict) -> dict:
    """What a corpus holds, in a few lines a record can carry: per split, a sha256 over every shard's name and
    sha256 (all domains), and the package version of every source.

    Two builds agree on a split exactly when its digest agrees. The build takes the Debian archive's current
    version of each package, so a later build can hold other text; a subset (``subset.py``) cuts the train split
    and keeps calibration and held-out, so their digests still match the corpus it was cut from.
    """
    lines: dict[str, list[str]] = {}
    sources: dict[str, str | None] = {}
    for domain in sorted(manifest["domains"]):
        info = manifest["domains"][domain]
        for split, sinfo in info["splits"].items():
            lines.setdefault(split, []).extend(f"{s['file']} {s['sha256']}" for s in sinfo["shards"])
        for source in info.get("sources", []):
            sources[source["source"]] = source.get("version")
    return {"splits": {split: hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest()
                       for split, v in sorted(lines.items())},
            "sources": dict(sorted(sources.items()))}


def load_split(out_dir: str | Path, domain: str, split: str, verify: bool = True) -> TokenSplit:
    """Load all shards of one domain's split (train / calibration / heldout) as a TokenSplit.

    With verify, each shard's sha256 is checked against the manifest, so a truncated transfer fails loudly.
    """
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    if domain not in manifest["domains"]:
        raise KeyError(f"domain {domain!r} not in corpus; have {sorted(manifest['domains'])}")
    splits = manifest["domains"][domain]["splits"]
    if split not in splits:
        raise KeyError(f"split {split!r} not in corpus; have {sorted(splits)}")
    token_parts, offset_parts, base = [], [np.zeros(1, np.int64)], 0
    for shard in splits[split]["shards"]:
        data = (out_dir / shard["file"]).read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ValueError(f"{shard['file']}: sha256 differs from the manifest (corrupt or partial copy)")
        tokens, offsets = decode_shard(data)
        token_parts.append(tokens)
        offset_parts.append(offsets[1:] + base)
        base += tokens.size
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, TOKEN_DTYPE)
    return TokenSplit(tokens, np.concatenate(offset_parts), manifest.get("tokenizer", {}).get("separator_id"))


def verify_corpus(out_dir: str | Path) -> list[str]:
    """Problems found when every shard is re-read and compared to the manifest (empty list: all good)."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    problems = []
    for domain, info in manifest["domains"].items():
        for split, sinfo in info["splits"].items():
            try:
                loaded = load_split(out_dir, domain, split)
            except (OSError, ValueError) as exc:
                problems.append(f"{domain}/{split}: {exc}")
                continue
            if loaded.n_tokens != sinfo["tokens"] or loaded.n_docs != sinfo["docs"]:
                problems.append(f"{domain}/{split}: {loaded.n_tokens} tokens / {loaded.n_docs} docs on disk, "
                                f"manifest says {sinfo['tokens']} / {sinfo['docs']}")
    return problems
