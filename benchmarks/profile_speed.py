"""Profiling speed against a plain forward pass, and against an observer that runs every expert.

A model shaped like Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, expert intermediate 768,
32 query / 4 key-value heads of 128, vocabulary 151,936), built from its config with random
weights and ``--layers`` of its 48 decoder layers, in bfloat16 on one GPU. Every variant runs the
same packed batches (``--batch`` x ``--seq-len`` tokens) with ``logits_to_keep=1`` and no KV cache:

- plain: the model's own forward (its default experts implementation, grouped_mm);
- moekit: the same forward with moekit's capture attached (every profile statistic);
- moekit + neuron stats: the same with per-neuron statistics (``--neuron-stats``), by the fused Triton kernel
  (``moekit.profile.kernels``), and again by the torch ops it replaces (``_unfused``); their statistics compared;
- moekit + input norms: the same with Wanda's per-expert input norms (``--input-norms``, for ``--sparsity``);
- moekit + merge stats: the same with the merging methods' statistics (``--merge-stats``: the router-logit Gram
  matrix, and every expert run on every token for its mean output, E/k times the expert FLOPs);
- moekit + gradients (``--gradients``, HEAPr): forward *and* backward from the summed next-token loss with the
  capture's backward hooks (neuron statistics included), and the same forward and backward without the capture
  (plain forward_backward), both as ratios to the plain forward;
- all-experts observer: what REAP-style observers do -- in a hook on each MoE block, run every
  expert on every token (E/k times the expert FLOPs) and accumulate output norms.

Reported: tokens/s of each and the ratio to plain measured in the same run, plain being timed
first and last (the ratio's denominator is their mean; target for moekit: >= 0.90). Also the
largest logit difference between the plain and captured forwards (exactness).

    python benchmarks/profile_speed.py [--tokens 1048576] [--layers 8] [--batch 8] [--seq-len 2048]

Writes benchmarks/results/profile_speed-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moekit.arch import MoEModelView
from moekit.profile import capturing


def qwen3_30b_a3b_config(layers: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_local_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=False,
    )


class AllExpertsObserver:
    """Runs every expert on every token in a forward hook and sums output norms per expert."""

    def __init__(self, view: MoEModelView) -> None:
        self.view = view
        self.norm_sums = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64,
                                                   device=layer.router_weight.device) for layer in view.layers}
        self.handles = [layer.block.register_forward_pre_hook(self._hook(layer)) for layer in view.layers]

    def _hook(self, layer) -> Callable:
        experts = layer.experts

        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            for e in range(layer.num_experts):
                gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                out = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])
                self.norm_sums[layer.index][e] += out.float().norm(dim=-1).sum(dtype=torch.float64)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_batches(model, batches: list[torch.Tensor], before: Callable[[torch.Tensor], None] | None = None) -> float:
    """Seconds to run every batch (after one warm-up batch), synchronised."""
    with torch.inference_mode():
        if before:
            before(batches[0])
        model(input_ids=batches[0], use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for ids in batches:
            if before:
                before(ids)
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_backward_batches(model, batches: list[torch.Tensor], mask: torch.Tensor,
                         before: Callable[[torch.Tensor], None] | None = None) -> float:
    """Seconds to run a forward and a backward pass on every batch (``moekit.profile.collect.forward_backward``,
    parameters frozen), after one warm-up batch, synchronised."""
    from moekit.profile.collect import forward_backward, gradient_mode

    with gradient_mode(model):
        if before:
            before(batches[0])
        forward_backward(model, batches[0], mask)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for ids in batches:
            if before:
                before(ids)
            forward_backward(model, ids, mask)
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 20, help="tokens per variant (observer: --observer-tokens)")
    parser.add_argument("--observer-tokens", type=int, default=1 << 17)
    parser.add_argument("--gradient-tokens", type=int, default=1 << 18, help="tokens of the gradient variants")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = "cuda"
    config = qwen3_30b_a3b_config(args.layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    view = MoEModelView.from_model(model)
    per_batch = args.batch * args.seq_len
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device, generator=gen)
               for _ in range(max(1, args.tokens // per_batch))]
    tokens = len(batches) * per_batch
    mask = torch.ones(args.batch, args.seq_len, device=device)

    results: dict[str, dict] = {}
    plain = run_batches(model, batches)
    results["plain"] = {"tokens": tokens, "seconds": plain, "tokens_per_second": tokens / plain}
    neuron_tensors: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, options in (("moekit", {}), ("moekit_neuron_stats", {"neuron_stats": True}),
                          ("moekit_neuron_stats_unfused", {"neuron_stats": True}),
                          ("moekit_input_norms", {"input_norms": True}),
                          ("moekit_input_norms_unfused", {"input_norms": True}),
                          ("moekit_merge_stats", {"merge_stats": True})):
        os.environ["MOEKIT_FUSED_STATS"] = "0" if name.endswith("_unfused") else "1"  # the torch path, for comparison
        with capturing(view, 1, **options) as capture:
            seconds = run_batches(model, batches, lambda ids, c=capture: c.state.begin_batch(0, mask))
            counts = sum(float(c.stats.tensors["count"].sum()) for c in capture.layers.values())
            if options.get("neuron_stats") or options.get("input_norms"):
                keys = ("neuron_energy", "neuron_max") if options.get("neuron_stats") else \
                    ("expert_input_energy", "neuron_input_energy")
                neuron_tensors[name] = {i: {k: c.stats.tensors[k].clone() for k in keys}
                                        for i, c in capture.layers.items()}
        results[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
                         "routed_pairs_counted": counts}
    os.environ.pop("MOEKIT_FUSED_STATS", None)
    fused_vs_torch = {}
    for variant in ("moekit_neuron_stats", "moekit_input_norms"):
        fused, unfused = neuron_tensors[variant], neuron_tensors[variant + "_unfused"]
        for stat in next(iter(fused.values())):
            fused_vs_torch[stat] = max(float(((fused[i][stat] - unfused[i][stat]).abs()
                                              / unfused[i][stat].abs().clamp(min=1e-30)).max()) for i in fused)
    gradient_batches = batches[: max(1, args.gradient_tokens // per_batch)]
    gradient_tokens = len(gradient_batches) * per_batch
    seconds = run_backward_batches(model, gradient_batches, mask)
    results["plain_forward_backward"] = {"tokens": gradient_tokens, "seconds": seconds,
                                         "tokens_per_second": gradient_tokens / seconds}
    with capturing(view, 1, gradients=True) as capture:
        seconds = run_backward_batches(model, gradient_batches, mask,
                                       lambda ids, c=capture: c.state.begin_batch(0, mask))
        filled = sum(float(c.stats.tensors["output_grad_energy"].sum() > 0) for c in capture.layers.values())
    results["moekit_gradients"] = {"tokens": gradient_tokens, "seconds": seconds,
                                   "tokens_per_second": gradient_tokens / seconds,
                                   "layers_with_output_gradients": filled}
    torch.cuda.empty_cache()
    observer_batches = batches[: max(1, args.observer_tokens // per_batch)]
    observer = AllExpertsObserver(view)
    seconds = run_batches(model, observer_batches)
    observer.remove()
    observed = len(observer_batches) * per_batch
    results["all_experts_observer"] = {"tokens": observed, "seconds": seconds, "tokens_per_second": observed / seconds}
    again = run_batches(model, batches)  # plain once more: the ratio uses both, so order effects cancel
    results["plain_again"] = {"tokens": tokens, "seconds": again, "tokens_per_second": tokens / again}
    plain_rate = 2 * tokens / (plain + again)
    for entry in results.values():
        entry["ratio_to_plain"] = entry["tokens_per_second"] / plain_rate

    with torch.inference_mode():
        ids = batches[0][:2, :512]
        expected = model(input_ids=ids, use_cache=False).logits.float()
        with capturing(view) as capture:
            capture.state.begin_batch(0, torch.ones_like(ids))
            captured = model(input_ids=ids, use_cache=False).logits.float()
    exact = float((expected - captured).abs().max())

    record = {
        "benchmark": "profile_speed", "device": torch.cuda.get_device_name(), "dtype": "bfloat16",
        "model": f"Qwen3-30B-A3B shape, {args.layers} of 48 layers, random weights",
        "batch": args.batch, "seq_len": args.seq_len, "results": results, "max_logit_difference": exact,
        "fused_kernel_vs_torch_max_relative_difference": fused_vs_torch,
        "fused_kernel": "moekit_neuron_stats and moekit_input_norms use moekit.profile.kernels (Triton); the "
                        "_unfused variants the torch ops (MOEKIT_FUSED_STATS=0), on the same batches",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_speed-cuda.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Profiling speed ({record['device']}, {record['model']}, bf16, {args.batch}x{args.seq_len} tokens "
             f"per batch, torch {torch.__version__}, transformers {transformers.__version__})", "",
             "| variant | tokens | tokens/s | ratio to plain |", "|---|---:|---:|---:|"]
    for name, entry in results.items():
        lines.append(f"| {name} | {entry['tokens']:,} | {entry['tokens_per_second']:,.0f} | "
                     f"{entry['ratio_to_plain']:.3f} |")
    lines += ["", f"Largest logit difference, plain vs captured forward: {exact:.3g}", "",
              "moekit_neuron_stats and moekit_input_norms run the fused Triton kernel (moekit.profile.kernels), the "
              "_unfused variants the torch ops it replaces, on the same batches; largest relative difference of "
              "their statistics: "
              + ", ".join(f"{k} {v:.3g}" for k, v in fused_vs_torch.items())]
    (args.out / "profile_speed-cuda.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
