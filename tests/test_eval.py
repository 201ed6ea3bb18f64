"""moekit.eval: task files, lm-eval's metric definitions, batching, perplexity windows, user tasks, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from eval_helpers import build_tokenizer, repeat_lm, uniform_lm, uniform_nll

from moekit.eval import (
    EvalError,
    TaskSpec,
    build_custom_task,
    build_task,
    encode_pair,
    evaluate,
    generation_samples,
    load_task_spec,
    loglikelihoods,
    perplexity,
    rolling_windows,
)
from moekit.eval import data as eval_data
from moekit.eval.generate import cut_at_stops
from moekit.eval.metrics import choice_scores, flexible_extract, gsm8k_scores, mean_stderr, strict_match
from moekit.tiny import build_tiny_model

DATA = eval_data.default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "arc_easy.jsonl").is_file(), reason=f"eval files not found in {DATA}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def byte_tok():
    return build_tokenizer(byte_only=True)


@pytest.fixture(scope="module")
def tiny(tok):
    return build_tiny_model("qwen3_moe", vocab_size=len(tok))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def manual_loglik(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) by hand: one forward, log-softmax, sum over the continuation tokens."""
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)  # [seq, vocab]
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


# --- task files ---------------------------------------------------------------------------------------------------

@needs_data
def test_every_eval_file_parses_with_the_documented_counts():
    counts = {
        "arc_easy": len(eval_data.read_choice_file(DATA / "arc_easy.jsonl")),
        "arc_challenge": len(eval_data.read_choice_file(DATA / "arc_challenge.jsonl")),
        "piqa": len(eval_data.read_choice_file(DATA / "piqa.jsonl")),
        "winogrande": len(eval_data.read_winogrande(DATA / "winogrande.jsonl")),
        "lambada_openai": len(eval_data.read_lambada(DATA / "lambada_openai.jsonl")),
        "hellaswag": len(eval_data.read_hellaswag(DATA / "hellaswag_val_full.txt.bz2")),
        "gsm8k": len(eval_data.read_gsm8k(DATA / "gsm8k.jsonl")),
        "human_eval": len(eval_data.read_human_eval(DATA / "human_eval.jsonl")),
    }
    assert counts == {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267,
                      "lambada_openai": 5153, "hellaswag": 10042, "gsm8k": 1319, "human_eval": 164}
    mmlu = eval_data.read_mmlu(DATA / "mmlu.tar.xz")
    assert all(len(splits["dev"]) == 5 for splits in mmlu.values())
    assert {subject: len(splits["test"]) for subject, splits in mmlu.items()} == MMLU_TEST_COUNTS
    assert sum(MMLU_TEST_COUNTS.values()) == 14042


# Questions per subject in the standard MMLU test split (Hendrycks et al., 2021; the hendrycks/test and
# cais/mmlu releases), written down from the published dataset, not from the file under test.
MMLU_TEST_COUNTS = {
    "abstract_algebra": 100, "anatomy": 135, "astronomy": 152, "business_ethics": 100, "clinical_knowledge": 265,
    "college_biology": 144, "college_chemistry": 100, "college_computer_science": 100, "college_mathematics": 100,
    "college_medicine": 173, "college_physics": 102, "computer_security": 100, "conceptual_physics": 235,
    "econometrics": 114, "electrical_engineering": 145, "elementary_mathematics": 378, "formal_logic": 126,
    "global_facts": 100, "high_school_biology": 310, "high_school_chemistry": 203,
    "high_school_computer_science": 100, "high_school_european_history": 165, "high_school_geography": 198,
    "high_school_government_and_politics": 193, "high_school_macroeconomics": 390, "high_school_mathematics": 270,
    "high_school_microeconomics": 238, "high_school_physics": 151, "high_school_psychology": 545,
    "high_school_statistics": 216, "high_school_us_history": 204, "high_school_world_history": 237,
    "human_aging": 223, "human_sexuality": 131, "international_law": 121, "jurisprudence": 108,
    "logical_fallacies": 163, "machine_learning": 112, "management": 103, "marketing": 234, "medical_genetics": 100,
    "miscellaneous": 783, "moral_disputes": 346, "moral_scenarios": 895, "nutrition": 306, "philosophy": 311,
    "prehistory": 324, "professional_accounting": 282, "professional_law": 1534, "professional_medicine": 272,
    "professional_psychology": 612, "public_relations": 110, "security_studies": 245, "sociology": 201,
    "us_foreign_policy": 100, "virology": 166, "world_religions": 171,
}


