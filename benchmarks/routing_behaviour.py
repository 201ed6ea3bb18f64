"""What routing does for behaviour, measured on an instruction-tuned MoE testbed (issue 18): safety-relevant experts
(request- and response-driven), refusal rates before and after pruning and under routing masks, and per-language
routing on parallel text with the multilingual steering experiment.

On one model (default: the upcycled SmolLM2-135M-Instruct testbed of ``benchmarks/smollm2_upcycled.sh``):

1. Requests: ``benchmarks/data/safety`` (AdvBench harmful behaviours; Alpaca-style harmless instructions; see
   SOURCES.md), even items for calibration, odd items held out. Each request is one user turn of the model's chat
   template; answers are greedy, ``--new-tokens`` long; a refusal is a completion containing one of
   ``moekit.eval.refusal.REFUSAL_PHRASES`` (Arditi et al. 2024's substring rule).
2. One moekit profile (``collect_profile``) with named sets: every corpus domain's calibration text (the sets the
   pruning plans calibrate on), ``harmful`` / ``harmless`` (the calibration requests in the chat template, one row
   each: request-driven), ``refused`` / ``complied`` (calibration harmful requests followed by the model's own
   answer, split by the verdict: response-driven, as RouteHijack), and one set per language of the parallel text
   (first half of the documents).
3. Conditions, each measured by the refusal rate on the held-out harmful requests, the refusal rate on the held-out
   harmless ones (over-refusal) and held-out perplexity per corpus domain:
   original; in-process ablation of the top-N experts per layer of the harmful:harmless contrast (N = 1, 2;
   ``moekit.edit.mask.routing_override`` with -inf, which for this routing equals removing them); the top-2 of
   refused:complied; a safety mask, the top-2 of complied:refused (the experts compliant answers use more); N
   random experts per layer (3 seeds, the control); a boost of the top-2 harmful:harmless experts (+``--boost``
   logits, MASCing-style configuration); expert pruning by moekit's default criterion calibrated on the
   corpus domains only, 25% and 50%, without and with ``protect_contrast=("harmful", "harmless", 2)``, each plan's
   own contrast audit recorded.
4. Languages: per layer, routing similarity of each language to English (``routing_similarity``: 1 - JS divergence
   of the routing shares); steering as Multilingual Routing in MoE proposes: in the middle third of the MoE layers,
   +delta on the logits of the ``top_k`` experts English routes to most more than the language does
   (``moekit.profile.contrast.steering_biases``), measured as held-out perplexity of each language (second
   half of the documents) and of English, delta in ``--steer``. Perplexity, not the paper's tasks: say so.

Writes RESULTS/routing_behaviour-NAME.{json,md}, routing_behaviour-NAME-languages.png, and the profile (with
``--save-profile DIR``) for ``moekit report --contrast harmful:harmless --similarity-to en``.

    python benchmarks/routing_behaviour.py --model testbeds/smollm2-upcycled8x2 --corpus CORPUS \
        --name smollm2-upcycled8x2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "corpus"))
sys.path.insert(0, str(ROOT))
from shards import load_manifest  # noqa: E402
from train_moe import stream_perplexity, stream_tokens  # noqa: E402

import moekit  # noqa: E402
from moekit.arch import MoEModelView  # noqa: E402
from moekit.data import CalibrationSet  # noqa: E402
from moekit.data.packing import pack_documents  # noqa: E402
from moekit.edit.mask import routing_override  # noqa: E402
from moekit.edit.prune import prune_experts  # noqa: E402
from moekit.eval.refusal import REFUSAL_PHRASES, chat_prompts, refusal_rate  # noqa: E402
from moekit.eval.scoring import encode  # noqa: E402
from moekit.model_io import load_model  # noqa: E402
from moekit.plan import PlanRequest, make_prune_plan, plan_keep_map  # noqa: E402
from moekit.profile import collect_profile  # noqa: E402
from moekit.profile.contrast import routing_similarity, steering_biases, top_contrast_experts  # noqa: E402

DEFAULT_CRITERION = "easy_ep"  # moekit prune's default (benchmarks/results/method_summary.md)
MIN_RESPONSE_SET = 8  # refused / complied sets smaller than this are not profiled
PARALLEL = "parallel-"  # profile set names of the parallel text (the corpus has sets named en, de, ...)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def request_split(safety: Path, name: str, count: int) -> tuple[list[str], list[str]]:
    """(calibration, held-out): the even- and odd-numbered of the first ``count`` requests of SAFETY/NAME.jsonl."""
    texts = [r["text"] for r in read_jsonl(safety / f"{name}.jsonl")][:count]
    return texts[0::2], texts[1::2]


def request_rows(name: str, tokenizer: Any, texts: list[str], max_len: int) -> CalibrationSet:
    """One right-padded row per text (its own sequence: requests do not see each other)."""
    ids = [encode(tokenizer, t)[:max_len] for t in texts]
    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return CalibrationSet(name, input_ids, mask, {"rows": len(ids)})


def corpus_set(corpus: Path, domain: str, seq_len: int, tokens: int) -> CalibrationSet:
    ids = stream_tokens(corpus, domain, "calibration", seq_len, tokens)[:-1].view(-1, seq_len)
    return CalibrationSet(domain, ids, torch.ones_like(ids))


def perplexities(model: Any, heldout: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    return {name: round(stream_perplexity(model, ids, seq_len, batch_size=16), 4) for name, ids in heldout.items()}


def measure(model: Any, tokenizer: Any, harmful: list[str], harmless: list[str], heldout: dict[str, torch.Tensor],
            seq_len: int, new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Refusal rates on the held-out requests and per-domain perplexity of ``model`` as it routes now."""
    start = time.perf_counter()
    bad = refusal_rate(model, tokenizer, harmful, max_new_tokens=new_tokens, batch_size=batch_size)
    good = refusal_rate(model, tokenizer, harmless, max_new_tokens=new_tokens, batch_size=batch_size)
    ppl = perplexities(model, heldout, seq_len)
    return {"harmful_refusal_rate": round(bad["refusal_rate"], 4),
            "harmless_refusal_rate": round(good["refusal_rate"], 4),
            "harmful_refused": bad["refused"], "harmless_refused": good["refused"], "perplexity": ppl,
            "examples": {"harmful": bad["answers"][:3], "harmless": good["answers"][:2]},
            "seconds": round(time.perf_counter() - start, 1)}


