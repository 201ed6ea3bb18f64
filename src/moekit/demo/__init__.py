"""``moekit demo``: the whole job on the bundled model, offline, on a CPU, in about a minute.

The bundled model (``demo/model``) is a small Qwen3-MoE (16 experts per layer, top-4, 4 layers,
8.0M parameters) trained here for 5 minutes on an H200 on code, prose and other languages, balanced per
layer (``benchmarks/train_moe.py --testbed demo-qwen3-16x4 --aux-coef 0.03``; its card and
``training.json`` say how).
The texts (``demo/texts``) are held-out pieces of the same corpus: Python code, English prose and
German prose, each split into calibration and evaluation text.

Steps: inspect the model; profile it on two named sets (code, prose); prune half of every layer's
experts three ways -- frequency on both sets (general), frequency on code alone (domain-targeted),
REAP on both sets; measure per-domain perplexity of the original and of each pruned
model on the evaluation texts (German was never used for calibration); print a table and write a
report (``report.md`` and a self-contained ``report.html``: expert load per set, score
distributions with the cut, quality against compression, sizes) into the output directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODEL_DIR = Path(__file__).resolve().parent / "model"
TEXTS_DIR = Path(__file__).resolve().parent / "texts"
CALIBRATION_SETS = ("code", "prose")
EVAL_SETS = ("code", "prose", "german")
SEQ_LEN = 256


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    method: str | None = None
    set_weights: dict[str, float] | None = None


VARIANTS = (
    Variant("original", "original (16 experts)"),
    Variant("frequency-general", "frequency, code + prose", "frequency"),
    Variant("frequency-code", "frequency, code only (targeted)", "frequency", {"code": 1.0, "prose": 0.0}),
    Variant("reap-general", "REAP, code + prose", "reap"),
)


def read_texts(name: str, split: str) -> list[str]:
    """The bundled documents of one domain's calibration or eval split."""
    from moekit.data import read_documents

    return list(read_documents(TEXTS_DIR / f"{name}-{split}.jsonl"))


def run_demo(out: str | Path, overwrite: bool = False, progress: bool = True, ratio: float = 0.5,
             say: Any = print) -> dict[str, Any]:
    """Run every step into ``out``; return the results (also saved as ``results.json``).

    Everything is written into a temporary directory that becomes ``out`` only when the demo has
    finished (``moekit.outputs``); an existing ``out`` is replaced only with ``overwrite`` and only if it
    holds an earlier demo."""
    from moekit.outputs import check_output, writing_directory

    out = check_output(out, kind="demo", overwrite=overwrite, sources=[MODEL_DIR, TEXTS_DIR])
    with writing_directory(out, "demo") as tmp:
        results = _run_demo_into(tmp, progress, ratio, say)
    return results


def _write_measured_quality(paths: dict[str, Path], table: dict[str, dict[str, float]]) -> None:
    """Each pruned checkpoint's card gets the held-out perplexity the demo measured, beside the original's."""
    from moekit.edit.card import with_measured_quality

    domains = list(table["original"])
    for variant in VARIANTS[1:]:
        card = paths[variant.name] / "README.md"
        rows = "\n".join(f"| {d} | {table['original'][d]:.2f} | {table[variant.name][d]:.2f} |" for d in domains)
        text = (f"Measured by `moekit demo`: perplexity on the demo's held-out texts ({SEQ_LEN}-token windows; lower "
                f"is better; German was never used for calibration).\n\n| text | original | this model |\n"
                f"|---|---:|---:|\n{rows}\n")
        card.write_text(with_measured_quality(card.read_text(), text))


def _run_demo_into(out: Path, progress: bool, ratio: float, say: Any) -> dict[str, Any]:
    from moekit.arch.view import MoEModelView
    from moekit.data import load_tokenizer
    from moekit.eval import perplexity
    from moekit.model_io import load_model, load_structure
    from moekit.pipeline import PlanInputs, make_plan, prune_with_plan
    from moekit.plan import PlanRequest
    from moekit.profile import profile_model
    from moekit.profile.analyze import analyze_profile
    from moekit.summary import format_count, summarize

    summary = summarize(MoEModelView.from_model(load_structure(MODEL_DIR)))
    say(f"1/4 inspect: {summary.model_type}, {len(summary.moe_layers)} MoE layers x {summary.num_experts} experts, "
        f"top-{summary.top_k}; {format_count(summary.total_parameters)} parameters, "
        f"{format_count(summary.active_parameters)} active per token")

    data = [f"{name}={TEXTS_DIR / f'{name}-calibration.jsonl'}" for name in CALIBRATION_SETS]
    profile = profile_model(MODEL_DIR, data, out / "profile", seq_len=SEQ_LEN, max_tokens=None, progress=progress)
    analysis = analyze_profile(profile)
    overlap = analysis["specialisation"]["overlap"]["code|prose"]["mean_jaccard"]
    sets = ", ".join(f"{s['name']} {s['tokens']:,} tokens" for s in profile.meta["sets"])
    say(f"2/4 profile: {sets}; overlap of code's and prose's most-used experts (Jaccard) {overlap:.2f}")
    for warning in analysis["warnings"]:  # the bundled model is a small testbed, not balanced like released MoEs
        say(f"    note: {warning}")

    tokenizer = load_tokenizer(MODEL_DIR)
    paths = {"original": MODEL_DIR}
    sizes = {"original": summary.total_parameters}
    for variant in VARIANTS[1:]:
        request = PlanRequest(variant.method or "", ratio=ratio, set_weights=variant.set_weights)
        plan = make_plan(MODEL_DIR, request, PlanInputs(profile=profile))
        result = prune_with_plan(MODEL_DIR, plan, out / variant.name)
        paths[variant.name] = result.out
        sizes[variant.name] = result.after.total_parameters
    names = ", ".join(v.name for v in VARIANTS[1:])
    say(f"3/4 prune: {int(ratio * 100)}% of experts removed three ways -> {names}")

    eval_texts = {name: read_texts(name, "eval") for name in EVAL_SETS}
    table: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        model = load_model(paths[variant.name], dtype=torch.float32)
        table[variant.name] = {name: perplexity(model, tokenizer, texts, max_length=SEQ_LEN, batch_size=16,
                                                progress=False).ppl for name, texts in eval_texts.items()}
    _write_measured_quality(paths, table)
    from moekit.eval.speed import measure_footprint_and_speed

    speed = measure_footprint_and_speed({v.label: paths[v.name] for v in VARIANTS}, batch_size=1,
                                        prompt_tokens=SEQ_LEN // 2, new_tokens=8, repeats=3, rounds=2)
    (out / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    say("4/4 evaluate: per-domain perplexity of every model on held-out text, memory and speed (speed.json)")
    results = {"model": str(MODEL_DIR), "ratio": ratio, "summary": summary.to_dict(), "perplexity": table,
               "parameters": sizes, "variants": [v.__dict__ for v in VARIANTS], "analysis": analysis,
               "versions": profile.meta["versions"]}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    from moekit.report import report_inputs_from_demo
    from moekit.report.build import report_sections, write_report_files

    inputs = report_inputs_from_demo(out)
    title = inputs.pop("title")
    write_report_files(out, title, report_sections(**inputs, base=out))
    return results
