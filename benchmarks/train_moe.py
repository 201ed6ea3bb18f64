"""Train small MoE language models from stock transformers configs on the multi-domain corpus.

Testbeds (``TESTBEDS``; every one uses the SmolLM2 tokenizer, vocabulary 49,152, tied embeddings):

- ``qwen3-32x4``: Qwen3-MoE, 32 fine-grained experts, top-4, softmax routing with renormalisation;
- ``mixtral-8x2``: Mixtral, 8 experts, top-2;
- ``deepseek3-32x4``: DeepSeek-V3, 32 routed experts top-4 + 1 shared expert, sigmoid routing with a
  selection correction bias updated without an auxiliary loss (DeepSeek-V3's bias rule), 4 groups,
  2 chosen per token, first layer dense;
- ``demo-qwen3-16x4``: a smaller Qwen3-MoE (16 experts, top-4, ~8M parameters, <= 20 MB in bf16), the
  model bundled with moekit for ``moekit demo``;
- ``qwen3-128x8``: fine-grained like Qwen3-30B-A3B (128 experts, top-8, 8 layers, expert width 48, ~39M
  parameters, ~77 MB in bf16: too large to come back from the GPU machine, so it is retrained there, in the
  same lease as the experiments that use it, from this recipe).

Data: the corpus built by ``benchmarks/corpus/build_corpus.py`` (code: Python, C, Go, Java; prose:
English, German, French, Spanish, Russian; math word problems). Each step draws every sequence
from a domain chosen uniformly, at a random offset of that domain's training stream (documents
separated by <|endoftext|>). AdamW, bf16 autocast, linear warm-up then cosine decay. Balancing
(``--balancing``): ``per-layer`` (default) adds the Switch Transformer loss of every MoE layer,
averaged over layers (``moekit.recover.per_layer_balance_loss``, coefficient ``--aux-coef``), as Megatron trains
released MoEs;
``pooled`` is transformers' ``load_balancing_loss_func``, which adds every layer's counts and
probabilities into one vector before balancing -- it balances "expert j summed over layers", so a
layer can starve experts while another compensates (the earlier testbeds were trained with it); the
DeepSeek-V3 testbed's correction bias is updated either way.

After training: per-domain held-out perplexity, and specialisation measured by moekit itself (the
profiler on each domain's held-out text; per-domain load and the overlap of domains' most-used
experts). Saved per testbed into ``--out/<name>/``: the checkpoint (safetensors shards <= 15 MB,
tokenizer), ``training.json`` (recipe, loss curve, perplexities, specialisation, versions),
``loss.png``.

    python benchmarks/train_moe.py --corpus benchmarks/corpus/out --testbed qwen3-32x4 --minutes 8 --out OUT
    python benchmarks/train_moe.py --corpus ... --testbed demo-qwen3-16x4 --device cpu --steps 3 --batch-size 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "corpus"))
from shards import corpus_fingerprint, load_manifest, load_split  # noqa: E402

from moekit.arch import MoEModelView  # noqa: E402
from moekit.data import CalibrationSet  # noqa: E402
from moekit.profile import collect_profile  # noqa: E402
from moekit.profile.analyze import set_specialisation  # noqa: E402
from moekit.recover import per_layer_balance_loss  # noqa: E402

TOKENIZER = ROOT / "corpus" / "smollm2_tokenizer"
VOCAB = 49152

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=2048,
                               rope_theta=10000.0, bos_token_id=1, eos_token_id=0, pad_token_id=2,
                               router_aux_loss_coef=0.01, output_router_logits=False)
TESTBEDS: dict[str, dict[str, Any]] = {
    "qwen3-32x4": dict(model_type="qwen3_moe", hidden_size=160, num_hidden_layers=6, num_attention_heads=5,
                       num_key_value_heads=1, head_dim=32, intermediate_size=320, moe_intermediate_size=80,
                       num_experts=32, num_experts_per_tok=4, norm_topk_prob=True),
    "mixtral-8x2": dict(model_type="mixtral", hidden_size=160, num_hidden_layers=6, num_attention_heads=5,
                        num_key_value_heads=1, head_dim=32, intermediate_size=320, num_local_experts=8,
                        num_experts_per_tok=2),
    "deepseek3-32x4": dict(model_type="deepseek_v3", hidden_size=160, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=320, moe_intermediate_size=80,
                           n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, n_group=4,
                           topk_group=2, first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True,
                           q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                           v_head_dim=32),
    "demo-qwen3-16x4": dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=32, intermediate_size=256, moe_intermediate_size=64,
                            num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
    "qwen3-128x8": dict(model_type="qwen3_moe", hidden_size=192, num_hidden_layers=8, num_attention_heads=6,
                        num_key_value_heads=2, head_dim=32, intermediate_size=384, moe_intermediate_size=48,
                        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
}
BIAS_UPDATE_SPEED = 1e-3  # DeepSeek-V3's gamma for the aux-loss-free balancing bias


BALANCING = ("per-layer", "pooled")


def balance_of(profile: Any) -> dict[str, Any]:
    """Per MoE layer, on held-out text of every domain: MaxVio (max load / mean load - 1), the share of experts
    below a quarter of the mean load and below 1% of it; and whether the bar of released MoEs is met (MaxVio
    <= 0.5 and no expert below a quarter of the mean, in every layer)."""
    from moekit.profile.analyze import layer_summary

    rows = []
    for layer in profile.fingerprint["moe_layers"]:
        row = layer_summary(profile, layer)
        experts = len(profile.stat(layer, "count"))
        rows.append({"layer": layer, "max_violation": round(row["max_violation"], 4),
                     "below_quarter_of_mean": round(len(row["starved_experts"]) / experts, 4),
                     "below_1pct_of_mean": round(len(row["nearly_dead_experts"]) / experts, 4)})
    return {"layers": rows, "bar_met": balance_bar_met(rows)}


def balance_bar_met(rows: list[dict[str, Any]]) -> bool:
    """The bar of released MoEs on ``balance_of``'s rows: MaxVio at most ``MAX_VIOLATION_BAR`` and no starved
    expert, in every layer (the thresholds ``moekit analyze`` warns with)."""
    from moekit.profile.analyze import MAX_VIOLATION_BAR

    return all(r["max_violation"] <= MAX_VIOLATION_BAR and r["below_quarter_of_mean"] == 0 for r in rows)


def build_config(name: str) -> Any:
    spec = dict(TESTBEDS[name])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **{**_COMMON, **spec})


class DomainSampler:
    """Random windows of each domain's training stream, kept on the device."""

    def __init__(self, corpus: Path, domains: list[str], split: str, device: str) -> None:
        self.streams = {}
        for domain in domains:
            stream = load_split(corpus, domain, split).with_separator()
            self.streams[domain] = torch.from_numpy(stream.astype(np.int64)).to(device)
        self.domains = domains

    def batch(self, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        rows = []
        picks = torch.randint(len(self.domains), (batch_size,), generator=gen)
        for pick in picks.tolist():
            stream = self.streams[self.domains[pick]]
            start = int(torch.randint(len(stream) - seq_len - 1, (1,), generator=gen))
            rows.append(stream[start:start + seq_len + 1])
        return torch.stack(rows)


def record_router_inputs(view: MoEModelView) -> dict[int, torch.Tensor]:
    """Keep the last hidden states each router saw (for the balancing-bias update)."""
    seen: dict[int, torch.Tensor] = {}
    for layer in view.layers:
        def hook(_module: Any, args: tuple, index: int = layer.index) -> None:
            seen[index] = args[0].detach()
        layer.router.register_forward_pre_hook(hook)
    return seen


def update_correction_bias(view: MoEModelView, router_inputs: dict[int, torch.Tensor]) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: bias_j += gamma * sign(mean load - load_j)."""
    with torch.no_grad():
        for layer in view.layers:
            bias = layer.correction_bias
            if bias is None or layer.index not in router_inputs:
                continue
            hidden = router_inputs[layer.index]
            index = layer.route(hidden.reshape(-1, hidden.shape[-1]).to(layer.router_weight.dtype)).index
            load = torch.bincount(index.flatten(), minlength=layer.num_experts).float()
            bias.add_(BIAS_UPDATE_SPEED * torch.sign(load.mean() - load).view_as(bias))


def stream_tokens(corpus: Path, domain: str, split: str, seq_len: int, tokens: int) -> torch.Tensor:
    """The first whole ``seq_len`` windows (at most ``tokens``) of a split's stream, plus the next token."""
    stream = torch.from_numpy(load_split(corpus, domain, split).with_separator().astype(np.int64))
    usable = min(tokens, (len(stream) - 1) // seq_len * seq_len)
    return stream[: usable + 1]


def stream_perplexity(model: Any, ids: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over ``ids`` cut into ``seq_len`` windows (bf16 autocast on CUDA)."""
    device = model.get_input_embeddings().weight.device
    inputs, targets = ids[:-1].view(-1, seq_len).to(device), ids[1:].view(-1, seq_len).to(device)
    total = 0.0
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(inputs), batch_size):
            logits = model(input_ids=inputs[start:start + batch_size], use_cache=False).logits.float()
            total += float(torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets[start:start + batch_size].flatten(), reduction="sum"))
    return math.exp(total / targets.numel())


def heldout_perplexity(model: Any, corpus: Path, domains: list[str], seq_len: int, tokens: int) -> dict[str, float]:
    """Perplexity on the first ``tokens`` tokens of each domain's held-out stream."""
    model.eval()
    return {d: stream_perplexity(model, stream_tokens(corpus, d, "heldout", seq_len, tokens), seq_len)
            for d in domains}


def specialisation(model: Any, corpus: Path, domains: list[str], seq_len: int, tokens: int) -> dict[str, Any]:
    """moekit's own profile of each domain's held-out text: per-domain load and overlaps."""
    sets = []
    for domain in domains:
        stream = torch.from_numpy(load_split(corpus, domain, "heldout").with_separator().astype(np.int64))
        usable = min(tokens, len(stream) // seq_len * seq_len)
        ids = stream[:usable].view(-1, seq_len)
        sets.append(CalibrationSet(domain, ids, torch.ones_like(ids)))
    profile = collect_profile(model, sets, batch_size=16, progress=False)
    layers = profile.fingerprint["moe_layers"]
    load = {d: {str(layer): [round(float(x), 5) for x in profile.stat(layer, "count", d) /
                              profile.stat(layer, "count", d).sum()] for layer in layers} for d in domains}
    spec = set_specialisation(profile)
    overlaps = {pair: round(v["mean_jaccard"], 4) for pair, v in spec["overlap"].items()}
    return {"load_share": load, "top_expert_jaccard": overlaps,
            "mean_jaccard": sum(overlaps.values()) / max(len(overlaps), 1), "profile": profile}


def train(name: str, corpus: Path, out: Path, minutes: float, steps: int | None, batch_size: int, seq_len: int,
          lr: float, seed: int, device: str, eval_tokens: int, balancing: str = "per-layer",
          aux_coef: float = 0.01, micro_batches: int = 1) -> dict[str, Any]:
    if balancing not in BALANCING:
        raise ValueError(f"unknown balancing {balancing!r}; valid: {', '.join(BALANCING)}")
    torch.manual_seed(seed)
    config = build_config(name)
    config.router_aux_loss_coef = aux_coef
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    view = MoEModelView.from_model(model)
    manifest = load_manifest(corpus)
    domains = sorted(manifest["domains"])
    sampler = DomainSampler(corpus, domains, "train", device)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    has_bias = any(layer.correction_bias is not None for layer in view.layers)
    router_inputs = record_router_inputs(view) if has_bias else {}
    planned = steps or 10**9
    warmup = 100 if steps is None or steps > 200 else 1
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0
    deadline = start + minutes * 60
    model.train()
    while step < planned and (steps is not None or time.perf_counter() < deadline):
        progress = (time.perf_counter() - start) / (minutes * 60) if steps is None else step / planned
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        batch = sampler.batch(batch_size, seq_len, gen)
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_aux = 0.0, None
        for micro in batch.chunk(micro_batches):
            # micro-batches (gradient accumulation) bound the [batch, seq, vocab] logits' memory; the optimizer
            # step still sees the whole batch
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
                output = model(input_ids=micro[:, :-1], use_cache=False, output_router_logits=True)
            logits = output.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten())
            if balancing == "per-layer" and not has_bias and output.router_logits:
                aux = per_layer_balance_loss(output.router_logits, view)
            else:
                aux = getattr(output, "aux_loss", None)
            total = loss + (config.router_aux_loss_coef * aux if aux is not None else 0.0)
            (total / micro_batches).backward()
            del logits, output
            step_loss += float(loss.detach()) / micro_batches
            if aux is not None:
                step_aux = (step_aux or 0.0) + float(aux.detach()) / micro_batches
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if has_bias:
            update_correction_bias(view, router_inputs)
        if step % 25 == 0:
            history.append({"step": step, "seconds": round(time.perf_counter() - start, 1),
                            "loss": step_loss, "aux_loss": step_aux})
            print(f"{name} step {step} loss {step_loss:.3f}", flush=True)
        step += 1
    seconds = time.perf_counter() - start
    model.eval()
    ppl = heldout_perplexity(model, corpus, domains, seq_len, eval_tokens)
    spec = specialisation(model, corpus, domains, seq_len, eval_tokens)
    balance = balance_of(spec.pop("profile"))
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(target, max_shard_size="15MB")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(target)
    record = {
        "testbed": name, "config": TESTBEDS[name], "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": {"steps": step, "minutes": round(seconds / 60, 2), "batch_size": batch_size,
                   "micro_batches": micro_batches, "seq_len": seq_len,
                   "tokens_seen": step * batch_size * seq_len, "lr": lr, "seed": seed, "domains": domains,
                   "mixture": "uniform over domains", "corpus_manifest": f"{corpus.as_posix()}/manifest.json",
                   "corpus_subset": manifest.get("subset"),
                   "corpus_fingerprint": corpus_fingerprint(manifest),
                   "balancing": "DeepSeek-V3 correction-bias updates" if has_bias else
                   {"per-layer": "Switch loss per MoE layer, averaged over layers (per_layer_balance_loss)",
                    "pooled": "transformers' load_balancing_loss_func (counts pooled over layers)"}[balancing],
                   "aux_coefficient": config.router_aux_loss_coef},
        "loss_curve": history, "heldout_perplexity": ppl, "specialisation": spec, "balance": balance,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    (target / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(history, target / "loss.png", name)
    return record


def _plot(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT / "corpus" / "out")
    parser.add_argument("--testbed", choices=sorted(TESTBEDS), action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.0, help="training time per testbed")
    parser.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of --minutes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per domain")
    parser.add_argument("--balancing", choices=BALANCING, default="per-layer",
                        help="load balancing: the Switch loss of every layer, or transformers' pooled one")
    parser.add_argument("--aux-coef", type=float, default=0.01, help="coefficient of the balancing loss")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="split each batch into this many micro-batches (gradient accumulation) to bound memory")
    args = parser.parse_args()
    for name in args.testbed:
        record = train(name, args.corpus, args.out, args.minutes, args.steps, args.batch_size, args.seq_len,
                       args.lr, args.seed, args.device, args.eval_tokens, args.balancing, args.aux_coef,
                       args.micro_batches)
        print(json.dumps({k: record[k] for k in ("testbed", "parameters", "recipe", "heldout_perplexity")}))
        print("balance bar (MaxVio <= 0.5, no expert below a quarter of the mean, every layer) met:",
              record["balance"]["bar_met"])
        print("mean top-expert Jaccard between domains:", record["specialisation"]["mean_jaccard"])


if __name__ == "__main__":
    main()
