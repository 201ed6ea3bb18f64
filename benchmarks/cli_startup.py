"""How long the CLI takes to answer ``--help`` and ``--version`` (it imports torch and transformers only when a
command needs them).

Each command runs in a fresh interpreter (``python -m moekit ...``), once to warm the file cache, then
``--repeats`` times in turn with the others; wall time per run, reported as median and min .. max. Also
recorded: whether a bare ``import moekit.cli`` imports torch or transformers.

    python benchmarks/cli_startup.py

Writes benchmarks/results/cli_startup.json and .md. Timings on a shared 2-core machine are noisy: read the
spread.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--version"], ["--help"], ["profile", "--help"], ["prune", "--help"], ["eval", "--help"])


def run_once(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moekit", *args], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    for args in COMMANDS:
        run_once(args)  # warm-up
    runs: dict[str, list[float]] = {" ".join(a): [] for a in COMMANDS}
    for _ in range(repeats):
        for args in COMMANDS:
            runs[" ".join(args)].append(run_once(args))
    code = "import json, sys, moekit.cli; print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers')}))"
    probe = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    imported = json.loads(probe.stdout)
    result = {"benchmark": "cli_startup", "repeats": repeats, "python": platform.python_version(),
              "platform": platform.platform(), "cpus": os.cpu_count(), "imports_on_cli_import": imported,
              "seconds": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                          for k, v in runs.items()}}
    out = ROOT / "benchmarks" / "results"
    (out / "cli_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# CLI start-up time", "",
             f"Written by `benchmarks/cli_startup.py` ({result['platform']}, {result['cpus']} CPUs, Python "
             f"{result['python']}): wall time of `python -m moekit ...` in a fresh interpreter, {repeats} runs each "
             "after one warm-up, commands in turn.", "",
             "| command | median s | min .. max s |", "|---|---:|---:|"]
    for name, s in result["seconds"].items():
        lines.append(f"| `moekit {name}` | {s['median']:.2f} | {s['min']:.2f} .. {s['max']:.2f} |")
    lines += ["", f"`import moekit.cli` imports torch: {imported['torch']}, transformers: {imported['transformers']} "
              "(they load when a command that needs them runs).", ""]
    (out / "cli_startup.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
