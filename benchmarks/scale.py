"""Pruning at scale: the streaming editor against the in-memory path, on Qwen3-30B-A3B-shaped checkpoints.

A checkpoint of random bf16 weights with Qwen3-30B-A3B's shapes (hidden 2048, experts of 768, top-8,
32 query / 4 key-value heads of 128; 128 experts and 48 layers with ``--full``) is written at each
``--layers`` count, stored as transformers stores it (per-expert tensors, shards of ``--shard-gb``).
Half of the experts of every layer are then removed three ways, each in a fresh process:

- ``copy``: copying as many bytes as the pruned checkpoint holds from the source's shards (``cp``'s
  kernel copy): the floor any editor has to pay;
- ``stream``: ``moekit.edit.prune_to_checkpoint`` (the streaming editor);
- ``memory``: ``moekit.edit._prune_in_memory`` (``from_pretrained``, prune, ``save_pretrained``).

Each is repeated ``--repeats`` times; times are the work alone (imports and interpreter start excluded),
reported as the median and the spread (min..max), and as a multiple of the ``copy`` time. Peak RSS is
the child's ``ru_maxrss`` from ``os.wait4`` (this driver imports neither torch nor transformers, so the
little RSS a child inherits across exec is this driver's); ``structure`` is a child that only builds the
model on the meta device, the fixed cost both editors share. The page cache is warm (the checkpoint was
just written), so times measure the editors rather than the disk.

    python benchmarks/scale.py                      # CPU: 2 and 4 layers, 32 experts, vocab 32768
    python benchmarks/scale.py --full --layers 48   # the real shape (about 61 GB; needs ~130 GB RAM for memory)

Writes benchmarks/results/scale-<tag>.json and .md (``--tag``, default cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("copy", "stream", "memory")


def build(out: Path, layers: int, experts: int, vocab: int, shard_gb: float) -> None:
    """Write a random bf16 Qwen3-MoE checkpoint, one shard in memory at a time (child process)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    from transformers.core_model_loading import revert_weight_conversion

    config = Qwen3MoeConfig(
        hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=experts,
        num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, vocab_size=vocab, max_position_embeddings=40960, tie_word_embeddings=False,
        norm_topk_prob=True, dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"],
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    stored = revert_weight_conversion(model, model.state_dict())  # names and shapes as save_pretrained writes
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, limit, weight_map = 0, int(shard_gb * 2**30), {}
    names = sorted(stored)
    count = 1 + sum(1 for _ in _shard_breaks(names, stored, limit))
    out.mkdir(parents=True)
    index = 0
    for name in names:
        nbytes = stored[name].numel() * 2
        if shards[-1] and size + nbytes > limit:
            _write(out, shards.pop(), index, count, weight_map)
            shards.append({})
            index, size = index + 1, 0
        shards[-1][name] = (torch.randn(stored[name].shape, generator=gen) * 0.02).to(torch.bfloat16)
        size += nbytes
    _write(out, shards.pop(), index, count, weight_map)
    if count > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(out)


def _shard_breaks(names: list[str], stored: dict, limit: int):
    size = 0
    for name in names:
        nbytes = stored[name].numel() * 2
        if size and size + nbytes > limit:
            yield name
            size = 0
        size += nbytes


def _write(out: Path, tensors: dict, index: int, count: int, weight_map: dict) -> None:
    from safetensors.torch import save_file

    name = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})


def child(mode: str, source: Path, out: Path, kept_bytes: int) -> None:
    """One measured run; prints the seconds the work took."""
    if mode == "copy":
        start = time.perf_counter()
        out.mkdir()
        left = kept_bytes
        for i, shard in enumerate(sorted(source.glob("*.safetensors"))):
            with shard.open("rb") as src, (out / f"part{i}").open("wb") as dst:
                todo = min(left, shard.stat().st_size)
                left -= todo
                while todo:
                    todo -= os.copy_file_range(src.fileno(), dst.fileno(), todo)
        print(time.perf_counter() - start)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from moekit.arch import MoEModelView
    from moekit.edit import _prune_in_memory, prune_to_checkpoint
    from moekit.model_io import load_structure

    view = MoEModelView.from_model(load_structure(source))
    keep = {layer.index: list(range(0, layer.num_experts, 2)) for layer in view.layers}
    start = time.perf_counter()
    if mode == "stream":
        prune_to_checkpoint(source, keep, out)
    elif mode == "memory":
        _prune_in_memory(source, keep, out)
    print(time.perf_counter() - start)


