"""``build_report``: a markdown report (figures as PNG files beside it) and a self-contained HTML one.

Sections, each present only when its input is given:

- ``expert-load``: a profile's per-set expert load heatmaps and per-layer balance;
- ``routing``: with a profile, each contrast of two named sets (``contrasts``; harmful against harmless when the
  profile has both), a co-activation heatmap and token/chunk sparsity per layer;
- ``scores``: each plan's sorted scores per layer with the kept/dropped cut;
- ``quality``: metric against the fraction of experts removed, one line per method, and a table;
- ``speed``: memory/speed numbers per model (whatever numeric fields are given);
- ``samples``: generations of several models side by side (HTML-escaped everywhere).

The HTML embeds its figures as base64 PNG data URIs and its CSS inline: no scripts, no external URLs.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.outputs import check_output, shown_path, writing_directory
from moekit.report import figures
from moekit.report.compare import format_value
from moekit.report.errors import ReportError
from moekit.report.inputs import (
    MERGE_PLAN_FORMAT_PREFIX,
    NEURON_PLAN_FORMAT_PREFIX,
    ResultPoint,
    coerce_result,
    load_plan,
    plan_title,
)

SECTION_TITLES = {"expert-load": "Expert load", "routing": "Routing: contrasts, co-activation and sparsity",
                  "scores": "Expert scores and the pruning cut",
                  "quality": "Quality vs compression", "speed": "Memory and speed", "samples": "Generation samples"}


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text (escaped in HTML)."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table of strings; ``numeric`` columns are right-aligned; ``pre`` keeps line breaks in cells."""

    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)
    pre: bool = False


@dataclass(frozen=True)
class Image:
    """A PNG figure: ``name`` is its file name beside report.md."""

    name: str
    png: bytes
    alt: str


Block = Text | Table | Image


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block]


def load_section(profile: Any, base: Path | None = None) -> Section:
    from moekit.profile.analyze import balance_warnings, layer_summary

    sets = ", ".join(f"{s['name']} ({s['tokens']:,} tokens)" for s in profile.meta["sets"])
    source = shown_path(profile.meta.get("model", {}).get("source") or "?", base)
    rows = []
    summaries = [layer_summary(profile, layer) for layer in profile.fingerprint["moe_layers"]]
    for summary in summaries:
        dead = summary["dead_experts"]
        rows.append([str(summary["layer"]), f"{summary['load_entropy']:.3f}", f"{summary['max_over_mean']:.2f}",
                     f"{summary['router_entropy']:.3f}", str(len(summary["starved_experts"])),
                     ", ".join(map(str, dead)) if dead else "-"])
    warnings = [Text("Warning: " + w) for w in balance_warnings(summaries)]
    return Section("expert-load", SECTION_TITLES["expert-load"], [*warnings,
        Text(f"Profile of {source} on {sets}. Each row is an MoE layer, each column an expert; colour is the "
             "expert's share of the layer's routed tokens on that calibration set."),
        Image("expert_load.png", figures.load_heatmap(profile), "expert load per layer and calibration set"),
        Text("Balance per layer over all sets (load entropy 1 = perfectly even; router entropy normalised by "
             "log E)."),
        Table(["layer", "load entropy", "max/mean load", "router entropy", "experts < 1/4 of the mean",
               "dead experts"], rows, [True, True, True, True, True, False]),
    ])


