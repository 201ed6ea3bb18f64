"""Data-parallel profiling under torchrun: throughput over N processes, and the same profile as one.

A checkpoint of random bf16 weights shaped like Qwen3-30B-A3B but shrunk for a CPU (Qwen3-MoE; by default
hidden 512, experts of 192, 64 experts, top-8, 8 query / 1 key-value heads of 64, 4 layers, vocab 32768,
``moekit.tiny``'s byte tokenizer, shards of ``--shard-mb``) is written once, with the calibration text
(``benchmarks/data/parallel/en.jsonl`` by default: real prose, one token per byte). For every N of
``--nprocs`` and both modes (``whole``: the model at once; ``sequential``: one decoder layer at a time from
the shards) it runs, in a fresh process group each time,

    torchrun --standalone --nproc-per-node N -m moekit profile MODEL --data en=TEXT --device DEVICE --out DIR

(each rank runs every N-th batch; the accumulators are all-reduced; rank 0 writes the profile). On the CPU
every rank gets ``cores // N`` threads (OMP_NUM_THREADS / MKL_NUM_THREADS), so the N ranks share the same
cores and the speed-up, not the efficiency, is the CPU figure; on GPUs (``--device cuda``) every rank has a
card and NCCL does the all-reduce. Repeated ``--repeats`` times, the order of the N alternating between
repeats.

Time: moekit's own, the ``timing`` of the profile's ``profile.json`` (rank 0, from the first batch to the
all-reduced accumulators on the CPU: model loading, tokenising and the interpreter start excluded; layer
loading included for ``sequential``); tokens/s is all ranks' tokens over it. The subprocess' wall time is
kept too. Reported per (mode, N): tokens/s median (min..max), the speed-up tokens/s(N) / tokens/s(1) of the
same mode and repeat, and the scaling efficiency speed-up / N. Equality: the largest relative difference
(max |a - b| / max |a| per tensor) of every statistic of every run against the first N=1 whole-model profile.

    python benchmarks/profile_data_parallel.py                         # CPU, gloo: N = 1 2
    python benchmarks/profile_data_parallel.py --device cuda --nprocs 1 2 4 8 --layers 8   # GPUs, NCCL

Writes benchmarks/results/profile_data_parallel-<device>.json and .md (``--tag``, default the device).
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
MODES = ("whole", "sequential")


def build(out: Path, args: argparse.Namespace) -> dict:
    """Write the random bf16 Qwen3-MoE checkpoint with the byte tokenizer; return its shape."""
    import torch

    from moekit.tiny import build_tiny_model, byte_tokenizer

    shape = {"hidden_size": args.hidden, "moe_intermediate_size": args.moe_intermediate,
             "intermediate_size": 3 * args.hidden, "num_hidden_layers": args.layers,
             "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
             "vocab_size": args.vocab, "norm_topk_prob": True}
    model = build_tiny_model("qwen3_moe", num_experts=args.experts, top_k=args.top_k, **shape)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, max_shard_size=f"{args.shard_mb}MB")
    byte_tokenizer().save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return {"model_type": "qwen3_moe", "num_experts": args.experts, "num_experts_per_tok": args.top_k, **shape,
            "parameters": parameters, "dtype": "bfloat16",
            "shards": len(list(out.glob("*.safetensors"))),
            "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def calibration_text(work: Path, args: argparse.Namespace) -> Path:
    """``--data`` if it exists, else the CPython standard library's .py files, concatenated."""
    if args.data.exists():
        return args.data
    text = work / "stdlib.txt"
    sources = sorted(Path(os.__file__).parent.glob("*.py"))
    with text.open("w") as out:
        size = 0
        for source in sources:
            if size > 2 * args.max_tokens:
                break
            body = source.read_text(errors="replace")
            out.write(body + "\n")
            size += len(body.encode())
    return text


def launcher() -> list[str]:
    """torchrun of this interpreter (``python -m torch.distributed.run`` is what the ``torchrun`` script runs)."""
    return [sys.executable, "-m", "torch.distributed.run"]


def run_profile(model: Path, text: Path, out: Path, n: int, mode: str, threads: int,
                args: argparse.Namespace) -> dict:
    """One torchrun; moekit's timing from the profile it wrote, and the subprocess' wall time."""
    command = [*launcher(), "--standalone", f"--nproc-per-node={n}", "-m", "moekit", "profile", str(model),
               "--data", f"en={text}", "--seq-len", str(args.seq_len), "--max-tokens", str(args.max_tokens),
               "--batch-size", str(args.batch_size), "--device", args.device, "--out", str(out),
               "--sequential" if mode == "sequential" else "--whole-model"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"torchrun N={n} {mode} failed with {proc.returncode}: {' '.join(command)}")
    meta = json.loads((out / "profile.json").read_text())
    timing = meta["timing"]
    if meta["options"].get("world_size") != n:
        raise SystemExit(f"the profile says world_size {meta['options'].get('world_size')}, expected {n}")
    return {"seconds": timing["seconds"], "tokens_per_second": timing["tokens_per_second"], "wall_seconds": wall,
            "tokens": sum(s["tokens"] for s in meta["sets"]), "sequences": sum(s["sequences"] for s in meta["sets"]),
            "load_average_before": load, "command": portable(command, model, out)}