def run_child(*args: str) -> tuple[float, int]:
    """(seconds printed by the child, its peak RSS in bytes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"child {args} failed with {proc.returncode}")
    return float(output.split()[-1]), usage.ru_maxrss * 1024


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(work: Path, layers: int, args: argparse.Namespace) -> dict:
    source = work / f"source-{layers}"
    start = time.perf_counter()
    run_child("build", str(source), str(layers), str(args.experts), str(args.vocab), str(args.shard_gb))
    built = time.perf_counter() - start
    _, structure_rss = run_child("structure", str(source), str(work / "none"), "0")
    probe = work / "probe"
    run_child("stream", str(source), str(probe), "0")
    kept = weight_bytes(probe)
    shutil.rmtree(probe)
    runs: dict[str, dict[str, list[float]]] = {m: {"seconds": [], "peak_rss": []} for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            out = work / f"out-{mode}"
            seconds, rss = run_child(mode, str(source), str(out), str(kept))
            runs[mode]["seconds"].append(seconds)
            runs[mode]["peak_rss"].append(rss)
            shutil.rmtree(out)
    checkpoint = weight_bytes(source)
    shutil.rmtree(source)
    copy = statistics.median(runs["copy"]["seconds"])
    result = {"layers": layers, "experts": args.experts, "vocab": args.vocab, "checkpoint_bytes": checkpoint,
              "kept_bytes": kept, "build_seconds": built, "structure_peak_rss": structure_rss, "modes": {}}
    for mode in MODES:
        seconds, rss = runs[mode]["seconds"], runs[mode]["peak_rss"]
        result["modes"][mode] = {"seconds": spread(seconds), "x_copy": spread([s / copy for s in seconds]),
                                 "peak_rss": spread(rss), "runs": runs[mode]}
    return result


def report(results: list[dict], args: argparse.Namespace) -> str:
    gb = 2**30
    lines = ["# Pruning at scale: streaming editor vs in-memory path", "",
             f"Qwen3-30B-A3B-shaped random bf16 checkpoints (hidden 2048, experts of 768, top-8), {args.experts} "
             f"experts per layer, vocab {args.vocab}; half of the experts removed. {args.repeats} runs each, fresh "
             "process per run, warm page cache. Time: median (min..max) of the work alone; x copy: time over the "
             "time of copying the kept bytes. Peak RSS: the child's ru_maxrss; structure: a child that only "
             f"builds the meta model. Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, Python {platform.python_version()}.", "",
             "| layers | checkpoint | kept | mode | time s | x copy | peak RSS GB | RSS above structure GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for mode, m in r["modes"].items():
            s, x, rss = m["seconds"], m["x_copy"], m["peak_rss"]
            above = (rss["median"] - r["structure_peak_rss"]) / gb
            lines.append(
                f"| {r['layers']} | {r['checkpoint_bytes'] / gb:.2f} GB | {r['kept_bytes'] / gb:.2f} GB | {mode} | "
                f"{s['median']:.2f} ({s['min']:.2f}..{s['max']:.2f}) | {x['median']:.2f} ({x['min']:.2f}.."
                f"{x['max']:.2f}) | {rss['median'] / gb:.2f} ({rss['min'] / gb:.2f}..{rss['max'] / gb:.2f}) | "
                f"{above:.2f} |")
    structure = ", ".join(f"{r['structure_peak_rss'] / gb:.2f} GB" for r in results)
    lines += ["", f"structure-only peak RSS: {structure}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="2,4", help="comma-separated layer counts")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--full", action="store_true", help="128 experts, vocab 151936 (Qwen3-30B-A3B)")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints are written (default: tmp)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "build":
            build(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), float(rest[4]))
            print(0.0)
        elif mode == "structure":
            child("none", Path(rest[0]), Path(rest[1]), 0)
        else:
            child(mode, Path(rest[0]), Path(rest[1]), int(rest[2]))
        return
    if args.full:
        args.experts, args.vocab = 128, 151936
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for layers in (int(x) for x in args.layers.split(",")):
            work = Path(tmp)
            result = measure(work, layers, args)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "modes"}), flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale-{args.tag}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": results}, indent=1) + "\n")
    (out / f"scale-{args.tag}.md").write_text(report(results, args))
    print(report(results, args))


if __name__ == "__main__":
    main()
