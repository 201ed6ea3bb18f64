"""Rebuild harmful.jsonl and harmless.jsonl from the downloaded registry packages.

Sources (see SOURCES.md):
  harmful  - AdvBench harmful_behaviors (520), as shipped in the PyRIT wheel:
               pip download --no-deps pyrit==1.1.0 -d DIR
  harmless - Alpaca-format demo set shipped in the LLaMA-Factory source tarball
             (the wheel does not contain it):
               pip download --no-deps --no-binary :all: llamafactory==0.9.5 -d DIR

Usage:
  python build_sets.py DIR/pyrit-1.1.0-py3-none-any.whl DIR/llamafactory-0.9.5.tar.gz [--out OUTDIR]

The archives may be given in any order. The sha256 of each source file inside
the archive is checked before anything is written. Output goes next to this
script unless --out is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import yaml

HARMFUL_MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
HARMFUL_SHA256 = "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0"
HARMLESS_MEMBER = "llamafactory-0.9.5/data/alpaca_en_demo.json"
HARMLESS_SHA256 = "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318"
MAX_ITEMS = 520


def read_member(archive: Path, member: str) -> bytes | None:
    """Return the bytes of `member` inside a wheel/zip or tar(.gz), or None."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            try:
                return zf.read(member)
            except KeyError:
                return None
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            try:
                f = tf.extractfile(member)
            except KeyError:
                return None
            return None if f is None else f.read()
    return None


def find_source(archives: list[Path], member: str, sha256: str) -> bytes:
    for archive in archives:
        data = read_member(archive, member)
        if data is None:
            continue
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            sys.exit(f"{archive}:{member}: sha256 {got} != expected {sha256}")
        return data
    sys.exit(f"{member} not found in any of: {', '.join(map(str, archives))}")


def harmful_items(data: bytes) -> list[str]:
    doc = yaml.safe_load(data.decode("utf-8"))
    assert doc["dataset_name"] == "adv_bench", doc.get("dataset_name")
    out: list[str] = []
    seen: set[str] = set()
    for seed in doc["seeds"]:
        text = seed["value"].strip()
        if text and text not in seen:  # keeps the original AdvBench order
            seen.add(text)
            out.append(text)
    return out[:MAX_ITEMS]


def harmless_items(data: bytes, n: int) -> list[str]:
    rows = json.loads(data.decode("utf-8"))
    texts = {
        row["instruction"].strip()
        for row in rows
        if not (row.get("input") or "").strip() and row["instruction"].strip()
    }
    key = lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest()  # noqa: E731
    return sorted(texts, key=key)[:n]


def write_jsonl(path: Path, texts: list[str]) -> None:
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    path.write_bytes(body.encode("utf-8"))
    print(f"wrote {path} ({len(texts)} items, sha256 {hashlib.sha256(body.encode()).hexdigest()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archives", nargs="+", type=Path, help="downloaded wheel / sdist files")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()

    harmful = harmful_items(find_source(args.archives, HARMFUL_MEMBER, HARMFUL_SHA256))
    harmless = harmless_items(find_source(args.archives, HARMLESS_MEMBER, HARMLESS_SHA256), len(harmful))
    overlap = set(harmful) & set(harmless)
    if overlap:
        sys.exit(f"harmful/harmless overlap: {sorted(overlap)}")

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "harmful.jsonl", harmful)
    write_jsonl(args.out / "harmless.jsonl", harmless)


if __name__ == "__main__":
    main()