@needs_data
def test_prompts_follow_lm_eval():
    arc = build_task("arc_easy", limit=2).items[1]
    assert arc.requests[1] == ("Question: Which piece of safety equipment is used to keep mold spores from entering "
                               "the respiratory system?\nAnswer:", " breathing mask")
    assert arc.choices[1] == "breathing mask" and arc.gold == 1
    piqa = build_task("piqa", limit=1).items[0]
    assert piqa.requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    hella = build_task("hellaswag", limit=1).items[0]
    assert hella.requests[0] == ("Roof shingle removal: A man is sitting on a roof. He",
                                 " is using wrap to wrap a pair of skis.")
    wino = build_task("winogrande", limit=1).items[0]
    assert [r[1] for r in wino.requests] == [" always got the easier cases."] * 2
    assert wino.choices == tuple(r[0] for r in wino.requests) and wino.gold == 1
    lambada = build_task("lambada_openai", limit=1).items[0]
    assert lambada.continuation == " signs" and lambada.context.endswith("I don't care about")
    mmlu = next(i for i in build_task("mmlu", limit=1).items if i.group == "anatomy")
    assert mmlu.requests[0] == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
        "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
        "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
        "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:", " A")
    five = next(i for i in build_task("mmlu", num_fewshot=5, limit=1).items if i.group == "anatomy")
    prompt = five.requests[0][0]
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith(mmlu.requests[0][0].split("\n\n", 1)[1])
    assert "\nAnswer: D\n\nWhich of these branches" in prompt  # exemplar answers follow "Answer:" after a space
    gsm = build_task("gsm8k", num_fewshot=2, limit=2).items
    assert gsm[0].prompt.startswith("Question: A robe takes 2 bolts")  # item 0's exemplars are items 1 and 2
    assert gsm[1].prompt.startswith("Question: Janet’s ducks") and "\n#### 18\n\nQuestion: " in gsm[1].prompt
    assert gsm[0].prompt.endswith("\nAnswer:") and gsm[0].target == "18"


def test_hellaswag_preprocessing():
    assert eval_data.hellaswag_preprocess(" A [title] B [step] C  D ") == "A. B C D"
    assert eval_data.split_hellaswag_context("Roof: A man sits. he") == ("Roof", "A man sits.", "he")
    assert eval_data.split_hellaswag_context("Home: How to cook. Boil. the") == ("Home", "How to cook. Boil. the", "")
    item = eval_data.hellaswag_item("Clean and jerk", "A lady walks.", "the lady", ["lifts [x] it."], 0)
    assert item == {"query": "Clean and jerk: A lady walks. The lady", "choices": ["lifts it."], "gold": 0}


# --- log-likelihood and metrics ---------------------------------------------------------------------------------

def test_encode_pair_splits_like_lm_eval(tok):
    ctx, cont = encode_pair(tok, "Answer:", " breathing mask")
    assert ctx + cont == tok.encode("Answer: breathing mask") and ctx == tok.encode("Answer:")
    assert encode_pair(tok, "Answer: ", "breathing mask") == (ctx, cont)  # trailing space moves to the continuation
    assert encode_pair(tok, "", "Answer")[0] == [tok.bos_token_id]  # empty context: the prefix token


def test_loglikelihood_and_acc_equal_a_direct_computation(tiny, tok):
    context = "Question: Which piece of safety equipment is used to keep mold spores out?\nAnswer:"
    choices = ["safety goggles", "breathing mask", "rubber gloves"]
    ours = loglikelihoods(tiny, tok, [(context, " " + c) for c in choices], progress=False)
    direct = [manual_loglik(tiny, tok, context, " " + c) for c in choices]
    assert [ll for ll, _ in ours] == pytest.approx(direct, abs=1e-5)
    gold = 1
    acc = float(max(range(3), key=lambda i: direct[i]) == gold)
    acc_norm = float(max(range(3), key=lambda i: direct[i] / len(choices[i])) == gold)
    assert choice_scores([ll for ll, _ in ours], choices, gold) == {"acc": acc, "acc_norm": acc_norm}


