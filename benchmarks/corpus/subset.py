"""A smaller copy of a built corpus, for a transfer with a size limit (the GPU machine takes 64 MiB).

Calibration and held-out shards are copied unchanged; each domain's training split is cut to its first
documents holding at most ``--train-tokens`` tokens (re-encoded as one shard). The manifest is the
original's with the training shards, token and document counts replaced and a ``subset`` entry saying
what was kept, so ``shards.load_split`` reads and verifies the copy like the original.

    python benchmarks/corpus/subset.py --corpus benchmarks/corpus/out --out benchmarks/corpus/gpu \
        --train-tokens 600000
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

from shards import MANIFEST, load_manifest, load_split, write_split


def write_subset(corpus: Path, out: Path, train_tokens: int, domains: list[str] | None = None) -> dict:
    """Write the subset to ``out`` (must not exist); returns its manifest."""
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    manifest = load_manifest(corpus)
    kept = copy.deepcopy(manifest)
    kept["domains"] = {}
    out.mkdir(parents=True)
    for domain in domains or sorted(manifest["domains"]):
        info = copy.deepcopy(manifest["domains"][domain])
        for split, sinfo in info["splits"].items():
            if split == "train":
                docs, total = [], 0
                for doc in load_split(corpus, domain, split).docs():
                    if total + len(doc) > train_tokens:
                        break
                    docs.append(doc)
                    total += len(doc)
                sinfo["shards"] = write_split(out, domain, split, docs, max_tokens_per_shard=train_tokens)
                sinfo["docs"], sinfo["tokens"] = len(docs), total
            else:
                (out / domain).mkdir(exist_ok=True)
                for shard in sinfo["shards"]:
                    shutil.copyfile(corpus / shard["file"], out / shard["file"])
        kept["domains"][domain] = info
    kept["subset"] = {"of": str(corpus), "train_tokens_per_domain": train_tokens,
                      "note": "train split cut to its first documents; calibration and held-out unchanged"}
    (out / MANIFEST).write_text(json.dumps(kept, indent=1) + "\n")
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-tokens", type=int, default=600_000, help="training tokens kept per domain")
    parser.add_argument("--domains", nargs="*", default=None)
    args = parser.parse_args()
    manifest = write_subset(args.corpus, args.out, args.train_tokens, args.domains)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out}: {len(manifest['domains'])} domains, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
