"""Layer-by-layer profiling against the whole model on the GPU, on a Qwen3-30B-A3B-shaped checkpoint.

A checkpoint of random bf16 weights with Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of 768, top-8)
and ``--layers`` decoder layers is written with ``benchmarks/scale.py``'s writer. Random token ids
(``--tokens`` of them, seed 0, in sequences of ``--seq-len``) are profiled two ways, each in a fresh
process, alternating, ``--repeats`` times:

- ``whole``: ``load_model(..., device="cuda")`` then ``collect_profile`` (the whole model on the GPU);
- ``layerwise``: ``collect_profile_layerwise`` with the GPU capped by
  ``torch.cuda.set_per_process_memory_fraction`` to a quarter of the checkpoint's size (``--cap-share``),
  so the model is four times what the run may hold.

Reported per mode: the profiling time and tokens/s (the whole model's load is timed apart: it is the
part the layer-by-layer run folds into its pass, so both "profile only" and "load + profile" ratios
are given), the peak GPU memory allocated (``torch.cuda.max_memory_allocated``), and for the layered run
that peak divided by the memory it cannot avoid: the largest decoder layer's weights, the hidden states
of every calibration token (kept on the GPU) and one batch's peak working memory in the whole-model run
(its peak minus the model's weights). The statistics of the two profiles are compared (largest
difference relative to the largest value of each statistic).

What this does not show: random weights route near uniformly, unlike a trained model (the work per
expert is then even); the page cache is warm (the checkpoint was just written), so reading weights
costs a memory copy, not a disk read.

    python benchmarks/layerwise_profile.py --layers 16 --tokens 262144 --tag h200

Writes benchmarks/results/layerwise-profile-<tag>.json and .md.
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
MODES = ("whole", "layerwise")


def _calibration(tokens: int, seq_len: int, vocab: int):
    import torch

    from moekit.data import CalibrationSet

    ids = torch.randint(0, vocab, (tokens // seq_len, seq_len), generator=torch.Generator().manual_seed(0))
    return [CalibrationSet("random", ids, torch.ones_like(ids), {"source": "uniformly random token ids, seed 0"})]


def child(mode: str, source: Path, out: Path, tokens: int, seq_len: int, batch_size: int, cap: int,
          device_name: str) -> None:
    """One measured run; prints a JSON line with its numbers and saves the profile to ``out``."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from moekit.layerwise import LayerwiseModel
    from moekit.model_io import load_model
    from moekit.profile.collect import collect_profile, collect_profile_layerwise

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cap and cuda:
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    allocated = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    config = json.loads((source / "config.json").read_text())
    sets = _calibration(tokens, seq_len, config["vocab_size"])
    result: dict = {"mode": mode, "cap_bytes": cap}
    sync()
    if mode == "whole":
        start = time.perf_counter()
        model = load_model(source, dtype="bfloat16", device=device_name)
        sync()
        result["load_seconds"] = time.perf_counter() - start
        result["weights_bytes"] = allocated()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        profile = collect_profile(model, sets, batch_size, progress=False)
        sync()
    else:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with LayerwiseModel(source, dtype="bfloat16", device=device_name) as run:
            result["largest_layer_bytes"] = run.largest_layer_bytes
            profile = collect_profile_layerwise(run, sets, batch_size, progress=False)
            result["hidden_on_device"] = bool(run.keep_hidden_on_device)
        sync()
    result["profile_seconds"] = time.perf_counter() - start
    result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else 0
    result["tokens"] = sum(s.num_tokens for s in sets)
    profile.save(out)
    print(json.dumps(result))


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"child {args[:2]} failed with {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(one: Path, two: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from moekit.profile import Profile

    a, b = Profile.load(one), Profile.load(two)
    worst: dict[str, float] = {}
    identical = True
    for layer, stats in a.layers.items():
        for name, tensor in stats.items():
            other = b.layers[layer][name]
            identical &= bool((tensor == other).all())
            scale = float(tensor.double().abs().max()) or 1.0
            diff = float((tensor.double() - other.double()).abs().max()) / scale
            worst[name] = max(worst.get(name, 0.0), diff)
    return {"identical": identical, "max_relative_difference": worst}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cap-share", type=float, default=0.25, help="GPU cap of the layered run / checkpoint size")
    parser.add_argument("--shard-gb", type=float, default=4.0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--tag", default="h200")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark), or cpu to try the script")
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "build":
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from scale import build

            build(Path(args.child[1]), int(args.child[2]), int(args.child[3]), int(args.child[4]),
                  float(args.child[5]))
            print(json.dumps({}))
            return
        mode, source, out, tokens, seq_len, batch, cap, device = args.child
        child(mode, Path(source), Path(out), int(tokens), int(seq_len), int(batch), int(cap), device)
        return

    work = Path(tempfile.mkdtemp(prefix="moekit-layerwise-", dir=args.work))
    try:
        source = work / "source"
        start = time.perf_counter()
        run_child("build", str(source), str(args.layers), str(args.experts), str(args.vocab), str(args.shard_gb))
        built = time.perf_counter() - start
        checkpoint = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        cap = int(checkpoint * args.cap_share)
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:
                out = work / f"profile-{mode}-{repeat}"
                runs[mode].append(run_child(mode, str(source), str(out), str(args.tokens), str(args.seq_len),
                                            str(args.batch_size), str(cap if mode == "layerwise" else 0),
                                            args.device))
        equality = compare(work / "profile-whole-0", work / "profile-layerwise-0")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    whole, layered = runs["whole"], runs["layerwise"]
    tokens = whole[0]["tokens"]
    working = max(r["peak_allocated_bytes"] - r["weights_bytes"] for r in whole)  # one batch, whole model
    on_device = layered[0]["hidden_on_device"]
    hidden = tokens * 2048 * 2 if on_device else 0  # bf16 hidden states of width 2048, when kept on the GPU
    floor = layered[0]["largest_layer_bytes"] + hidden + working
    summary = {
        "checkpoint_bytes": checkpoint, "cap_bytes": cap, "checkpoint_over_cap": checkpoint / cap,
        "tokens": tokens, "build_seconds": built,
        "whole_tokens_per_second": spread([tokens / r["profile_seconds"] for r in whole]),
        "whole_with_load_tokens_per_second": spread([tokens / (r["profile_seconds"] + r["load_seconds"])
                                                     for r in whole]),
        "layerwise_tokens_per_second": spread([tokens / r["profile_seconds"] for r in layered]),
        "layerwise_peak_allocated_bytes": spread([r["peak_allocated_bytes"] for r in layered]),
        "whole_peak_allocated_bytes": spread([r["peak_allocated_bytes"] for r in whole]),
        "unavoidable_bytes": {"largest_layer": layered[0]["largest_layer_bytes"], "hidden_states": hidden,
                              "one_batch_working_memory": working, "total": floor},
    }
    lw = statistics.median(tokens / r["profile_seconds"] for r in layered)
    summary["speed_ratio_profile_only"] = lw / summary["whole_tokens_per_second"]["median"]
    summary["speed_ratio_with_load"] = lw / summary["whole_with_load_tokens_per_second"]["median"]
    summary["peak_over_unavoidable"] = summary["layerwise_peak_allocated_bytes"]["median"] / max(floor, 1)
    import torch

    result = {"benchmark": "layerwise_profile", "args": {k: v for k, v in vars(args).items() if k not in
                                                         ("child", "work")},
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "summary": summary, "equality": equality, "runs": runs}
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"layerwise-profile-{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"layerwise-profile-{args.tag}.md").write_text(report(result))
    print(report(result))