def test_stub_model_gets_the_expected_accuracy(tmp_path, byte_tok):
    """A model that predicts "repeat the last byte": the most repetitive choice wins; acc_norm divides by length."""
    rows = [{"q": "a", "options": ["aaaa", "abab"], "answer": 0},  # acc 1, acc_norm 1
            {"q": "a", "options": ["abab", "aaaa"], "answer": 1},  # 1, 1
            {"q": "a", "options": ["aaaa", "abab"], "answer": 1},  # 0, 0
            {"q": "a", "options": ["a", "aaaaaaaa"], "answer": "aaaaaaaa"}]  # 0 (shorter wins), 1 (per character)
    spec = TaskSpec(name="repeat", kind="multiple_choice", data_path=write_jsonl(tmp_path / "r.jsonl", rows),
                    prompt="Q: {q}", choices="options", gold="answer")
    result = evaluate(repeat_lm(len(byte_tok)), byte_tok, [spec], progress=False)["tasks"]["repeat"]
    assert result["metrics"] == {"acc": 0.5, "acc_norm": 0.75}
    assert result["stderr"]["acc"] == pytest.approx(mean_stderr([1, 1, 0, 0]))
    greedy = loglikelihoods(repeat_lm(len(byte_tok)), byte_tok, [("xa", "aaa"), ("xa", "ab")], progress=False)
    assert [g for _, g in greedy] == [True, False]


@needs_data
def test_padding_and_batch_size_do_not_change_results(tiny, tok):
    tasks = ["arc_easy", "winogrande", "lambada_openai"]
    one = evaluate(tiny, tok, tasks, limit=4, batch_size=1, samples=True, progress=False)["tasks"]
    eight = evaluate(tiny, tok, tasks, limit=4, batch_size=8, samples=True, progress=False)["tasks"]
    for name in tasks:
        assert one[name]["metrics"] == eight[name]["metrics"]
        a, b = one[name]["samples"], eight[name]["samples"]
        lls_a = [ll for s in a for ll in s.get("logliks", [s.get("loglik")])]
        lls_b = [ll for s in b for ll in s.get("logliks", [s.get("loglik")])]
        assert lls_a == pytest.approx(lls_b, abs=1e-4)


def test_gsm8k_answer_extraction_follows_lm_eval():
    assert strict_match("so 9 * 2 = 18\n#### 18") == "18"
    assert strict_match("The answer is 18.") == "[invalid]"
    assert flexible_extract("3 eggs, then 16 - 3 = 13, so $1,300.") == "$1,300."
    assert gsm8k_scores("The answer is $18.", "18") == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    assert gsm8k_scores("#### 1,000\n\nQuestion", "1000") == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    assert cut_at_stops("18\n\nQuestion: next</s>", ["Question:", "</s>"]) == "18\n\n"


def test_generation_is_greedy_and_batch_invariant(tiny, tok):
    prompts = ["Question: What is the", "A man is sitting on a roof. He", "Sarah"]
    one = [generation_samples(tiny, tok, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    batched = generation_samples(tiny, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    assert batched == one and [p for p, _ in batched] == prompts
    ids = tok.encode(prompts[1])
    with torch.no_grad():  # greedy by hand, recomputing the whole sequence at each step
        for _ in range(6):
            ids.append(tiny(torch.tensor([ids])).logits[0, -1].argmax().item())
    new = ids[len(tok.encode(prompts[1])):]
    expected = tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    assert one[1][1] == expected


# --- perplexity ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "window", "stride"), [(1, 4, 4), (10, 4, 4), (10, 4, 1), (10, 4, 3), (7, 16, 8)])
def test_rolling_windows_score_each_token_once_with_enough_context(n, window, stride):
    tokens = list(range(10, 10 + n))
    pairs = rolling_windows(tokens, prefix=1, max_length=window, stride=stride)
    assert [t for _, cont in pairs for t in cont] == tokens  # every token once, in order
    seq = [1, *tokens]
    for ctx, cont in pairs:
        joined = ctx + cont
        start = seq.index(joined[0])
        assert seq[start:start + len(joined)] == joined and len(joined) <= window + 1
        first_target = seq.index(cont[0])
        assert first_target - start >= min(first_target, window - stride + 1)  # context of the first target


def test_perplexity_counts_each_token_once(byte_tok):
    texts = ["hello world, this is a longer text than the window", "short", "é ü"]
    vocab = len(byte_tok)
    for window, stride in [(512, None), (8, None), (8, 3), (8, 1)]:
        result = perplexity(uniform_lm(vocab), byte_tok, texts, max_length=window, stride=stride, progress=False)
        n_bytes = sum(len(t.encode()) for t in texts)
        assert result.tokens == n_bytes == result.bytes  # one token per byte
        assert result.nll == pytest.approx(uniform_nll(n_bytes, vocab)) and result.ppl == pytest.approx(vocab)
    assert result.words == 10 + 1 + 2


def test_sliding_window_perplexity_equals_full_context_and_stride_one(tiny, tok):
    text = "A man is sitting on a roof. He starts pulling up roofing on a roof."
    ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny(torch.tensor([ids])).logits[0], -1)
    full_nll = -sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)))
    result = perplexity(tiny, tok, [text], progress=False)  # the window (256) covers the text
    assert result.tokens == len(ids) - 1 and result.nll == pytest.approx(full_nll, abs=1e-4)
    assert perplexity(tiny, tok, [text], max_length=len(ids), stride=3, progress=False).nll == pytest.approx(
        full_nll, abs=1e-4)
    window = 5  # stride 1: token i is scored from exactly the `window` tokens before it
    slid = 0.0
    with torch.no_grad():
        for i in range(1, len(ids)):
            ctx = ids[max(0, i - window):i]
            slid -= torch.log_softmax(tiny(torch.tensor([ctx])).logits[0, -1], -1)[ids[i]].item()
    ours = perplexity(tiny, tok, [text], max_length=window, stride=1, progress=False)
    assert ours.nll == pytest.approx(slid, abs=1e-4) and ours.ppl == pytest.approx(math.exp(slid / ours.tokens))


