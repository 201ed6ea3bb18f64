"""How exactly moekit's routing function reproduces each family's own router, per dtype and device.

For every tiny family model: route 4096 random hidden states with the model's router and with
moekit's routing function; report the share of tokens whose selected expert sets agree and the
largest gate difference among agreeing tokens. Also: the logits of the whole model run through
``routing_override`` (no experts masked) against its plain forward.

    python benchmarks/routing_exactness.py [--device cuda] [--dtypes float32 bfloat16]

Writes benchmarks/results/routing_exactness-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING

from moekit.arch import MoEModelView, routing_override
from moekit.arch.view import model_routing
from moekit.tiny import TINY_FAMILIES, UNLISTED_TINY_FAMILIES, build_tiny_model


def measure(family: str, dtype: torch.dtype, device: str) -> dict:
    model = build_tiny_model(family).to(device=device, dtype=dtype)
    view = MoEModelView.from_model(model)
    gen = torch.Generator().manual_seed(0)
    agree, diff = [], 0.0
    for layer in view.layers:
        hidden = torch.randn(4096, layer.router_weight.shape[-1], generator=gen).to(device, dtype)
        with torch.no_grad():
            index, weights = model_routing(layer, hidden)
            mine = layer.route(hidden)
        a, b = index.sort(-1), mine.index.sort(-1)
        same = (a.values == b.values).all(-1)
        agree.append(same.float().mean().item())
        if same.any():
            wa = weights.gather(-1, a.indices).float()[same]
            wb = mine.weights.gather(-1, b.indices).float()[same]
            diff = max(diff, (wa - wb).abs().max().item())
    ids = torch.randint(3, 256, (4, 64), generator=gen).to(device)
    with torch.no_grad():
        plain = model(ids).logits.float()
        with routing_override(view, {}):
            through = model(ids).logits.float()
    return {"family": family, "dtype": str(dtype).removeprefix("torch."), "device": device,
            "expert_sets_agree": min(agree), "max_gate_diff": diff,
            "max_logit_diff_override": (plain - through).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    for family in [f for f in TINY_FAMILIES + UNLISTED_TINY_FAMILIES if f in CONFIG_MAPPING]:
        for dtype in args.dtypes:
            try:
                rows.append(measure(family, getattr(torch, dtype), args.device))
            except Exception as err:  # report and go on: one family must not hide the others
                rows.append({"family": family, "dtype": dtype, "device": args.device, "error": repr(err)[:300]})
            print(json.dumps(rows[-1]), flush=True)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"routing_exactness-{args.device.split(':')[0]}"
    (args.out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    lines = [f"# Routing exactness ({args.device}; torch {env['torch']}, transformers {env['transformers']})", "",
             "| family | dtype | expert sets agree | max gate diff | max logit diff (override) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['dtype']} | error: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['family']} | {r['dtype']} | {r['expert_sets_agree']:.4f} | {r['max_gate_diff']:.2e} | "
                         f"{r['max_logit_diff_override']:.2e} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