def routing_section(profile: Any, contrasts: Sequence[tuple[str, str]] = (), reference: str | None = None,
                    similarity_sets: Sequence[str] | None = None) -> Section:
    """Each contrast (set A against set B: ``moekit.profile.contrast``; the profile's harmful against harmless sets
    when none is given and it has both), the co-activation of one layer (the most divergent one of the first
    contrast, else the middle MoE layer) and token- and chunk-level sparsity per layer."""
    from moekit.plan import SAFETY_CONTRAST
    from moekit.profile.contrast import contrast_profile

    if not contrasts and all(name in profile.set_names for name in SAFETY_CONTRAST):
        contrasts = [SAFETY_CONTRAST]
    blocks: list[Block] = []
    layers = profile.fingerprint["moe_layers"]
    focus = layers[len(layers) // 2]
    for index, (a, b) in enumerate(contrasts):
        report = contrast_profile(profile, a, b)
        strongest = report["most_divergent_layer"]
        focus = strongest if index == 0 else focus
        blocks += [
            Text(f"Contrast of {a} ({report['tokens'][a]:,} tokens) against {b} ({report['tokens'][b]:,}): per layer "
                 "and expert, the log-odds ratio of its routing selections with an informative Dirichlet prior (10 "
                 "pseudo-selections per expert, so rarely routed experts are pulled toward 0); z treats selections "
                 "as independent and so overstates significance. JS divergence: 0 bits = the sets route alike, 1 = "
                 f"disjoint experts (mean {report['mean_js_divergence_bits']:.3f}; most divergent layer "
                 f"{strongest})."),
            Image(f"contrast_{index}.png", figures.contrast_heatmap(report), f"log-odds of {a} against {b}"),
            Image(f"contrast_{index}_layer.png", figures.contrast_bars(report, strongest),
                  f"top experts of layer {strongest}, {a} against {b}"),
            Table(["layer", "JS (bits)", "TV", "experts for 50% / 90%", f"more in {a}: expert (log-odds, z)",
                   f"more in {b}"],
                  [[str(row["layer"]), f"{row['js_divergence_bits']:.3f}", f"{row['total_variation']:.3f}",
                    f"{row['experts_carrying']['50%']} / {row['experts_carrying']['90%']}",
                    ", ".join(f"{e['expert']} ({e['log_odds']:+.2f}, {e['z']:+.1f})" for e in row["top_a"][:3]),
                    ", ".join(f"{e['expert']} ({e['log_odds']:+.2f}, {e['z']:+.1f})" for e in row["top_b"][:3])]
                   for row in report["layers"]],
                  [True, True, True, False, False, False]),
        ]
    if reference is None and "en" in profile.set_names and len(profile.set_names) > 1:
        reference = "en"
    if reference is not None:
        from moekit.profile.contrast import routing_similarity

        similarity = routing_similarity(profile, reference, list(similarity_sets or []) or None)
        blocks += [
            Text(f"Routing similarity of every set to {reference} per MoE layer: 1 - the Jensen-Shannon divergence "
                 "(bits) of their routing shares (1 = the same experts in the same proportions). On parallel text in "
                 "several languages, low values in early and late layers and high ones in the middle are the "
                 "pattern Multilingual Routing in MoE reports."),
            Image("similarity.png", figures.similarity_lines(similarity), f"routing similarity to {reference}"),
        ]
    blocks += [
        Text(f"Co-activation of layer {focus} over all sets: how often expert j is chosen for a token that chose "
             "expert i (pairs that fire together are what STUN's first stage clusters)."),
        Image("coactivation.png", figures.coactivation_heatmap(profile, focus), f"co-activation of layer {focus}"),
        Text("Token-level sparsity TLS (1 - the share of experts a token uses) and chunk-level sparsity CLS-L (1 - "
             "the share of experts a chunk of L consecutive tokens uses; BlockFFN) per MoE layer, all sets."),
        Image("sparsity.png", figures.sparsity_lines(profile), "token- and chunk-level sparsity per layer"),
    ]
    return Section("routing", SECTION_TITLES["routing"], blocks)


def scores_section(plans: Sequence[dict[str, Any]], base: Path | None = None) -> Section:
    blocks: list[Block] = [Text("Per layer, experts sorted by score (highest left). Experts left of the dashed "
                                "line are kept; protected experts are kept whatever their score. In a merge plan "
                                "the kept experts are the output experts' router experts; the others are merged "
                                "into one of them or dropped, as the table says.")]
    for number, plan in enumerate(plans, 1):
        if str(plan.get("format", "")).startswith(NEURON_PLAN_FORMAT_PREFIX):  # no expert is removed
            width = plan.get("width") or {}
            source = shown_path((plan.get("source") or {}).get("model", "?"), base)
            experts = plan.get("num_experts") or {}
            expert_method = ((plan.get("details") or {}).get("experts") or {}).get("method")
            kept = ("every expert is kept" if experts.get("after") == experts.get("before") else
                    f"{experts.get('after')} of {experts.get('before')} experts per layer are kept ({expert_method})")
            neurons = (f"every kept expert keeps {width.get('after')} of its {width.get('before')} neurons, each its "
                       "own highest-scoring ones" if "masked_neurons" not in plan else
                       f"{plan['masked_neurons']['per_layer']} of each layer's {plan['masked_neurons']['of']} "
                       "neurons are zeroed (masked: nothing saved on disk)")
            blocks.append(Text(f"Plan {number}: {plan.get('method')} neuron pruning. Source model: {source}; {kept}; "
                               f"{neurons}."))
            continue
        title = plan_title(plan)
        details = plan.get("details") or {}
        protections = (details.get("protections") or {}).get("super_experts") or []
        source = shown_path((plan.get("source") or {}).get("model", "?"), base)
        blocks.append(Text(f"Plan {number}: {title}. Source model: {source}; "
                           f"experts per layer {plan['num_experts']['before']} to {plan['num_experts']['after']}"
                           + (f"; protected super experts {protections}" if protections else "") + "."))
        blocks.append(Image(f"scores_{number}.png", figures.score_figure(plan, title), f"scores of plan {number}"))
        if str(plan.get("format", "")).startswith(MERGE_PLAN_FORMAT_PREFIX):  # keep = an output expert's router
            rows = [[str(index), str(len(plan["layers"][str(index)]["kept"])),
                     ", ".join(str(e["expert"]) for e in entries if e["decision"] == "merge"),
                     ", ".join(str(e["expert"]) for e in entries if e["decision"] == "drop")]
                    for index, entries in figures.plan_layers(plan)]
            blocks.append(Table(["layer", "output experts", "merged into an output expert", "dropped"], rows,
                                [True, True, False, False]))
            continue
        rows = [[str(index), str(len(plan["layers"][str(index)]["kept"])),
                 ", ".join(str(e["expert"]) for e in entries if e["decision"] != "keep")]
                for index, entries in figures.plan_layers(plan)]
        blocks.append(Table(["layer", "kept", "removed experts"], rows, [True, True, False]))
    return Section("scores", SECTION_TITLES["scores"], blocks)


def quality_section(points: Sequence[ResultPoint]) -> Section:
    metrics = figures.quality_metrics(points)
    if not metrics:
        raise ReportError("the results hold no metric values: nothing to plot")
    rows = [[p.label, p.method, f"{100 * p.ratio:g}%", *(format_value(p.metrics.get(m)) for m in metrics)]
            for p in sorted(points, key=lambda p: (p.ratio, p.method, p.label))]
    shown = "" if len(metrics) <= figures.MAX_METRIC_PANELS else \
        f" (the figure shows the first {figures.MAX_METRIC_PANELS} metrics; the table has all)"
    return Section("quality", SECTION_TITLES["quality"], [
        Text("Each metric against the fraction of experts removed, one line per method; every line starts at "
             f"the original model{shown}."),
        Image("quality.png", figures.quality_figure(points), "quality against fraction of experts removed"),
        Table(["model", "method", "removed", *metrics], rows, [False, False, True] + [True] * len(metrics)),
    ])


def _format_field(name: str, value: float) -> str:
    if name.endswith("bytes"):
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= size:
                return f"{value / size:,.2f} {unit}"
        return f"{value:,.0f} B"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"


# The columns a ``moekit speed`` result is shown with (its JSON has ~30 fields per model), and their headers.
SPEED_COLUMNS = {"total_bytes": "weights", "routed_expert_bytes": "routed experts", "active_bytes": "active / token",
                 "checkpoint_bytes": "checkpoint", "peak_memory_bytes": "peak GPU memory",
                 "prefill_tokens_per_s": "prefill tok/s", "decode_tokens_per_s": "decode tok/s"}


def _measured_speed_section(speed: Mapping[str, Any], models: Mapping[str, Any]) -> Section:
    """A ``moekit speed`` result: the sizes and speeds that matter, each with its ratio to the reference, the
    differences inside the timing noise marked, and a figure of the ratios."""
    reference = speed.get("reference") or next(iter(models))
    columns = [c for c in SPEED_COLUMNS if any(isinstance(m.get(c), (int, float)) for m in models.values())]
    rows = []
    for name, m in models.items():
        cells = [str(name), f"{m.get('num_experts', '?')} (top-{m.get('top_k', '?')})"]
        for column in columns:
            value = m.get(column)
            if not isinstance(value, (int, float)):
                cells.append("-")
                continue
            text = _format_field(column, value) if column.endswith("bytes") else f"{value:,.1f}"
            ratio = (m.get("ratios") or {}).get(column)
            if name != reference and isinstance(ratio, (int, float)):
                text += f" ({ratio:.2f}x)"
            phase = column.split("_")[0]
            if name != reference and (m.get("within_noise") or {}).get(phase):
                text += " *"
            cells.append(text)
        rows.append(cells)
    settings = speed.get("settings") or {}
    blocks: list[Block] = [
        Text(f"Device {speed.get('device', '?')} ({speed.get('device_name', '?')}), dtype {speed.get('dtype', '?')}; "
             f"batch {settings.get('batch_size', '?')} x {settings.get('prompt_tokens', '?')} prompt tokens, "
             f"{settings.get('new_tokens', '?')} new tokens; speeds are medians of {settings.get('repeats', '?')} runs "
             f"in each of {settings.get('rounds', 1)} round(s), the order reversed every other round. Ratios are to "
             f"{reference}; * marks a speed whose timed runs overlap the reference's (inside the noise)."),
        Table(["model", "experts", *(SPEED_COLUMNS[c] for c in columns)], rows,
              [False, True] + [True] * len(columns)),
        Image("speed.png", figures.speed_figure(models, reference, {c: SPEED_COLUMNS[c] for c in columns}),
              "memory and speed relative to the reference"),
    ]
    if speed.get("peak_memory_note"):
        blocks.append(Text(str(speed["peak_memory_note"])))
    return Section("speed", SECTION_TITLES["speed"], blocks)


def speed_section(speed: Mapping[str, Any]) -> Section:
    models = speed.get("models") if isinstance(speed, Mapping) else None
    if not isinstance(models, Mapping) or not models:
        raise ReportError("speed must be a dict like {'models': {name: {'total_bytes': ..., ...}}} with at least "
                          "one model")
    if all(isinstance(m, Mapping) and isinstance(m.get("prefill_tokens_per_s"), (int, float))
           for m in models.values()):
        return _measured_speed_section(speed, models)
    columns: dict[str, None] = {}
    for name, row in models.items():
        if not isinstance(row, Mapping):
            raise ReportError(f"speed: model {name!r} must map field names to numbers")
        columns.update({k: None for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not columns:
        raise ReportError("speed: no numeric fields to report")
    rows = [[str(name), *(_format_field(c, row[c]) if c in columns and isinstance(row.get(c), (int, float))
                          else "-" for c in columns)] for name, row in models.items()]
    notes = {k: v for k, v in speed.items() if k != "models" and isinstance(v, (str, int, float))}
    blocks: list[Block] = [Table(["model", *columns], rows, [False] + [True] * len(columns))]
    if notes:
        blocks.insert(0, Text("; ".join(f"{k}: {v}" for k, v in notes.items())))
    return Section("speed", SECTION_TITLES["speed"], blocks)


def samples_section(samples: Sequence[Mapping[str, Any]]) -> Section:
    if isinstance(samples, (str, bytes, Mapping)) or not samples:
        raise ReportError("samples must be a non-empty list of {'prompt': ..., 'completions': {model: text}}")
    blocks: list[Block] = []
    for number, sample in enumerate(samples, 1):
        if not isinstance(sample, Mapping) or "prompt" not in sample or \
                not isinstance(sample.get("completions"), Mapping):
            raise ReportError(f"sample {number} needs a 'prompt' and 'completions' ({{model: text}})")
        models = list(sample["completions"])
        blocks.append(Text(f"Prompt {number}"))
        blocks.append(Table(["prompt", *models], [[str(sample["prompt"]),
                                                   *(str(sample["completions"][m]) for m in models)]], pre=True))
    return Section("samples", SECTION_TITLES["samples"], blocks)


# -- rendering ------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def render_markdown(title: str, sections: Sequence[Section], figure_dir: str) -> str:
    lines = [f"# {title}", "", "Contents: " + ", ".join(f"[{s.title}](#{s.id})" for s in sections), ""]
    for section in sections:
        lines += [f'<a id="{section.id}"></a>', "", f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [_md_cell(block.text).replace("<br>", "\n"), ""]
            elif isinstance(block, Image):
                lines += [f"![{block.alt}]({figure_dir}/{block.name})", ""]
            else:
                aligns = [block.numeric[i] if i < len(block.numeric) else False for i in range(len(block.header))]
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "".join("---:|" if a else "---|" for a in aligns))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1a202c; line-height: 1.45; }
h1 { border-bottom: 2px solid #2b6cb0; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #cbd5e0; padding-bottom: .2em; }
nav a { margin-right: 1em; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #cbd5e0; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #edf2f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.pre { table-layout: fixed; width: 100%; }
table.pre td { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85em; }
footer { margin-top: 3em; color: #718096; font-size: .8em; }
"""


def _html_table(block: Table) -> str:
    numeric = [block.numeric[i] if i < len(block.numeric) else False for i in range(len(block.header))]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if numeric[i] else ""}>{html.escape(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>\n" for row in block.rows)
    return f'<table{" class=pre" if block.pre else ""}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>'


def render_html(title: str, sections: Sequence[Section]) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n<title>{html.escape(title)}</title>",
             f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>",
             "<nav>" + "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections) + "</nav>"]
    for section in sections:
        parts.append(f'<section id="{section.id}">\n<h2>{html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Text):
                parts.append(f"<p>{html.escape(block.text)}</p>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">')
            else:
                parts.append(_html_table(block))
        parts.append("</section>")
    parts.append("<footer>Written by moekit.report.</footer>\n</body>\n</html>\n")
    return "\n".join(parts)


def build_report(out_dir: str | Path, *, profile: Any = None, plans: Sequence[Any] = (),
                 results: Sequence[ResultPoint | Mapping[str, Any]] = (), speed: Mapping[str, Any] | None = None,
                 samples: Sequence[Mapping[str, Any]] | None = None, title: str = "moekit report",
                 overwrite: bool = False, inputs: Sequence[str | Path | None] = (),
                 contrasts: Sequence[tuple[str, str]] = (), reference: str | None = None,
                 similarity_sets: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (figures in ``figures/``) and a self-contained ``report.html`` into the directory
    ``out_dir`` atomically; return both paths.

    ``profile``: a Profile or a profile directory. ``plans``: plan dicts, ``moekit_plan.json`` paths or
    pruned checkpoint directories. ``results``: ResultPoints or dicts (label, method, ratio, metrics or
    a ``moekit eval --json`` ``results`` dict/path). ``speed``: ``{"models": {name: {field: number}}}``.
    ``samples``: ``[{"prompt": ..., "completions": {model: text}}]``. ``inputs``: other files the caller
    read (never replaced). The output is checked first (``moekit.outputs``: an existing directory only
    with ``overwrite`` and only if it holds a moekit report), then every input, then anything is written.
    """
    paths = [p for p in (profile, *plans) if isinstance(p, (str, Path))]
    if isinstance(profile, (str, Path)):
        profile = _load_profile(profile)
    plans = [load_plan(p) for p in plans]
    models = [(profile.meta.get("model") or {}).get("source") if profile is not None else None,
              *((plan.get("source") or {}).get("model") for plan in plans)]
    out = check_output(out_dir, kind="report", overwrite=overwrite,
                       sources=[*models, *(p for p in paths if Path(p).is_dir() and p is not profile)],
                       inputs=[*paths, *inputs])
    sections = report_sections(profile=profile, plans=plans, results=results, speed=speed, samples=samples, base=out,
                               contrasts=contrasts, reference=reference, similarity_sets=similarity_sets)
    with writing_directory(out, "report") as tmp:
        write_report_files(tmp, title, sections)
    return out / "report.md", out / "report.html"


def _load_profile(path: str | Path) -> Any:
    from moekit.profile.profile_file import Profile, ProfileError

    try:
        return Profile.load(path)
    except ProfileError as err:
        raise ReportError(str(err)) from None


def require_profile_for_sets(contrasts: Sequence[Any] | None, reference: str | None,
                             similarity_sets: Sequence[str] | None) -> None:
    """Without a profile, contrasts and similarities have no named sets to compare: refuse them."""
    if contrasts or reference or similarity_sets:
        raise ReportError("--contrast, --similarity-to and --similarity-sets compare named sets of a profile: give "
                          "--profile too")


def report_sections(*, profile: Any = None, plans: Sequence[Any] = (),
                    results: Sequence[ResultPoint | Mapping[str, Any]] = (), speed: Mapping[str, Any] | None = None,
                    samples: Sequence[Mapping[str, Any]] | None = None, base: Path | None = None,
                    contrasts: Sequence[tuple[str, str]] = (), reference: str | None = None,
                    similarity_sets: Sequence[str] | None = None) -> list[Section]:
    """The report's sections (tables and figures) for what is given; every input is checked here. ``base``: the
    report's folder, to show local paths relative to it rather than as this machine's absolute paths."""
    sections: list[Section] = []
    if profile is not None:
        loaded = _load_profile(profile) if isinstance(profile, (str, Path)) else profile
        sections.append(load_section(loaded, base))
        sections.append(routing_section(loaded, contrasts, reference, similarity_sets))
    else:
        require_profile_for_sets(contrasts, reference, similarity_sets)
    if plans:
        sections.append(scores_section([load_plan(p) for p in plans], base))
    if results:
        sections.append(quality_section([coerce_result(r) for r in results]))
    if speed is not None:
        sections.append(speed_section(speed))
    if samples is not None:
        sections.append(samples_section(samples))
    if not sections:
        raise ReportError("nothing to report: give a profile, plans, results, speed numbers or samples")
    return sections


def write_report_files(directory: Path, title: str, sections: Sequence[Section]) -> tuple[Path, Path]:
    """``report.md``, ``report.html`` and ``figures/`` into ``directory`` (the caller makes it atomic)."""
    figure_dir = directory / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Image):
                (figure_dir / block.name).write_bytes(block.png)
    md_path, html_path = directory / "report.md", directory / "report.html"
    md_path.write_text(render_markdown(title, sections, figure_dir.name))
    html_path.write_text(render_html(title, sections))
    return md_path, html_path