# --- user tasks, results, errors -------------------------------------------------------------------------------------

def test_yaml_task_fewshot_and_perplexity(tmp_path, byte_tok, tiny, tok):
    rows = [{"country": "France", "options": ["Paris", "Rome"], "answer": 0, "city": "Paris"},
            {"country": "Italy", "options": ["Paris", "Rome"], "answer": 1, "city": "Rome"},
            {"country": "Spain", "options": ["Madrid", "Rome"], "answer": 0, "city": "Madrid"}]
    write_jsonl(tmp_path / "capitals.jsonl", rows)
    (tmp_path / "mc.yaml").write_text("name: capitals\nkind: multiple_choice\ndata_path: capitals.jsonl\n"
                                      "prompt: \"Capital of {country}:\"\nchoices: options\ngold: answer\n"
                                      "num_fewshot: 1\n")
    task = build_custom_task(load_task_spec(tmp_path / "mc.yaml"))
    assert task.items[0].requests[1] == ("Capital of Italy: Rome\n\nCapital of France:", " Rome")
    assert task.items[1].requests[0] == ("Capital of France: Paris\n\nCapital of Italy:", " Paris")
    (tmp_path / "gen.yaml").write_text("name: gen\nkind: generation\ndata_path: capitals.jsonl\n"
                                       "prompt: \"Capital of {country}:\"\ntarget: city\nmax_new_tokens: 4\n")
    (tmp_path / "ppl.yaml").write_text("name: ppl\nkind: perplexity\ndata_path: capitals.jsonl\ntext: \"{city}\"\n")
    result = evaluate(tiny, tok, [tmp_path / "mc.yaml", str(tmp_path / "gen.yaml")], progress=False)
    json.dumps(result, allow_nan=False)
    assert set(result["versions"]) == {"moekit", "torch", "transformers", "python"}
    assert result["tasks"]["capitals"]["n"] == 3 and "seconds" in result["tasks"]["capitals"]
    assert 0.0 <= result["tasks"]["gen"]["metrics"]["exact_match"] <= 1.0
    ppl = evaluate(uniform_lm(len(byte_tok)), byte_tok, [tmp_path / "ppl.yaml"], progress=False)["tasks"]["ppl"]
    assert ppl["metrics"]["token_perplexity"] == pytest.approx(len(byte_tok))
    assert ppl["counts"]["tokens"] == len("ParisRomeMadrid")


def test_evaluate_loads_a_model_directory(tmp_path, tiny, tok):
    tiny.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    spec = TaskSpec(name="t", kind="perplexity", data_path=write_jsonl(tmp_path / "t.jsonl", [{"x": "hello"}]),
                    text="{x}")
    result = evaluate(str(tmp_path / "m"), tasks=[spec], progress=False)
    assert result["model"]["max_length"] == tiny.config.max_position_embeddings  # the window from the config
    assert result["tasks"]["t"]["counts"]["texts"] == 1