def report(result: dict) -> str:
    s, gib = result["summary"], 2**30
    med = lambda d: d["median"]  # noqa: E731
    rng = lambda d, f: f"{f(d['min'])} .. {f(d['max'])}"  # noqa: E731
    gb = lambda v: f"{v / gib:.2f} GiB"  # noqa: E731
    tps = lambda v: f"{v:,.0f}"  # noqa: E731
    u = s["unavoidable_bytes"]
    worst = max(result["equality"]["max_relative_difference"].values())
    lines = [
        "# Layer-by-layer profiling vs the whole model (GPU)", "",
        f"Written by `benchmarks/layerwise_profile.py` on {result['machine']['gpu']} (torch "
        f"{result['machine']['torch']}). Qwen3-30B-A3B-shaped checkpoint, {result['args']['layers']} layers, "
        f"random bf16 weights: {gb(s['checkpoint_bytes'])}; {s['tokens']:,} random tokens, sequences of "
        f"{result['args']['seq_len']}, batch {result['args']['batch_size']}; {result['args']['repeats']} runs per "
        "mode, alternating, each in a fresh process (median, and min .. max).", "",
        "| | whole model on the GPU | layer by layer, GPU capped |",
        "|---|---|---|",
        f"| GPU memory allowed | all ({gb(med(s['whole_peak_allocated_bytes']))} used) | {gb(s['cap_bytes'])} "
        f"(checkpoint = {s['checkpoint_over_cap']:.1f} x the cap) |",
        f"| peak GPU memory allocated | {gb(med(s['whole_peak_allocated_bytes']))} | "
        f"{gb(med(s['layerwise_peak_allocated_bytes']))} |",
        f"| tokens/s, profiling | {tps(med(s['whole_tokens_per_second']))} "
        f"({rng(s['whole_tokens_per_second'], tps)}) | {tps(med(s['layerwise_tokens_per_second']))} "
        f"({rng(s['layerwise_tokens_per_second'], tps)}) |",
        f"| tokens/s, loading + profiling | {tps(med(s['whole_with_load_tokens_per_second']))} "
        f"({rng(s['whole_with_load_tokens_per_second'], tps)}) | (loading is part of the pass) |", "",
        f"- speed, layer by layer / whole model: **{s['speed_ratio_profile_only']:.2f}** of the profiling alone, "
        f"**{s['speed_ratio_with_load']:.2f}** of loading + profiling (goal >= 0.8).",
        f"- peak GPU memory / what a layer-by-layer run cannot avoid (largest layer {gb(u['largest_layer'])} + "
        f"hidden states of every token kept on the GPU {gb(u['hidden_states'])} + one batch's working memory "
        f"{gb(u['one_batch_working_memory'])} = {gb(u['total'])}): **{s['peak_over_unavoidable']:.2f}** "
        "(goal <= 1.2).",
        f"- statistics: {'bit-identical' if result['equality']['identical'] else 'not bit-identical'}; largest "
        f"difference relative to each statistic's largest value: {worst:.2e}.", "",
        "Not shown: random weights route near uniformly (a trained model's uneven load changes the work per expert "
        "but not the weights moved); the page cache was warm, so reading a layer cost a memory copy, not a disk "
        "read.", "",
        f"The hidden states of the {s['tokens']:,} tokens waited "
        f"{'on the GPU' if u['hidden_states'] else 'in pinned CPU memory'} between layers.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