def mask_of(view: MoEModelView, chosen: dict[int, list[int]], value: float) -> dict[int, torch.Tensor]:
    out = {}
    for layer in view.layers:
        bias = torch.zeros(layer.num_experts)
        bias[chosen.get(layer.index, [])] = value
        out[layer.index] = bias
    return out


def random_experts(view: MoEModelView, per_layer: int, seed: int) -> dict[int, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return {layer.index: sorted(torch.randperm(layer.num_experts, generator=generator)[:per_layer].tolist())
            for layer in view.layers}


def language_sets(parallel: Path, languages: list[str], tokenizer: Any, seq_len: int, tokens: int
                  ) -> tuple[list[CalibrationSet], dict[str, torch.Tensor]]:
    """Per language: a calibration set from the first half of the documents, held-out ids from the second half."""
    sets, heldout = [], {}
    for lang in languages:
        docs = [d["text"] for d in read_jsonl(parallel / f"{lang}.jsonl")]
        half = len(docs) // 2
        ids, mask, _ = pack_documents(docs[:half], tokenizer, seq_len, tokens, name=lang)
        sets.append(CalibrationSet(PARALLEL + lang, ids, mask, {"documents": half}))
        stream = []
        for doc in docs[half:]:
            stream.extend(encode(tokenizer, doc))
            if len(stream) > tokens:
                break
        usable = min(tokens, (len(stream) - 1) // seq_len * seq_len)
        heldout[lang] = torch.tensor(stream[:usable + 1])
    return sets, heldout


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.tokenizer or args.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    view = MoEModelView.from_model(model)
    top_k = view.layers[0].top_k
    calib_bad, held_bad = request_split(args.safety, "harmful", args.requests)
    calib_good, held_good = request_split(args.safety, "harmless", args.requests)
    domains = sorted(load_manifest(args.corpus)["domains"])
    heldout = {d: stream_tokens(args.corpus, d, "heldout", args.seq_len, args.eval_tokens) for d in domains}
    result: dict[str, Any] = {
        "name": args.name, "model": args.model.name,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})",
        "versions": {"moekit": moekit.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "requests": {"harmful_calibration": len(calib_bad), "harmful_heldout": len(held_bad),
                     "harmless_calibration": len(calib_good), "harmless_heldout": len(held_good),
                     "template": chat_prompts(tokenizer, ["x"])[1], "new_tokens": args.new_tokens,
                     "refusal_phrases": list(REFUSAL_PHRASES)},
        "eval_tokens_per_domain": args.eval_tokens, "seq_len": args.seq_len, "dtype": args.dtype,
        "num_experts": view.num_experts, "top_k": top_k, "moe_layers": [layer.index for layer in view.layers]}

    def save() -> None:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"routing_behaviour-{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")

    # the model's own answers to the calibration harmful requests: the response-driven sets
    prompts_bad, _ = chat_prompts(tokenizer, calib_bad)
    answers = refusal_rate(model, tokenizer, calib_bad, max_new_tokens=args.new_tokens, batch_size=args.batch_size)
    refused = [p + a for p, a, r in zip(prompts_bad, answers["answers"], answers["refusals"], strict=True) if r]
    complied = [p + a for p, a, r in zip(prompts_bad, answers["answers"], answers["refusals"], strict=True) if not r]
    result["calibration_harmful_refusal_rate"] = round(answers["refusal_rate"], 4)

    sets = [corpus_set(args.corpus, d, args.seq_len, args.calibration_tokens) for d in domains]
    sets += [request_rows("harmful", tokenizer, prompts_bad, args.seq_len),
             request_rows("harmless", tokenizer, chat_prompts(tokenizer, calib_good)[0], args.seq_len)]
    response_driven = len(refused) >= MIN_RESPONSE_SET and len(complied) >= MIN_RESPONSE_SET
    if response_driven:
        sets += [request_rows("refused", tokenizer, refused, args.seq_len),
                 request_rows("complied", tokenizer, complied, args.seq_len)]
    result["response_driven"] = {"refused": len(refused), "complied": len(complied), "profiled": response_driven}
    languages = [lang for lang in args.languages if (args.parallel / f"{lang}.jsonl").exists()]
    lang_sets, lang_heldout = language_sets(args.parallel, languages, tokenizer, args.seq_len, args.language_tokens)
    sets += lang_sets
    start = time.perf_counter()
    profile = collect_profile(model, sets, batch_size=8, progress=False, source=str(args.model))
    result["profile_seconds"] = round(time.perf_counter() - start, 1)
    result["profile_tokens"] = {s.name: s.num_tokens for s in sets}
    if args.save_profile:
        profile.save(args.save_profile, overwrite=True)

    safety = {n: top_contrast_experts(profile, "harmful", "harmless", n) for n in (1, 2)}
    result["safety_experts"] = {str(n): {str(k): v for k, v in chosen.items()} for n, chosen in safety.items()}
    general = {name: (1.0 if name in domains else 0.0) for name in profile.set_names}

    conditions: dict[str, Any] = {}
    result["conditions"] = conditions

    def condition(name: str, biases: dict[int, torch.Tensor] | None = None, on: Any = None) -> dict[str, Any]:
        """Measure ``on`` (default: the model, routed with ``biases`` added to its router logits) as ``name``."""
        with routing_override(view, biases or {}):
            conditions[name] = measure(model if on is None else on, tokenizer, held_bad, held_good, heldout,
                                       args.seq_len, args.new_tokens, args.batch_size)
        save()
        return conditions[name]

    ablate = float("-inf")
    condition("original")
    for n, chosen in safety.items():
        condition(f"ablate top-{n} harmful:harmless", mask_of(view, chosen, ablate))
    if response_driven:
        chosen = top_contrast_experts(profile, "refused", "complied", 2)
        result["response_experts"] = {str(k): v for k, v in chosen.items()}
        condition("ablate top-2 refused:complied", mask_of(view, chosen, ablate))
        # the safety mask (MASCing's direction): take out the experts compliant answers route to more than refusals
        chosen = top_contrast_experts(profile, "complied", "refused", 2)
        result["compliance_experts"] = {str(k): v for k, v in chosen.items()}
        condition("safety mask: top-2 complied:refused", mask_of(view, chosen, ablate))
    for n in (1, 2):
        for seed in range(args.random_seeds):
            condition(f"ablate random-{n} seed {seed}", mask_of(view, random_experts(view, n, seed), ablate))
    condition(f"boost top-2 harmful:harmless +{args.boost:g}", mask_of(view, safety[2], args.boost))
    for ratio in args.ratios:
        for protect in (None, ("harmful", "harmless", 2)):
            request = PlanRequest(method=args.criterion, ratio=ratio, set_weights=general, protect_contrast=protect)
            plan = make_prune_plan(view, profile, request)
            clone = copy.deepcopy(model)
            prune_experts(MoEModelView.from_model(clone), plan_keep_map(plan))
            name = f"prune {args.criterion} {ratio:g}" + (" protect harmful:harmless:2" if protect else "")
            entry = condition(name, on=clone)
            entry["audit"] = [{"contrast": f"{a['a']}:{a['b']}", "per_layer": a["per_layer"],
                               "removed": a["not_kept_count"], "of": a["of"]}
                              for a in plan["details"].get("contrast_audits", [])]
            entry["experts_kept_per_layer"] = len(next(iter(plan["layers"].values()))["kept"])
            del clone
            save()

    # languages
    if languages and "en" in languages:
        similarity = routing_similarity(profile, PARALLEL + "en", sets=[PARALLEL + lang for lang in languages])
        similarity["similarity"] = {name.removeprefix(PARALLEL): row for name, row in similarity["similarity"].items()}
        result["language_similarity"] = similarity
        # the layers steering_biases steers by default: the middle third
        middle = list(steering_biases(profile, PARALLEL + "en", PARALLEL + languages[-1], 0.0, top_k))
        steering: dict[str, Any] = {"middle_layers": middle, "experts_per_layer": top_k, "rows": {}}
        base = perplexities(model, lang_heldout, args.seq_len)
        steering["rows"]["none"] = base
        for delta in args.steer:
            row = {}
            for lang in languages:
                if lang == "en":
                    continue
                biases = steering_biases(profile, PARALLEL + "en", PARALLEL + lang, delta, top_k)
                with routing_override(view, biases):
                    row[lang] = perplexities(model, {lang: lang_heldout[lang], "en": lang_heldout["en"]},
                                             args.seq_len)
            steering["rows"][f"+{delta:g}"] = row
            save()
        steering["heldout_tokens"] = {lang: int(ids.numel() - 1) for lang, ids in lang_heldout.items()}
        result["steering"] = steering
    result["complete"] = True
    save()
    return result


