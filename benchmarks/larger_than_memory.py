"""Pruning and profiling a checkpoint several times larger than the memory allowed (CPU, any Linux machine).

A checkpoint of random bf16 weights with Qwen3-30B-A3B's layer shapes (hidden 2048, experts of 768,
top-8; ``--experts`` experts and ``--layers`` layers, vocabulary ``--vocab``, a byte tokenizer) is
written with ``benchmarks/scale.py``'s writer. CAP = the checkpoint's size / ``--ratio``. Then, as a
user runs them:

- ``moekit prune --keep-json`` (every second expert) under ``prlimit --as=CAP``: the address space of
  the process, where every allocation and every mapping counts; for contrast the in-memory path
  (``from_pretrained``, prune, ``save_pretrained``) under the same cap;
- ``moekit profile`` (no ``--sequential``) in a memory cgroup limited to CAP (the way containers and
  schedulers limit memory; needs root and the cgroup memory controller, else skipped and said): it
  should see the limit, choose layer by layer itself and write the profile the whole model gives
  without a cap (compared statistic by statistic); ``--whole-model`` under the same limit should be
  refused before loading.

Checked: exit statuses, the pruned output's tensors (the names the plan expects, and for a sample of
kept experts their bytes against the source's), the profiles' equality. Reported: time, peak RSS
(``ru_maxrss`` of the child), the cgroup's peak usage (page cache included), the cap.

What this does not show: speed under memory pressure from other processes, or a disk slower than this
machine's (the page cache holds part of the checkpoint; under the cgroup it is reclaimed as needed).

    python benchmarks/larger_than_memory.py        # 12 layers of 64 experts: about 7.4 GiB, cap 1.9 GiB

Writes benchmarks/results/larger-than-memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_child(cap: int, args: list[str]) -> dict:
    """Run ``args`` under ``prlimit --as=cap``: exit status, seconds, the child's peak RSS (``os.wait4``) and the
    last lines of its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(["prlimit", f"--as={cap}", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    err = proc.stderr.read()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return {"exit": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "stderr_tail": err.strip().splitlines()[-3:],
            "stdout_tail": out.strip().splitlines()[-2:]}


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def cgroup_available() -> bool:
    return CGROUP_V1.is_dir() and os.access(CGROUP_V1, os.W_OK)


def in_cgroup(cap: int, args: list[str]) -> dict:
    """Run ``args`` in a new memory cgroup (v1) limited to ``cap`` bytes, swap included where it can be set."""
    group = CGROUP_V1 / f"moekit-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}

        def join() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                preexec_fn=join)
        out, err = proc.communicate()
        result = {"exit": proc.returncode, "seconds": time.perf_counter() - start,
                  "cgroup_peak_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
                  "stderr_notes": [line for line in err.splitlines()
                                   if line.strip() and not line.startswith(("profiling", "\r"))][-12:],
                  "stdout_tail": out.strip().splitlines()[-2:]}
    finally:
        for _ in range(50):  # the killed child's memory is uncharged shortly after it exits
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return result


def compare_profiles(one: Path, two: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from moekit.profile import Profile

    a, b = Profile.load(one), Profile.load(two)
    worst = 0.0
    identical = True
    for layer, stats in a.layers.items():
        for name, tensor in stats.items():
            other = b.layers[layer][name]
            identical &= bool(torch.equal(tensor, other))
            worst = max(worst, float((tensor.double() - other.double()).abs().max()))
    return {"identical": identical, "max_abs_difference": worst,
            "sequential": [a.meta["options"].get("sequential"), b.meta["options"].get("sequential")]}


def in_memory_child(source: str, keep_file: str, out: str) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from moekit.edit import _prune_in_memory

    keep = {int(k): v for k, v in json.loads(Path(keep_file).read_text()).items()}
    _prune_in_memory(source, keep, Path(out))


def check_output(source: Path, out: Path, keep: dict[int, list[int]], samples: int = 6) -> dict:
    """The pruned checkpoint holds the kept experts, renumbered, byte for byte."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    src_index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    expert_names = [n for n in index if ".mlp.experts." in n]
    kept = len(next(iter(keep.values())))
    layers = len(keep)
    expected_expert_tensors = layers * kept * 3
    compared = 0
    for name in expert_names[:: max(1, len(expert_names) // samples)][:samples]:
        parts = name.split(".")
        layer, new_id = int(parts[2]), int(parts[5])
        old = name.replace(f".experts.{new_id}.", f".experts.{keep[layer][new_id]}.")
        with safe_open(str(out / index[name]), "pt") as a, safe_open(str(source / src_index[old]), "pt") as b:
            if not bool((a.get_tensor(name) == b.get_tensor(old)).all()):
                return {"ok": False, "why": f"{name} differs from the source's {old}"}
        compared += 1
    ok = len(expert_names) == expected_expert_tensors
    return {"ok": ok, "expert_tensors": len(expert_names), "expected_expert_tensors": expected_expert_tensors,
            "tensors": len(index), "sampled_experts_equal_to_source": compared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child-in-memory", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--ratio", type=float, default=4.0, help="checkpoint size / memory cap")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens of the profiles")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if args.child_in_memory:
        in_memory_child(*args.child_in_memory)
        return

    work = Path(tempfile.mkdtemp(prefix="moekit-capped-", dir=args.work))
    try:
        source = work / "source"
        start = time.perf_counter()
        build = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from scale import build; "
                 "from pathlib import Path; build(Path(sys.argv[2]), *map(int, sys.argv[3:6]), float(sys.argv[6]))",
                 str(ROOT / "benchmarks"), str(source), str(args.layers), str(args.experts), str(args.vocab),
                 str(args.shard_gb)]
        subprocess.run(build, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        sys.path.insert(0, str(ROOT / "src"))
        from moekit.tiny import byte_tokenizer

        byte_tokenizer().save_pretrained(str(source))
        built = time.perf_counter() - start
        checkpoint = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        cap = int(checkpoint / args.ratio)
        keep = {layer: list(range(0, args.experts, 2)) for layer in range(args.layers)}
        keep_file = work / "keep.json"
        keep_file.write_text(json.dumps({str(k): v for k, v in keep.items()}))
        streamed = peak_rss_child(cap, [sys.executable, "-m", "moekit", "prune", str(source), "--keep-json",
                                        str(keep_file), "--out", str(work / "pruned")])
        verified = check_output(source, work / "pruned", keep) if streamed["exit"] == 0 else {"ok": False}
        output = sum(f.stat().st_size for f in (work / "pruned").glob("*.safetensors")) \
            if streamed["exit"] == 0 else 0
        shutil.rmtree(work / "pruned", ignore_errors=True)
        in_memory = peak_rss_child(cap, [sys.executable, __file__, "--child-in-memory", str(source), str(keep_file),
                                         str(work / "pruned-memory")])
        shutil.rmtree(work / "pruned-memory", ignore_errors=True)
        profiles: dict = {"skipped": "no writable cgroup v1 memory controller (run as root on Linux)"}
        if cgroup_available():
            text = ROOT / "src" / "moekit" / "demo" / "texts" / "prose-calibration.jsonl"
            profile = [sys.executable, "-m", "moekit", "profile", str(source), "--data", f"prose={text}",
                       "--seq-len", str(args.seq_len), "--max-tokens", str(args.tokens), "--batch-size", "4"]
            reference = peak_rss_child(2**62, [*profile, "--whole-model", "--out", str(work / "p-whole")])
            auto = in_cgroup(cap, [*profile, "--out", str(work / "p-capped")])
            refused = in_cgroup(cap, [*profile, "--whole-model", "--out", str(work / "p-refused")])
            same = compare_profiles(work / "p-whole", work / "p-capped") \
                if reference["exit"] == 0 and auto["exit"] == 0 else {}
            profiles = {"uncapped_whole_model": reference, "capped_default": auto, "capped_whole_model": refused,
                        "equality": same, "refused_wrote_nothing": not (work / "p-refused").exists()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"benchmark": "prune_under_memory_cap", "args": {k: v for k, v in vars(args).items()
                                                              if k not in ("child_in_memory", "work")},
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "checkpoint_bytes": checkpoint, "cap_bytes": cap, "checkpoint_over_cap": checkpoint / cap,
              "output_bytes": output, "build_seconds": built,
              "streaming_prune": {**streamed, "output_check": verified},
              "in_memory_prune": in_memory, "profile": profiles}
    out_dir = ROOT / "benchmarks" / "results"
    (out_dir / "larger-than-memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "larger-than-memory.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    gib = 2**30
    s, m = r["streaming_prune"], r["in_memory_prune"]
    check = s["output_check"]
    lines = [
        "# Pruning and profiling a checkpoint larger than the memory allowed (CPU)", "",
        f"Written by `benchmarks/larger_than_memory.py` ({r['machine']['platform']}, {r['machine']['cpus']} "
        f"CPUs). Checkpoint: Qwen3-30B-A3B layer shapes, {r['args']['layers']} layers of {r['args']['experts']} "
        f"experts, random bf16 weights, {r['checkpoint_bytes'] / gib:.2f} GiB in shards of "
        f"{r['args']['shard_gb']} GB. Address space capped with `prlimit --as` at {r['cap_bytes'] / gib:.2f} GiB "
        f"(the checkpoint is {r['checkpoint_over_cap']:.1f} x the cap). Half the experts of every layer removed.",
        "",
        "| run | exit | seconds | peak RSS | result |",
        "|---|---|---|---|---|",
        f"| `moekit prune --keep-json` (streaming) | {s['exit']} | {s['seconds']:.1f} | "
        f"{s['peak_rss_bytes'] / gib:.2f} GiB | "
        + (f"{r['output_bytes'] / gib:.2f} GiB written; {check['expert_tensors']} expert tensors "
           f"(expected {check['expected_expert_tensors']}), {check['sampled_experts_equal_to_source']} sampled kept "
           "experts byte-equal to the source |" if check.get("ok") else "failed: " + " ".join(s["stderr_tail"]) + " |"),
        f"| in-memory path (`from_pretrained`, prune, `save_pretrained`) | {m['exit']} | {m['seconds']:.1f} | "
        f"{m['peak_rss_bytes'] / gib:.2f} GiB | "
        + ("completed" if m["exit"] == 0 else "failed: " + (m["stderr_tail"][-1] if m["stderr_tail"] else "")) + " |",
        "",
    ]
    p = r["profile"]
    if "skipped" in p:
        lines += [f"Profiling under a memory cgroup: skipped ({p['skipped']}).", ""]
    else:
        ref, auto, refused, same = (p["uncapped_whole_model"], p["capped_default"], p["capped_whole_model"],
                                    p["equality"])
        notes = [n for n in auto["stderr_notes"] if "as --sequential" in n or "ahead" in n]
        lines += [
            f"Profiling {r['args']['tokens']:,} calibration tokens (sequences of {r['args']['seq_len']}, batch 4), "
            f"in a memory cgroup limited to the same {r['cap_bytes'] / gib:.2f} GiB:", "",
            "| run | exit | seconds | peak | result |",
            "|---|---|---|---|---|",
            f"| `moekit profile --whole-model`, no limit (the reference) | {ref['exit']} | {ref['seconds']:.1f} | "
            f"RSS {ref['peak_rss_bytes'] / gib:.2f} GiB | |",
            f"| `moekit profile` under the limit | {auto['exit']} | {auto['seconds']:.1f} | cgroup "
            f"{auto['cgroup_peak_bytes'] / gib:.2f} GiB (page cache included) | "
            + "".join(f"said: \"{n.strip()}\"; " for n in notes)
            + (("statistics bit-identical to the reference" if same.get("identical") else
                f"statistics differ by up to {same.get('max_abs_difference')}") if same else "no profile") + " |",
            f"| `moekit profile --whole-model` under the limit | {refused['exit']} | {refused['seconds']:.1f} | "
            f"cgroup {refused['cgroup_peak_bytes'] / gib:.2f} GiB | "
            + (" ".join(refused["stderr_notes"][-1:]) if refused["exit"] else "ran") + " |", "",
        ]
    lines += ["Not shown: speed under memory pressure from other processes, or on a disk slower than this machine's "
              "(the page cache held part of the checkpoint).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
