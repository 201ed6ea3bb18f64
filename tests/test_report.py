"""Reports: markdown + self-contained HTML, sections present exactly when given, escaping, compare tables."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_ids

from moekit.arch.view import MoEModelView
from moekit.data import CalibrationSet
from moekit.plan import PlanRequest, make_prune_plan
from moekit.profile import Profile, collect_profile
from moekit.report import (
    ReportError,
    ResultPoint,
    build_report,
    compare_results,
    format_compare_table,
    load_plan,
    report_inputs_from_demo,
)
from moekit.tiny import build_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("expert-load", "routing", "scores", "quality", "speed", "samples")
HEADINGS = {"expert-load": "## Expert load", "routing": "## Routing: contrasts, co-activation and sparsity",
            "scores": "## Expert scores and the pruning cut",
            "quality": "## Quality vs compression", "speed": "## Memory and speed", "samples": "## Generation samples"}


@pytest.fixture(scope="module")
def pipeline() -> dict[str, Any]:
    """A tiny model profiled on two random sets, and two plans."""
    model = build_tiny_model("qwen3_moe")
    view = MoEModelView.from_model(model)
    sets = [CalibrationSet(name, ids, torch.ones_like(ids))
            for name, ids in (("code", random_ids(0, 2, 32)), ("prose", random_ids(1, 2, 32)))]
    profile = collect_profile(model, sets, progress=False)
    plans = [make_prune_plan(view, profile, PlanRequest("frequency", ratio=0.5, protect_super=False)),
             make_prune_plan(view, profile, PlanRequest("reap", ratio=0.25, protect_super=False))]
    return {"profile": profile, "plans": plans}


RESULTS = [
    ResultPoint("original", "original", 0.0, {"perplexity/code": 4.0, "arc_easy/acc": 0.60}),
    {"label": "freq 25%", "method": "frequency", "ratio": 0.25,
     "metrics": {"perplexity/code": 5.0, "arc_easy/acc": 0.5}},
    {"label": "freq 50%", "method": "frequency", "ratio": 0.5,
     "metrics": {"perplexity/code": 7.0, "arc_easy/acc": 0.4}},
    {"label": "reap 50%", "method": "reap", "ratio": 0.5, "metrics": {"perplexity/code": 6.0}},
]
SPEED = {"device": "cpu", "models": {"original": {"total_bytes": 3 * 2**30, "decode_tokens_per_s": 41.5},
                                     "reap 50%": {"total_bytes": 2 * 2**30, "prefill_tokens_per_s": 900}}}
SAMPLES = [{"prompt": "Say <script>alert('x')</script> & more", "completions": {"original": "ok <b>bold</b>",
                                                                                "reap 50%": "a | b\nline two"}}]


def _sources(html: str) -> list[str]:
    return re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', html)


def _check_self_contained(html: str) -> list[bytes]:
    """No external references; every image is a data: URI holding a PNG; returns the PNGs."""
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    pngs = []
    for ref in _sources(html):
        if ref.startswith("#"):
            continue
        assert ref.startswith("data:image/png;base64,"), ref[:60]
        png = base64.b64decode(ref.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC)
        pngs.append(png)
    return pngs


def test_full_report_is_self_contained(tmp_path: Path, pipeline: dict[str, Any]) -> None:
    md, html_path = build_report(tmp_path / "r", profile=pipeline["profile"], plans=pipeline["plans"],
                                 results=RESULTS, speed=SPEED, samples=SAMPLES, title="tiny report")
    assert md == tmp_path / "r" / "report.md" and html_path == tmp_path / "r" / "report.html"
    html, text = html_path.read_text(), md.read_text()
    pngs = _check_self_contained(html)
    assert len(pngs) == 1 + 2 + 2 + 1  # heatmap, co-activation and sparsity, one score figure per plan, quality
    for name in re.findall(r"\]\((figures/[^)]+\.png)\)", text):
        assert (md.parent / name).read_bytes().startswith(PNG_MAGIC)
    assert len(re.findall(r"\]\(figures/", text)) == 6
    for section in SECTIONS:
        assert html.count(f'<section id="{section}">') == 1
        assert text.count(HEADINGS[section] + "\n") == 1
    assert "<h1>tiny report</h1>" in html and text.startswith("# tiny report\n")
    assert "3.00 GiB" in html and "41.5" in html and "900" in html  # generic speed fields, bytes readable


def test_samples_are_escaped(tmp_path: Path) -> None:
    md, html_path = build_report(tmp_path, samples=SAMPLES)
    html, text = html_path.read_text(), md.read_text()
    for out in (html, text):
        assert "<script>" not in out and "<b>bold</b>" not in out
        assert "&lt;script&gt;alert(" in out and "&lt;b&gt;bold&lt;/b&gt;" in out
    assert "a \\| b<br>line two" in text  # a pipe does not break the markdown table


@pytest.mark.parametrize("given", [("expert-load",), ("scores",), ("quality",), ("speed",), ("samples",),
                                   ("scores", "speed"), ("expert-load", "quality", "samples")])
def test_sections_appear_exactly_when_given(tmp_path: Path, pipeline: dict[str, Any], given: tuple[str, ...]) -> None:
    inputs = {"expert-load": {"profile": pipeline["profile"]}, "scores": {"plans": pipeline["plans"][:1]},
              "quality": {"results": RESULTS}, "speed": {"speed": SPEED}, "samples": {"samples": SAMPLES}}
    kwargs: dict[str, Any] = {}
    for section in given:
        kwargs.update(inputs[section])
    md, html_path = build_report(tmp_path, **kwargs)
    html, text = html_path.read_text(), md.read_text()
    for section in SECTIONS:
        expected = int(section in given or (section == "routing" and "expert-load" in given))  # both from a profile
        assert html.count(f'<section id="{section}">') == expected, section
        assert text.count(HEADINGS[section] + "\n") == expected, section
    _check_self_contained(html)


def test_plans_from_files_and_scores_table(tmp_path: Path, pipeline: dict[str, Any]) -> None:
    plan = pipeline["plans"][0]
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "moekit_plan.json").write_text(json.dumps(plan))
    assert load_plan(tmp_path / "pruned") == load_plan(tmp_path / "pruned" / "moekit_plan.json") == plan
    md, _ = build_report(tmp_path / "r", plans=[tmp_path / "pruned"])
    text = md.read_text()
    for index, layer in plan["layers"].items():
        removed = ", ".join(map(str, layer["removed"]))
        assert f"| {index} | {len(layer['kept'])} | {removed} |" in text


def _eval_json(path: Path, tasks: dict[str, dict[str, float]], ppl: dict[str, float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"model": str(path.parent), "tasks": {t: {"metrics": m, "stderr": dict.fromkeys(m), "n": 10}
                                                 for t, m in tasks.items()},
            "perplexity": {name: {"ppl": v, "tokens": 100} for name, v in ppl.items()}}
    path.write_text(json.dumps(data))
    return path


def test_compare_table_values_equal_inputs(tmp_path: Path) -> None:
    a = _eval_json(tmp_path / "base" / "results.json", {"arc_easy": {"acc": 0.6125, "acc_norm": 0.58}},
                   {"code": 4.25})
    b = _eval_json(tmp_path / "reap50" / "results.json", {"arc_easy": {"acc": 0.5, "acc_norm": 0.4375}},
                   {"code": 6.5, "german": 12.0})
    columns, rows = compare_results([a, b])
    assert columns == ["base", "reap50"]  # same stem: named by the parent directory
    assert dict(rows) == {"arc_easy/acc": [0.6125, 0.5], "arc_easy/acc_norm": [0.58, 0.4375],
                          "perplexity/code": [4.25, 6.5], "perplexity/german": [None, 12.0]}
    table = format_compare_table(columns, rows)
    assert table.splitlines()[0] == "| metric | base | reap50 |"
    assert "| arc_easy/acc | 0.6125 | 0.5000 |" in table
    assert "| perplexity/german | - | 12.0000 |" in table
    c = _eval_json(tmp_path / "x" / "other.json", {}, {"code": 5.0})
    assert compare_results([a, c])[0] == ["results", "other"]  # distinct stems name the columns


def test_results_from_eval_files_in_report(tmp_path: Path) -> None:
    base = _eval_json(tmp_path / "base.json", {"piqa": {"acc": 0.7}}, {"code": 4.0})
    pruned = _eval_json(tmp_path / "pruned.json", {"piqa": {"acc": 0.65}}, {"code": 5.0})
    md, _ = build_report(tmp_path / "r", results=[
        {"label": "base", "ratio": 0, "results": base},
        {"label": "pruned", "method": "reap", "ratio": 0.5, "results": pruned}])
    text = md.read_text()
    assert "| pruned | reap | 50% | 0.6500 | 5.0000 |" in text
    assert "| base | original | 0% | 0.7000 | 4.0000 |" in text


def test_bad_inputs_raise_report_error(tmp_path: Path, pipeline: dict[str, Any]) -> None:
    with pytest.raises(ReportError, match="nothing to report"):
        build_report(tmp_path / "r")
    with pytest.raises(ReportError, match="does not exist"):
        compare_results([tmp_path / "missing.json"])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ReportError, match="cannot be read"):
        compare_results([tmp_path / "broken.json"])
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ReportError, match="not a moekit eval result"):
        compare_results([tmp_path / "other.json"])
    with pytest.raises(ReportError, match="no results files"):
        compare_results([])
    with pytest.raises(ReportError, match="not a moekit plan"):
        build_report(tmp_path / "r", plans=[tmp_path / "other.json"])
    with pytest.raises(ReportError, match="not a moekit plan"):
        build_report(tmp_path / "r", plans=[{"layers": {"0": {"kept": [0]}}}])
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "r", plans=[tmp_path / "nowhere" / "moekit_plan.json"])
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "r", results=[{"label": "x", "ratio": 0.5, "results": tmp_path / "gone.json"}])
    with pytest.raises(ReportError, match="ratio"):
        build_report(tmp_path / "r", results=[{"label": "x", "ratio": 50, "metrics": {"a": 1.0}}])
    with pytest.raises(ReportError, match="speed"):
        build_report(tmp_path / "r", speed={"original": {"total_bytes": 1}})
    with pytest.raises(ReportError, match="sample"):
        build_report(tmp_path / "r", samples=[{"prompt": "p"}])
    with pytest.raises(ReportError, match="demo"):
        report_inputs_from_demo(tmp_path)
    assert not (tmp_path / "r").exists()  # inputs are checked before anything is written


def test_report_from_a_demo_layout(tmp_path: Path, pipeline: dict[str, Any]) -> None:
    """report_inputs_from_demo reads what moekit demo writes (built here by hand, small)."""
    profile: Profile = pipeline["profile"]
    profile.save(tmp_path / "demo" / "profile")
    variants = [{"name": "original", "label": "original", "method": None},
                {"name": "freq", "label": "frequency", "method": "frequency"}]
    (tmp_path / "demo" / "freq").mkdir()
    (tmp_path / "demo" / "freq" / "moekit_plan.json").write_text(json.dumps(pipeline["plans"][0]))
    results = {"ratio": 0.5, "summary": {"num_experts": 8}, "variants": variants,
               "perplexity": {"original": {"code": 3.0, "german": 9.0}, "freq": {"code": 4.0, "german": 20.0}},
               "parameters": {"original": 1000, "freq": 600}}
    (tmp_path / "demo" / "results.json").write_text(json.dumps(results))
    inputs = report_inputs_from_demo(tmp_path / "demo")
    assert [p.ratio for p in inputs["results"]] == [0.0, 0.5]
    assert inputs["speed"]["models"] == {"original": {"parameters": 1000, "experts_per_layer": 8},
                                         "frequency": {"parameters": 600, "experts_per_layer": 4}}
    md, html_path = build_report(tmp_path / "r", **inputs)
    html = html_path.read_text()
    assert all(f'<section id="{s}">' in html for s in ("expert-load", "scores", "quality", "speed"))
    assert '<section id="samples">' not in html
    assert "| frequency | freq | 50% | 4.0000 | 20.0000 |" in md.read_text()


def test_quality_points_carry_the_evaluations_standard_errors_into_the_figure() -> None:
    import io

    import matplotlib.image

    from moekit.report.figures import quality_figure
    from moekit.report.inputs import coerce_result, result_point

    results = {"tasks": {"arc_easy": {"metrics": {"acc": 0.61}, "stderr": {"acc": 0.02}, "n": 500}},
               "perplexity": {"code": {"ppl": 4.2}}}
    point = result_point("reap 50%", "reap", 0.5, results)
    assert point.metrics == {"arc_easy/acc": 0.61, "perplexity/code": 4.2}
    assert point.stderr == {"arc_easy/acc": 0.02}
    same = coerce_result({"label": "x", "method": "reap", "ratio": 0.25, "metrics": {"arc_easy/acc": 0.6},
                          "stderr": {"arc_easy/acc": 0.021}})
    assert same.stderr == {"arc_easy/acc": 0.021}
    original = coerce_result({"label": "original", "ratio": 0.0, "metrics": {"arc_easy/acc": 0.6105}})
    png = quality_figure([original, same, point])  # two methods, error bars, values 0.01 apart
    image = matplotlib.image.imread(io.BytesIO(png))
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_compare_writes_markdown_csv_and_json(tmp_path: Path) -> None:
    import csv

    from typer.testing import CliRunner

    from moekit.cli import app

    runner = CliRunner()
    a = _eval_json(tmp_path / "base.json", {"arc_easy": {"acc": 0.6125}}, {"code": 4.25})
    b = _eval_json(tmp_path / "reap.json", {"arc_easy": {"acc": 0.5}}, {"code": 6.5, "german": 12.0})
    as_json = runner.invoke(app, ["compare", str(a), str(b), "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data == {"runs": ["base", "reap"], "metrics": {"arc_easy/acc": {"base": 0.6125, "reap": 0.5},
                                                           "perplexity/code": {"base": 4.25, "reap": 6.5},
                                                           "perplexity/german": {"base": None, "reap": 12.0}}}
    written = runner.invoke(app, ["compare", str(a), str(b), "--format", "csv", "--out", str(tmp_path / "c.csv")])
    assert written.exit_code == 0, written.output
    rows = list(csv.reader((tmp_path / "c.csv").read_text().splitlines()))
    assert rows[0] == ["metric", "base", "reap"] and ["perplexity/german", "", "12.0"] in rows
    markdown = runner.invoke(app, ["compare", str(a), str(b), "--format", "markdown"])
    assert "| arc_easy/acc | 0.6125 | 0.5000 |" in markdown.stdout
    again = runner.invoke(app, ["compare", str(a), str(b), "--format", "csv", "--out", str(tmp_path / "c.csv")])
    assert again.exit_code == 2 and "--overwrite" in again.stderr  # nothing of the user's replaced silently
    onto_input = runner.invoke(app, ["compare", str(a), "--format", "json", "--out", str(a), "--overwrite"])
    assert onto_input.exit_code == 2 and json.loads(a.read_text())["tasks"]  # an input is never overwritten
    table_to_file = runner.invoke(app, ["compare", str(a), "--out", str(tmp_path / "t.txt")])
    assert table_to_file.exit_code == 2 and "--format" in table_to_file.stderr
