"""Report figures, each returned as PNG bytes (matplotlib, Agg backend, no display needed).

- ``load_heatmap``: per named set of a profile, layers x experts, share of the layer's routed tokens.
- ``score_figure``: per layer of a plan, scores sorted high to low, kept and dropped experts coloured,
  the cut drawn after the last kept position.
- ``quality_figure``: per metric, value against the fraction of experts removed, one line per method;
  the original model (method ``original``, ratio 0) starts every line.
- ``contrast_heatmap`` / ``contrast_bars``: a routing contrast of two named sets (log-odds per layer and expert,
  JS divergence per layer; the top experts of one layer with both sets' shares).
- ``coactivation_heatmap``: P(j chosen | i chosen) of one layer; ``sparsity_lines``: TLS and CLS-L per layer;
  ``similarity_lines``: routing similarity of every set to a reference set per layer.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from moekit.report.inputs import ORIGINAL_METHOD, ResultPoint

KEPT_COLOUR = "#2b6cb0"
DROPPED_COLOUR = "#d9822b"
PROTECTED_COLOUR = "#2f855a"
MAX_METRIC_PANELS = 12


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _grid(panels: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, panels))
    return math.ceil(panels / cols), cols


def load_heatmap(profile: Any) -> bytes:
    """Layers x experts share of routed tokens, one panel per named set of ``profile``."""
    import torch

    layers = profile.fingerprint["moe_layers"]
    names = profile.set_names
    experts = max(profile.fingerprint["num_experts"])
    width = min(4 + experts * 0.12, 14)
    fig, axes = plt.subplots(len(names), 1, figsize=(width, 0.9 + 0.28 * len(layers) * len(names) + 0.6 * len(names)),
                             squeeze=False)
    grids = {}
    for name in names:  # [layers, experts]; padded with NaN where a layer has fewer experts
        rows = []
        for layer in layers:
            counts = profile.stat(layer, "count", name).double()
            share = counts / counts.sum().clamp(min=1)
            rows.append(torch.nn.functional.pad(share, (0, experts - share.numel()), value=float("nan")))
        grids[name] = torch.stack(rows)
    top = max(float(grid.nan_to_num(0).max()) for grid in grids.values()) or 1.0  # one colour scale for all sets
    for ax, name in zip(axes[:, 0], names, strict=True):
        image = ax.imshow(grids[name].numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                          vmin=0, vmax=top)
        tokens = next((s["tokens"] for s in profile.meta["sets"] if s["name"] == name), None)
        ax.set_title(f"expert load: {name}" + (f" ({tokens:,} tokens)" if tokens is not None else ""), fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers] if len(layers) <= 24 else None)
        if len(layers) > 24:
            ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.04, label="share of tokens")
    fig.tight_layout()
    return to_png(fig)


def plan_layers(plan: Mapping[str, Any]) -> list[tuple[int, list[dict[str, Any]]]]:
    """``[(layer, expert entries)]`` of a plan, sorted by layer; entries carry score and decision."""
    out = []
    for name, layer in sorted(plan["layers"].items(), key=lambda item: int(item[0])):
        entries = layer.get("experts")
        if not entries:  # a plan without scores (listed by hand): kept/removed only
            kept = set(layer["kept"])
            total = len(kept) + len(layer.get("removed", []))
            entries = [{"expert": e, "score": None, "decision": "keep" if e in kept else "drop", "reason": ""}
                       for e in range(total)]
        out.append((int(name), list(entries)))
    return out


def score_figure(plan: Mapping[str, Any], title: str) -> bytes:
    """Small multiples, one per layer: sorted scores, kept vs dropped, the cut as a dashed line."""
    layers = plan_layers(plan)
    rows, cols = _grid(len(layers), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.3 * rows + 0.5), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax, (index, entries) in zip(axes.flat, layers, strict=False):
        has_scores = all(e.get("score") is not None for e in entries)
        ordered = sorted(entries, key=lambda e: (-(e["score"] if has_scores else e["decision"] == "keep"),
                                                 e["expert"]))
        heights = [e["score"] if has_scores else 1.0 for e in ordered]
        colours = [(PROTECTED_COLOUR if str(e.get("reason", "")).startswith("protected") else KEPT_COLOUR)
                   if e["decision"] == "keep" else DROPPED_COLOUR for e in ordered]
        ax.bar(range(len(ordered)), heights, color=colours, width=0.85)
        kept = sum(e["decision"] == "keep" for e in ordered)
        ax.axvline(kept - 0.5, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"layer {index}: keep {kept} of {len(ordered)}", fontsize=9)
        ax.set_xticks([])
        ax.tick_params(labelsize=7)
        if not has_scores:
            ax.set_yticks([])
    protected = any(str(e.get("reason", "")).startswith("protected") for _, entries in layers for e in entries)
    kinds = [(KEPT_COLOUR, "kept"), (PROTECTED_COLOUR, "kept (protected)"), (DROPPED_COLOUR, "dropped")]
    handles = [Patch(color=c, label=n) for c, n in kinds if protected or n != "kept (protected)"]
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=3)
    fig.suptitle(f"{title}: scores per layer, sorted (x: experts by score)", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93 if rows == 1 else 0.96))
    return to_png(fig)


def lower_is_better(metric: str) -> bool:
    """Perplexity-like metrics (lower is better) by name."""
    name = metric.lower()
    return any(key in name for key in ("perplexity", "ppl", "bits_per_byte", "loss", "nll"))


def method_lines(points: Sequence[ResultPoint]) -> dict[str, list[ResultPoint]]:
    """Points grouped by method, sorted by ratio; the original model (ratio 0) is prepended to each line."""
    originals = [p for p in points if p.method == ORIGINAL_METHOD or (p.ratio == 0 and p.method == "")]
    lines: dict[str, list[ResultPoint]] = {}
    for point in points:
        if point not in originals:
            lines.setdefault(point.method, []).append(point)
    if not lines:
        return {ORIGINAL_METHOD: originals}
    for method, line in lines.items():
        starts = originals if all(p.ratio > 0 for p in line) else []
        lines[method] = sorted(starts + line, key=lambda p: p.ratio)
    return lines


def quality_metrics(points: Sequence[ResultPoint]) -> list[str]:
    """Metric names present in any point, first-seen order."""
    order: dict[str, None] = {}
    for point in points:
        order.update(dict.fromkeys(point.metrics))
    return list(order)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
MIN_SPAN = 0.05  # of the values' magnitude: smaller differences do not fill the panel


def quality_figure(points: Sequence[ResultPoint]) -> bytes:
    """One panel per metric (at most ``MAX_METRIC_PANELS``): metric against ratio, one line per method, each
    point marked, error bars where the evaluation gave a standard error; methods get their own marker and line
    style and a small sideways offset so that lines on top of each other stay visible; the y axis spans at
    least ``MIN_SPAN`` of the values, so that tiny differences do not look steep."""
    metrics = quality_metrics(points)[:MAX_METRIC_PANELS]
    lines = method_lines(points)
    rows, cols = _grid(len(metrics), 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    offsets = {method: (i - (len(lines) - 1) / 2) * 0.6 for i, method in enumerate(lines)}
    for ax, metric in zip(axes.flat, metrics, strict=False):
        values: list[float] = []
        for i, (method, line) in enumerate(lines.items()):
            drawn = [p for p in line if p.metrics.get(metric) is not None]
            if not drawn:
                continue
            xs = [100 * p.ratio + offsets[method] for p in drawn]
            ys = [float(p.metrics[metric]) for p in drawn]  # type: ignore[arg-type]
            errors = [p.stderr.get(metric) or 0.0 for p in drawn]
            values += [y + e for y, e in zip(ys, errors, strict=True)] + \
                [y - e for y, e in zip(ys, errors, strict=True)]
            ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker=MARKERS[i % len(MARKERS)],
                        linestyle=LINESTYLES[i % len(LINESTYLES)], capsize=2, markersize=4, label=method)
        if values:
            low, high = min(values), max(values)
            span = max(high - low, MIN_SPAN * max(abs(low), abs(high), 1e-12))
            middle = (low + high) / 2
            ax.set_ylim(middle - 0.6 * span, middle + 0.6 * span)
        better = "lower is better" if lower_is_better(metric) else "higher is better"
        ax.set_title(f"{metric} ({better})", fontsize=9)
        ax.set_xlabel("experts removed (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return to_png(fig)


def speed_figure(models: Mapping[str, Mapping[str, Any]], reference: str, labels: Mapping[str, str]) -> bytes:
    """Horizontal bars: every model's size and speed as a ratio to the reference (1 = the same), one group of
    bars per quantity (``labels``: field -> name, in order), the reference's line at 1; speeds whose runs overlap
    the reference's are hatched."""
    columns = list(labels)
    others = [name for name in models if name != reference] or [reference]
    quantities = [c for c in columns if any(isinstance((models[n].get("ratios") or {}).get(c), (int, float))
                                            for n in others)]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * max(1, len(quantities) * len(others))))
    height = 0.8 / len(others)
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(others):
        ratios = models[name].get("ratios") or {}
        noise = models[name].get("within_noise") or {}
        for j, quantity in enumerate(quantities):
            value = ratios.get(quantity)
            if not isinstance(value, (int, float)):
                continue
            inside = name != reference and bool(noise.get(quantity.split("_")[0]))
            ax.barh(j + i * height, value, height * 0.9, color=colours(i), hatch="//" if inside else None,
                    edgecolor="white" if inside else None, label=name if j == 0 else None)
            ax.text(value, j + i * height, f" {value:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks([j + height * (len(others) - 1) / 2 for j in range(len(quantities))],
                  [labels.get(q, q) for q in quantities])
    ax.invert_yaxis()
    ax.set_xlabel(f"ratio to {reference} (1 = the same; sizes: lower is smaller, speeds: higher is faster)")
    ax.set_xlim(0, max([1.2] + [1.15 * (models[n].get("ratios") or {}).get(q) for n in others for q in quantities
                                if isinstance((models[n].get("ratios") or {}).get(q), (int, float))]))
    handles, names = ax.get_legend_handles_labels()
    if any((models[n].get("within_noise") or {}).get(p) for n in others if n != reference
           for p in ("prefill", "decode")):
        handles.append(Patch(facecolor="grey", hatch="//", edgecolor="white"))
        names.append("inside the timing noise")
    if handles:
        ax.legend(handles, names, loc="lower right", fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def contrast_heatmap(contrast: Mapping[str, Any]) -> bytes:
    """Layers x experts log-odds of set A against set B (``moekit.profile.contrast.contrast_profile``), red = more in
    A, blue = more in B, one symmetric colour scale; beside it the per-layer Jensen-Shannon divergence."""
    import numpy as np

    layers = contrast["layers"]
    experts = max(len(row["log_odds"]) for row in layers)
    grid = np.full((len(layers), experts), np.nan)
    for i, row in enumerate(layers):
        grid[i, :len(row["log_odds"])] = row["log_odds"]
    bound = float(np.nanmax(np.abs(grid))) or 1.0
    width = min(5 + experts * 0.12, 15)
    fig, (ax, side) = plt.subplots(1, 2, figsize=(width, 1.2 + 0.28 * len(layers)),
                                   gridspec_kw={"width_ratios": [6, 1]}, squeeze=True)
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", interpolation="nearest", vmin=-bound, vmax=bound)
    a, b = contrast["a"], contrast["b"]
    ax.set_title(f"log-odds of routing: {a} (red) against {b} (blue)", fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    names = [str(row["layer"]) for row in layers]
    ax.set_yticks(range(len(layers)), names if len(layers) <= 24 else None)
    if len(layers) > 24:
        ax.set_yticks([])
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="log-odds")
    js = [row["js_divergence_bits"] for row in layers]
    side.barh(range(len(layers)), js, color=KEPT_COLOUR)
    side.set_ylim(len(layers) - 0.5, -0.5)  # layer order as in the heatmap
    side.set_yticks([])
    # the full 0..1 bit scale when the sets differ a lot; otherwise one that shows small differences (labelled)
    top = 1.0 if max(js, default=0) > 0.25 else max(1e-3, 1.25 * max(js, default=0))
    side.set_xlim(0, top)
    if top < 1.0 and len(layers) <= 24:
        for y, value in enumerate(js):
            side.text(value + 0.02 * top, y, f"{value:.3g}", va="center", fontsize=7)
    side.set_xlabel("JS divergence (bits)" + ("" if top == 1.0 else f", scale 0..{top:.2g}"))
    side.set_title("per layer", fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def contrast_bars(contrast: Mapping[str, Any], layer: int, top: int = 8) -> bytes:
    """The ``top`` experts of one layer that set A routes to most more than set B: their share of each set's
    routing selections side by side."""
    import numpy as np

    row = next(r for r in contrast["layers"] if r["layer"] == layer)
    order = sorted(range(len(row["log_odds"])), key=lambda j: (-row["log_odds"][j], j))[:top]
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(order), 3.2))
    ax.bar(x - 0.2, [row["share_a"][j] for j in order], 0.4, label=contrast["a"], color=DROPPED_COLOUR)
    ax.bar(x + 0.2, [row["share_b"][j] for j in order], 0.4, label=contrast["b"], color=KEPT_COLOUR)
    ax.set_xticks(x, [str(j) for j in order])
    ax.set_xlabel(f"expert (layer {layer}, highest log-odds first)")
    ax.set_ylabel("share of routing selections")
    ax.set_title(f"layer {layer}: experts {contrast['a']} routes to more than {contrast['b']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def coactivation_heatmap(profile: Any, layer: int) -> bytes:
    """P(j chosen | i chosen) for every pair of experts of one layer, all sets together (the diagonal is 1)."""
    counts = profile.stat(layer, "coactivation").double()
    conditional = counts / counts.diagonal().clamp(min=1)[:, None]
    experts = counts.shape[0]
    size = min(3 + experts * 0.08, 11)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(conditional.numpy(), cmap="magma", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(f"co-activation, layer {layer}: P(column expert | row expert)", fontsize=10)
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    fig.colorbar(image, ax=ax, fraction=0.04, label="P(j also chosen | i chosen)")
    fig.tight_layout()
    return to_png(fig)


def sparsity_lines(profile: Any) -> bytes:
    """Token- and chunk-level sparsity per MoE layer (``moekit.profile.analyze.layer_summary``: TLS, CLS-L)."""
    from moekit.profile.analyze import layer_summary

    summaries = [layer_summary(profile, layer) for layer in profile.fingerprint["moe_layers"]]
    layers = [s["layer"] for s in summaries]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(layers, [s["token_sparsity"] for s in summaries], marker="o", label="TLS (per token)")
    for size in summaries[0]["chunk_sparsity"]:
        ax.plot(layers, [s["chunk_sparsity"][size] for s in summaries], marker=".", label=f"CLS-{size}")
    ax.set_xlabel("MoE layer")
    if len(layers) <= 24:
        ax.set_xticks(layers)
    ax.set_ylabel("sparsity (1 - share of experts used)")
    ax.set_ylim(0, 1)
    ax.set_title("experts left unused per token and per chunk of L tokens", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def similarity_lines(similarity: Mapping[str, Any]) -> bytes:
    """Routing similarity of every set to the reference set per MoE layer (``routing_similarity``)."""
    layers = similarity["layers"]
    lines = similarity["similarity"]
    fig, ax = plt.subplots(figsize=(7.5 if len(lines) > 6 else 6.5, 3.4))
    colours = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20")
    styles = ("-", "--", ":", "-.")
    for n, (name, values) in enumerate(lines.items()):  # past 10 lines a colour repeats only with another style
        ax.plot(layers, values, marker="o", markersize=3, label=name, color=colours(n % colours.N),
                linestyle=styles[(n // colours.N) % len(styles)])
    ax.set_xlabel("MoE layer")
    if len(layers) <= 24:
        ax.set_xticks(layers)
    ax.set_ylabel("1 - JS divergence (bits)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"routing similarity to {similarity['reference']} per layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the lines
    fig.tight_layout()
    return to_png(fig)
