"""Fault injection: every writing command killed, interrupted, terminated and run out of disk space.

For each command (profile, profile merge, prune, prune --plan-only, apply, report, eval --json, run) on
the bundled demo model (19 MB, two shards), one clean run is timed and checked, then each fault is
injected into a fresh run with the same target:

- ``kill@mid``: SIGKILL at half the clean run's wall time (usually during the computation);
- ``kill@write+0`` / ``+50ms`` / ``+200ms``: SIGKILL right after the output's temporary appears, i.e.
  while the output is being written (the hardest moment);
- ``sigint@write`` / ``sigterm@write``: Ctrl-C / SIGTERM while writing: exit 130 / 143 with one line;
- ``disk-full``: the target on a small tmpfs filled so that only half the output fits (ENOSPC; where
  tmpfs cannot be mounted, a file-size limit gives EFBIG instead, said in the results): exit 2 with a
  message and no traceback.

After each fault: the sources (model, data, profiles, plans, recipe) must be byte-identical (sha256);
the target must be absent or complete (it loads); after a killed run, the same command is run again
and must succeed and leave no temporary behind (the leftover of the killed run is removed). A case is
*handled* when all of this holds. Counts and every case go to benchmarks/results/faults.{json,md}.

    python benchmarks/faults.py            # ~10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import moekit
from moekit.demo import MODEL_DIR, TEXTS_DIR
from moekit.environment import versions

RESULTS = Path(__file__).resolve().parent / "results"


def digest(paths: list[Path]) -> str:
    """sha256 over every file (relative name and bytes) under ``paths``."""
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            h.update(str(file).encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def complete(target: Path, kind: str) -> bool:
    """Whether ``target`` is a whole, loadable output of ``kind``."""
    try:
        if kind == "file":
            json.loads(target.read_text())
            return True
        if not (target / ".moekit-output.json").is_file():
            return False
        if kind == "profile":
            from moekit.profile import Profile

            Profile.load(target)
        elif kind == "checkpoint":
            from safetensors import safe_open

            from moekit.model_io import check_weight_files, load_config

            load_config(target)
            check_weight_files(target)
            shards = sorted(target.glob("*.safetensors"))
            for shard in shards:
                with safe_open(str(shard), "pt") as handle:
                    for name in handle.keys():
                        handle.get_slice(name)
            return bool(shards) and (target / "moekit_plan.json").is_file()
        elif kind == "report":
            return (target / "report.md").stat().st_size > 0 and (target / "report.html").stat().st_size > 0
        elif kind == "run":
            return complete(target / "model", "checkpoint") and complete(target / "profile", "profile")
        return True
    except Exception:
        return False


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f".{target.name}.*"))


def setup(work: Path) -> dict[str, Any]:
    """The demo model and texts copied to ``work``, two profiles and a plan made by moekit itself."""
    model = work / "model"
    shutil.copytree(MODEL_DIR, model)
    code, prose = work / "code.jsonl", work / "prose.jsonl"
    shutil.copy(TEXTS_DIR / "code-calibration.jsonl", code)
    shutil.copy(TEXTS_DIR / "prose-calibration.jsonl", prose)
    prof, prof2, plan = work / "prof", work / "prof2", work / "plan.json"
    for out, data in ((prof, f"code={code}"), (prof2, f"prose={prose}")):
        cli("profile", model, "--data", data, "--seq-len", 128, "--max-tokens", 8192, "--out", out, check=True)
    cli("prune", model, "--profile", prof, "--method", "reap", "--ratio", 0.5, "--plan-only", "--out", plan,
        check=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(f"model: {model}\nout: TARGET\nprofile: {{data: {{code: {code}}}, seq_len: 128, "
                      "max_tokens: 8192}\nprune: {method: frequency, ratio: 0.5}\n")
    return {"model": model, "code": code, "prose": prose, "prof": prof, "prof2": prof2, "plan": plan,
            "recipe": recipe, "sources": [model, code, prose, prof, prof2, plan, recipe]}


def commands(w: dict[str, Any], target: Path) -> dict[str, tuple[str, list[Any]]]:
    """name -> (output kind, argv after ``moekit``)."""
    recipe = w["recipe"].with_name(f"recipe-{target.parent.name}.yaml")
    recipe.write_text(w["recipe"].read_text().replace("TARGET", str(target)))
    return {
        "profile": ("profile", ["profile", w["model"], "--data", f"code={w['code']}", "--data", f"prose={w['prose']}",
                                "--seq-len", 128, "--max-tokens", 16384, "--out", target]),
        "profile merge": ("profile", ["profile", "merge", w["prof"], w["prof2"], "--out", target]),
        "prune": ("checkpoint", ["prune", w["model"], "--profile", w["prof"], "--method", "reap", "--ratio", 0.5,
                                 "--out", target]),
        "prune --plan-only": ("file", ["prune", w["model"], "--profile", w["prof"], "--method", "frequency",
                                       "--ratio", 0.5, "--plan-only", "--out", target]),
        "apply": ("checkpoint", ["apply", w["model"], w["plan"], "--out", target]),
        "report": ("report", ["report", "--profile", w["prof"], "--plan", w["plan"], "--out", target]),
        "eval --json": ("file", ["eval", w["model"], "--text", f"code={w['code']}", "--max-length", 128,
                                 "--json", target]),
        "run": ("run", ["run", recipe]),
    }


def cli(*args: Any, check: bool = False, preexec: Callable[[], None] | None = None) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "moekit.cli", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=preexec,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    if check:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"setup failed: moekit {' '.join(map(str, args))}\n{err}")
    return process


def wait_for_temporary(process: subprocess.Popen, target: Path, timeout: float) -> bool:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            return False
        if any(".moekit-tmp-" in name for name in leftovers(target)):
            return True
        time.sleep(0.002)
    return False


class DiskFull:
    """A tmpfs holding the target, filled so that ``free`` bytes remain (or, unmountable, a file-size limit)."""

    def __init__(self, root: Path, free: int) -> None:
        self.root, self.free, self.mounted = root, free, False

    def __enter__(self) -> DiskFull:
        self.root.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(self.root)],
                              capture_output=True)
        self.mounted = done.returncode == 0
        if self.mounted:
            stat = os.statvfs(self.root)
            filler = stat.f_bavail * stat.f_frsize - self.free
            with open(self.root / "filler", "wb") as handle:
                handle.truncate(0)
                handle.write(b"\0" * max(filler, 0))
        return self

    def preexec(self) -> Callable[[], None] | None:
        if self.mounted:
            return None
        limit = max(self.free, 4096)
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.root)], check=False)


def output_bytes(target: Path) -> int:
    if target.is_file():
        return target.stat().st_size
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def run_case(w: dict[str, Any], name: str, fault: str, clean_seconds: float, size: int, root: Path) -> dict[str, Any]:
    case_dir = root / f"{name.replace(' ', '_').replace('-', '')}-{fault.replace('@', '_').replace('+', 'p')}"
    disk = DiskFull(case_dir, size // 2) if fault == "disk-full" else None
    if disk is None:
        case_dir.mkdir(parents=True)
    else:
        disk.__enter__()
    target = case_dir / "target"
    kind, argv = commands(w, target)[name]
    before = digest(w["sources"])
    record: dict[str, Any] = {"command": name, "fault": fault}
    try:
        process = cli(*argv, preexec=disk.preexec() if disk else None)
        expected_rc: int | None = None
        if fault == "kill@mid":
            time.sleep(clean_seconds / 2)
            process.send_signal(signal.SIGKILL)
        elif fault != "disk-full":
            found = wait_for_temporary(process, target, timeout=clean_seconds * 3 + 30)
            record["hit_write"] = found
            delay = {"kill@write+0": 0, "kill@write+50ms": 0.05, "kill@write+200ms": 0.2}.get(fault, 0)
            time.sleep(delay)
            sig = {"sigint@write": signal.SIGINT, "sigterm@write": signal.SIGTERM}.get(fault, signal.SIGKILL)
            if process.poll() is None:
                process.send_signal(sig)
            expected_rc = {signal.SIGINT: 130, signal.SIGTERM: 143}.get(sig)
        else:
            expected_rc = 2
        _, stderr = process.communicate(timeout=600)
        record["returncode"] = process.returncode
        finished = process.returncode == 0  # the run won the race: it completed before the signal
        record["finished_before_fault"] = finished
        record["traceback"] = "Traceback" in stderr
        record["message"] = stderr.strip().splitlines()[-1][:200] if stderr.strip() else ""
        record["exit_as_expected"] = finished or expected_rc is None or process.returncode == expected_rc
        record["sources_unchanged"] = digest(w["sources"]) == before
        record["target_state"] = "absent" if not target.exists() else (
            "complete" if complete(target, kind) else "partial")
        record["leftovers_after_fault"] = [n for n in leftovers(target) if n != "filler"]
        if fault.startswith("kill"):
            if disk is None and target.exists():
                argv = [*argv, "--overwrite"]
            rerun = cli(*argv)
            _, rerr = rerun.communicate(timeout=600)
            record["rerun_returncode"] = rerun.returncode
            record["rerun_removed_leftovers"] = "leftover" in rerr
            record["leftovers_after_rerun"] = leftovers(target)
            record["target_after_rerun"] = "complete" if complete(target, kind) else "not complete"
        left = record.get("leftovers_after_rerun", record["leftovers_after_fault"])
        record["left_behind"] = bool(left) or record["target_state"] == "partial"
        record["data_lost"] = not record["sources_unchanged"]
        record["handled"] = (not record["left_behind"] and not record["data_lost"] and record["exit_as_expected"]
                             and not record["traceback"] and record.get("rerun_returncode", 0) == 0
                             and record.get("target_after_rerun", "complete") == "complete")
        if disk is not None:
            record["disk_full_mechanism"] = "tmpfs (ENOSPC)" if disk.mounted else "RLIMIT_FSIZE (EFBIG)"
    finally:
        if disk is not None:
            disk.__exit__()
    return record


FAULTS = ("kill@mid", "kill@write+0", "kill@write+50ms", "kill@write+200ms", "sigint@write", "sigterm@write",
          "disk-full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="command names to run (default: all)")
    args = parser.parse_args()
    cases: list[dict[str, Any]] = []
    clean: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="moekit-faults-") as tmp:
        work = Path(tmp)
        w = setup(work / "inputs")
        names = args.only or list(commands(w, work / "probe" / "target"))
        for name in names:
            target = work / "clean" / name.replace(" ", "_") / "target"
            target.parent.mkdir(parents=True)
            kind, argv = commands(w, target)[name]
            start = time.perf_counter()
            cli(*argv, check=True)
            seconds = time.perf_counter() - start
            clean[name] = {"seconds": round(seconds, 2), "output_bytes": output_bytes(target),
                           "complete": complete(target, kind)}
            print(f"{name}: clean run {seconds:.1f} s, {clean[name]['output_bytes']:,} bytes", flush=True)
            for fault in FAULTS:
                record = run_case(w, name, fault, seconds, clean[name]["output_bytes"], work / "cases")
                cases.append(record)
                print(f"  {fault:18s} rc={record['returncode']:>4} target={record['target_state']:8s} "
                      f"handled={record['handled']}", flush=True)
    write_results(cases, clean)


def write_results(cases: list[dict[str, Any]], clean: dict[str, dict[str, Any]]) -> None:
    """Counts over ``cases`` and every case, to benchmarks/results/faults.{json,md}."""
    left = [c for c in cases if c["leftovers_after_fault"]]
    summary = {"cases": len(cases), "handled": sum(c["handled"] for c in cases),
               "data_lost": sum(c["data_lost"] for c in cases), "left_behind": sum(c["left_behind"] for c in cases),
               "finished_before_fault": sum(bool(c.get("finished_before_fault")) for c in cases),
               "tracebacks": sum(c["traceback"] for c in cases),
               "killed_runs_leaving_a_temporary": len(left),
               "temporaries_removed_by_the_rerun": sum(not c.get("leftovers_after_rerun") for c in left)}
    result = {"summary": summary, "clean_runs": clean, "cases": cases, "versions": versions(),
              "moekit": moekit.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Fault injection (benchmarks/faults.py)", "",
             f"{summary['cases']} cases on the bundled demo model: {summary['handled']} handled, "
             f"{summary['data_lost']} with a source changed, {summary['left_behind']} leaving something behind, "
             f"{summary['tracebacks']} tracebacks; {summary['finished_before_fault']} runs finished before the "
             "signal arrived (the fault then missed; still checked). "
             f"{summary['killed_runs_leaving_a_temporary']} killed runs left a temporary beside the target; the "
             f"next run removed it in {summary['temporaries_removed_by_the_rerun']}.", "",
             "| command | fault | exit | target after fault | leftovers after fault | rerun | handled |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['command']} | {c['fault']} | {c['returncode']} | {c['target_state']} | "
                     f"{len(c['leftovers_after_fault'])} | {c.get('rerun_returncode', '-')} | "
                     f"{'yes' if c['handled'] else '**no**'} |")
    mechanism = next((c["disk_full_mechanism"] for c in cases if "disk_full_mechanism" in c), "-")
    lines += ["", f"Disk full simulated with {mechanism}. Clean-run times (s): "
              + ", ".join(f"{k} {v['seconds']}" for k, v in clean.items()) + ".", "",
              "What this does not show: faults inside the operating system's rename itself, network file systems "
              "(where flock may not work), or power loss (no fsync is done)."]
    (RESULTS / "faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