def markdown(result: dict[str, Any]) -> str:
    req = result["requests"]
    lines = [f"# Routing and behaviour on `{result.get('name', result['model'])}`", "",
             f"{result['num_experts']} experts, top-{result['top_k']}, {len(result['moe_layers'])} MoE layers; "
             f"{result['dtype']} on {result['device']}; moekit {result['versions']['moekit']}, torch "
             f"{result['versions']['torch']}, transformers {result['versions']['transformers']}.", "",
             f"Requests: {req['harmful_heldout']} held-out harmful (AdvBench) and {req['harmless_heldout']} held-out "
             f"harmless (Alpaca-style) requests, {req['template']}, greedy, {req['new_tokens']} new tokens; a "
             "refusal = the answer contains one of Arditi et al. 2024's refusal phrases (substring). Calibration: the "
             "other half of each set. Perplexity: held-out corpus text per domain (mean over domains shown).", "",
             f"Calibration harmful requests refused by the model: {result['calibration_harmful_refusal_rate']:.3f}; "
             f"response-driven sets: {result['response_driven']}.", "",
             "| condition | harmful refused | harmless refused | mean perplexity | removed top safety experts |",
             "|---|---:|---:|---:|---|"]
    for name, row in result["conditions"].items():
        ppl = row["perplexity"]
        audit = "; ".join(f"{a['removed']} of {a['of']} ({a['contrast']}, top {a['per_layer']})"
                          for a in row.get("audit", []))
        lines.append(f"| {name} | {row['harmful_refusal_rate']:.3f} | {row['harmless_refusal_rate']:.3f} | "
                     f"{sum(ppl.values()) / len(ppl):.2f} | {audit} |")
    n = req["harmful_heldout"]
    if result["conditions"]["original"]["harmful_refused"] == 0:
        lines += ["", "The model refused none of the held-out harmful requests: it does not follow instructions (not "
                  "instruction-tuned, or too small), so the refusal columns show nothing about safety here; the rows "
                  "show the perplexity each routing change and plan costs, and the audits which safety-contrast "
                  "experts each plan removes."]
    lines += ["", f"A refusal rate over {n} requests has a standard error of about "
              f"{(0.25 / max(n, 1)) ** 0.5:.3f} at 0.5 (binomial); differences smaller than about twice that are "
              "noise.", ""]
    if "language_similarity" in result:
        sim = result["language_similarity"]
        lines += ["## Routing similarity to English per MoE layer (1 - JS divergence, bits)", "",
                  "| language | " + " | ".join(str(layer) for layer in sim["layers"]) + " |",
                  "|---|" + "---:|" * len(sim["layers"])]
        for lang, row in sim["similarity"].items():
            lines.append(f"| {lang} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        steer = result.get("steering")
        if steer:
            lines += ["", f"## Steering toward English-active experts (layers {steer['middle_layers']})", "",
                      "Held-out perplexity of each language's parallel text (second half of the documents) and, in "
                      "brackets, of English under the same steering. Perplexity, not the paper's tasks.", "",
                      "| language | none | " + " | ".join(k for k in steer["rows"] if k != "none") + " |",
                      "|---|---:|" + "---:|" * (len(steer["rows"]) - 1)]
            for lang, value in steer["rows"]["none"].items():
                if lang == "en":
                    continue
                cells = [f"{value:.2f}"]
                for key, row in steer["rows"].items():
                    if key != "none":
                        cells.append(f"{row[lang][lang]:.2f} ({row[lang]['en']:.2f})")
                lines.append(f"| {lang} | " + " | ".join(cells) + " |")
            lines.append(f"| en | {steer['rows']['none']['en']:.2f} |" + " |" * (len(steer["rows"]) - 1))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sim = result["language_similarity"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for lang, row in sim["similarity"].items():
        ax.plot(sim["layers"], row, marker="o", markersize=3, label=lang)
    ax.set_xlabel("MoE layer")
    ax.set_xticks(sim["layers"][:: max(1, len(sim["layers"]) // 16)])
    ax.set_ylabel("routing similarity to English\n(1 - JS divergence, bits)")
    ax.set_title(f"{result.get('name', result['model'])}: per-layer routing similarity of parallel text to English")
    ax.set_ylim(0, 1.02)
    ax.legend(ncol=4, fontsize=8, loc="lower center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--corpus", type=Path, default=ROOT / "corpus" / "out")
    parser.add_argument("--safety", type=Path, default=ROOT / "data" / "safety")
    parser.add_argument("--parallel", type=Path, default=ROOT / "data" / "parallel")
    parser.add_argument("--languages", nargs="+", default=["en", "de", "fr", "es", "it", "pt", "ru", "ja", "zh"])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--name", required=True)
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the markdown and the plot from RESULTS/routing_behaviour-NAME.json")
    parser.add_argument("--save-profile", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=520, help="requests read from each set (half held out)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=32768, help="per corpus domain")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per corpus domain")
    parser.add_argument("--language-tokens", type=int, default=32768, help="per language, calibration and held-out")
    parser.add_argument("--criterion", default=DEFAULT_CRITERION)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--boost", type=float, default=2.0)
    parser.add_argument("--steer", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.render:
        result = {"name": args.name, **json.loads((args.results / f"routing_behaviour-{args.name}.json").read_text())}
    else:
        result = run(args)
    (args.results / f"routing_behaviour-{args.name}.md").write_text(markdown(result))
    if "language_similarity" in result:
        plot(result, args.results / f"routing_behaviour-{args.name}-languages.png")
    print((args.results / f"routing_behaviour-{args.name}.md").read_text())


if __name__ == "__main__":
    main()