def bad_spec(tmp_path: Path, text: str) -> str:
    write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "options": ["a", "b"], "answer": 0}])
    (tmp_path / "t.yaml").write_text("data_path: d.jsonl\n" + text)
    with pytest.raises(EvalError) as err:
        build_custom_task(load_task_spec(tmp_path / "t.yaml"))
    return str(err.value)


def test_bad_task_yaml_gives_clear_errors(tmp_path):
    mc = "name: t\nkind: multiple_choice\nchoices: options\ngold: answer\n"
    message = bad_spec(tmp_path, mc + "promt: \"{q}\"\n")
    assert "unknown key(s) promt" in message and "valid keys: name, kind, data_path, prompt" in message
    assert "needs the field 'prompt'" in bad_spec(tmp_path, mc)
    assert "'kind' is missing" in bad_spec(tmp_path, "name: t\nprompt: x\n")
    assert "not one of multiple_choice, generation, refusal, perplexity" in bad_spec(tmp_path, "name: t\nkind: mc\n")
    assert "'choices' is not used by kind perplexity" in bad_spec(tmp_path, "name: t\nkind: perplexity\n"
                                                                             "text: \"{q}\"\nchoices: options\n")
    assert "lacks the field(s) question" in bad_spec(tmp_path, mc + "prompt: \"{question}\"\n")
    (tmp_path / "d.jsonl").write_text('{"q": "x", "options": ["a", "b"], "answer": 5}\n')
    with pytest.raises(EvalError, match=r"gold 5 .* neither an index"):
        build_custom_task(TaskSpec.from_dict({"name": "t", "kind": "multiple_choice", "data_path": "d.jsonl",
                                              "prompt": "{q}", "choices": "options", "gold": "answer"}, tmp_path))
    (tmp_path / "d.jsonl").write_text('{"q": "x"}\nnot json\n')
    with pytest.raises(EvalError, match=r"d.jsonl:2 is not valid JSON"):
        eval_data.read_jsonl(tmp_path / "d.jsonl")
    with pytest.raises(EvalError, match=r"task file .*missing.yaml not found"):
        load_task_spec(tmp_path / "missing.yaml")


def test_bad_inputs_give_clear_errors(tmp_path, tiny, tok):
    with pytest.raises(EvalError, match=r"task file arc_easy.jsonl not found in .*does not hold it.*--data-dir FOLDER"):
        build_task("arc_easy", data_dir=tmp_path)
    with pytest.raises(EvalError, match=r"not found in .*gone \(which does not exist\)"):
        build_task("arc_easy", data_dir=tmp_path / "gone")
    with pytest.raises(EvalError, match="unknown eval task 'arc_eazy'; valid: arc_challenge, arc_easy, gsm8k"):
        evaluate(tiny, tok, ["arc_eazy"])
    with pytest.raises(EvalError, match="runs 0-shot only"):
        build_task("piqa", num_fewshot=5, data_dir=tmp_path)
    with pytest.raises(EvalError, match="text 1 is empty"):
        perplexity(tiny, tok, ["hello", ""], progress=False)
    with pytest.raises(EvalError, match="no texts"):
        perplexity(tiny, tok, [], progress=False)
    with pytest.raises(EvalError, match="not one string"):
        perplexity(tiny, tok, "hello", progress=False)
    with pytest.raises(EvalError, match="empty continuation"):
        loglikelihoods(tiny, tok, [("context", "")], progress=False)
    with pytest.raises(EvalError, match="stride must be between 1 and the window"):
        perplexity(tiny, tok, ["hello"], max_length=4, stride=5, progress=False)
    with pytest.raises(EvalError, match="leaves no room for the prompt"):
        generation_samples(tiny, tok, ["hi"], max_new_tokens=tiny.config.max_position_embeddings, progress=False)
    assert issubclass(EvalError, ValueError)


def test_yaml_syntax_and_option_errors(tmp_path, tiny, tok):
    (tmp_path / "t.yaml").write_text("name: [unclosed\n")
    with pytest.raises(EvalError, match="is not valid YAML"):
        load_task_spec(tmp_path / "t.yaml")
    with pytest.raises(EvalError, match="num_fewshot names mmlu5"):
        evaluate(tiny, tok, ["mmlu"], num_fewshot={"mmlu5": 5})
    with pytest.raises(EvalError, match="no tasks given"):
        evaluate(tiny, tok)