def portable(command: list[str], model: Path, out: Path) -> list[str]:
    """The command as recorded: no paths of this machine (MODEL, DIR, paths relative to the repository)."""
    return [c.replace(str(model), "MODEL").replace(str(out), "DIR").replace(f"{ROOT}/", "")
            .replace(sys.executable, "python") for c in command]


def differences(reference, other) -> dict[str, float]:
    """Per statistic: the largest relative difference over the layers (max |a - b| / max |a| of each tensor)."""
    worst: dict[str, float] = {}
    for layer, stats in reference.layers.items():
        for name, tensor in stats.items():
            a, b = tensor.double(), other.layers[layer][name].double()
            scale = float(a.abs().max())
            diff = float((a - b).abs().max())
            rel = diff / scale if scale > 0 else diff
            worst[name] = max(worst.get(name, 0.0), rel)
    return worst


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict[str, float], digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}..{s['max']:,.{digits}f})"


def versions() -> dict[str, str]:
    import torch
    import transformers

    import moekit

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "moekit": getattr(moekit, "__version__", "?")}


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {len(os.sched_getaffinity(0))} cores"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return text


def measure(args: argparse.Namespace, work: Path) -> dict:
    from moekit.profile import Profile
    from moekit.profile.stats import reduction

    model = work / "model"
    started = time.perf_counter()
    shape = build(model, args)
    text = calibration_text(work, args)
    print(f"built {model} in {time.perf_counter() - started:.1f} s: {json.dumps(shape)}", flush=True)
    runs: dict[str, dict[int, list[dict]]] = {m: {n: [] for n in args.nprocs} for m in MODES}
    threads = {n: max(1, args.cores // n) for n in args.nprocs}
    reference = None
    diffs: dict[str, dict[int, dict[str, float]]] = {m: {n: {} for n in args.nprocs} for m in MODES}
    for repeat in range(args.repeats):
        order = list(args.nprocs) if repeat % 2 == 0 else list(reversed(args.nprocs))
        for n in order:
            for mode in MODES:
                out = work / f"profile-{mode}-{n}-{repeat}"
                run = run_profile(model, text, out, n, mode, threads[n], args)
                run["repeat"] = repeat
                runs[mode][n].append(run)
                print(f"repeat {repeat} N={n} {mode}: {run['tokens_per_second']:,.0f} tokens/s, "
                      f"{run['seconds']:.2f} s (wall {run['wall_seconds']:.1f} s, load before "
                      f"{run['load_average_before']:.2f})", flush=True)
                if reference is None:  # the first N = 1 whole-model profile (an extra run if N = 1 is not asked)
                    ref_dir = work / "reference"
                    if n == 1 and mode == "whole":
                        shutil.copytree(out, ref_dir)
                    else:
                        run_profile(model, text, ref_dir, 1, "whole", threads.get(1, args.cores), args)
                    reference = Profile.load(ref_dir)
                for name, value in differences(reference, Profile.load(out)).items():
                    diffs[mode][n][name] = max(diffs[mode][n].get(name, 0.0), value)
                shutil.rmtree(out)
    table = []
    for mode in MODES:
        one = {r["repeat"]: r["tokens_per_second"] for r in runs[mode].get(1, [])}
        for n in args.nprocs:
            tps = [r["tokens_per_second"] for r in runs[mode][n]]
            row = {"mode": mode, "nprocs": n, "threads_per_rank": threads[n], "tokens_per_second": spread(tps),
                   "seconds": spread([r["seconds"] for r in runs[mode][n]]),
                   "wall_seconds": spread([r["wall_seconds"] for r in runs[mode][n]])}
            if one:
                speedups = [r["tokens_per_second"] / one[r["repeat"]] for r in runs[mode][n]]
                row["speedup"] = spread(speedups)
                row["efficiency"] = spread([s / n for s in speedups])
            d = diffs[mode][n]
            row["max_relative_difference"] = {
                "sums": max((v for k, v in d.items() if reduction(k) == "sum"), default=0.0),
                "maxima": max((v for k, v in d.items() if reduction(k) != "sum"), default=0.0),
                "per_statistic": dict(sorted(d.items())),
            }
            table.append(row)
    first = runs[MODES[0]][args.nprocs[0]][0]
    return {"shape": shape, "tokens": first["tokens"], "sequences": first["sequences"],
            "batches": -(-first["sequences"] // args.batch_size), "threads_per_rank": threads,
            "data": str(text.relative_to(ROOT) if text.is_relative_to(ROOT) else text.name),
            "command_example": " ".join(["torchrun", *first["command"][3:]]), "table": table, "runs": runs}


def report(record: dict, args: argparse.Namespace) -> str:
    shape, device = record["shape"], args.device
    cpu = not device.startswith("cuda")
    lines = [f"# Data-parallel profiling under torchrun ({device}, {'gloo' if cpu else 'NCCL'})", "",
             f"Machine: {record['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
             + ".", "",
             f"Model: random bf16 Qwen3-MoE shaped like Qwen3-30B-A3B, shrunk: hidden {shape['hidden_size']}, "
             f"{shape['num_experts']} experts of {shape['moe_intermediate_size']}, top-{shape['num_experts_per_tok']}, "
             f"{shape['num_attention_heads']} query / {shape['num_key_value_heads']} key-value heads of "
             f"{shape['head_dim']}, {shape['num_hidden_layers']} layers, vocab {shape['vocab_size']} "
             f"({shape['parameters'] / 1e6:.0f} M parameters, {shape['shards']} shards of at most {args.shard_mb} MB); "
             "byte tokenizer.", "",
             f"Data: `{record['data']}`, {record['tokens']:,} tokens in {record['sequences']} sequences of "
             f"{args.seq_len}, batch {args.batch_size} ({record['batches']} batches). Threads per rank: "
             + ", ".join(f"N={n}: {t}" for n, t in record["threads_per_rank"].items())
             + f" (OMP_NUM_THREADS = {args.cores} cores // N). {args.repeats} repeats, N order alternating.", "",
             f"Command: `{record['command_example']}` (`--sequential` for sequential).", "",
             "Time: moekit's own `timing` from the profile's profile.json (rank 0, first batch to the all-reduced "
             "accumulators; model loading, tokenising and interpreter start excluded; layer loading included for "
             "sequential). Median (min..max) over the repeats. Speed-up: tokens/s(N) / tokens/s(1) of the same mode "
             "and repeat; efficiency: speed-up / N. Equality: largest relative difference of any statistic against "
             "the first N=1 whole-model profile, over every repeat.", "",
             "| mode | N | threads/rank | tokens/s | speed-up | efficiency | profile s | wall s | max rel. diff sums "
             "| max rel. diff maxima |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["table"]:
        speedup = fmt(row["speedup"], 2) if "speedup" in row else "-"
        efficiency = fmt(row["efficiency"], 2) if "efficiency" in row else "-"
        d = row["max_relative_difference"]
        lines.append(f"| {row['mode']} | {row['nprocs']} | {row['threads_per_rank']} | "
                     f"{fmt(row['tokens_per_second'])} | {speedup} | {efficiency} | {fmt(row['seconds'], 2)} | "
                     f"{fmt(row['wall_seconds'], 1)} | {d['sums']:.3g} | {d['maxima']:.3g} |")
    worst = max(row["max_relative_difference"]["sums"] for row in record["table"])
    lines += ["", f"Equality: largest relative difference of any sum over all runs {worst:.3g} (goal 1e-12: "
              f"{'reached' if worst <= 1e-12 else 'NOT reached'}); maxima "
              f"{max(row['max_relative_difference']['maxima'] for row in record['table']):.3g}. Per statistic: "
              "the JSON file.", ""]
    if cpu:
        lines += ["What this does not show: no GPU and no NCCL (gloo all-reduce on the CPU); the N ranks share the "
                  f"same {args.cores} cores, each with cores // N threads, so the efficiency here is not the GPU "
                  "figure (where every rank has its own card): the speed-up says what splitting the batches over "
                  "processes costs or gains on one shared CPU (thread scaling inside one process against process "
                  "parallelism). Another process's load on the machine, if any, shows in the spread (the JSON keeps "
                  "the 1-minute load average before every run).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU cores to share among the ranks (threads per rank: cores // N)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=192)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "parallel" / "en.jsonl",
                        help="calibration text (if missing: the standard library's .py files)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=65536, help="16 batches of 8 x 512 by default")
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint goes (default: tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        record = measure(args, Path(tmp))
    record = {"benchmark": "profile_data_parallel", "device": args.device, "machine": machine(args.device),
              "versions": versions(), "args": {k: str(v) for k, v in vars(args).items()}, **record}
    tag = args.tag or args.device.split(":")[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_data_parallel-{tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = report(record, args)
    (args.out / f"profile_data_parallel-{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
