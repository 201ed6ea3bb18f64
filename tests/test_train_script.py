"""benchmarks/train_moe.py runs a few steps on CPU on a tiny config and writes a loadable checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "corpus"))

train_moe = pytest.importorskip("train_moe")
shards = pytest.importorskip("shards")


def tiny_corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    manifest = {"format": shards.FORMAT, "tokenizer": {"separator_id": 0}, "domains": {}}
    for domain, band in (("code", (100, 300)), ("prose", (300, 600))):
        splits = {}
        for split in ("train", "calibration", "heldout"):
            docs = [rng.integers(*band, size=200).tolist() for _ in range(4)]
            records = shards.write_split(path, domain, split, docs)
            splits[split] = {"docs": 4, "tokens": 800, "shards": records}
        manifest["domains"][domain] = {"splits": splits}
    (path / shards.MANIFEST).write_text(json.dumps(manifest))
    return path


def test_training_script_runs_a_few_steps(tmp_path, monkeypatch) -> None:
    corpus = tiny_corpus(tmp_path / "corpus")
    tiny = dict(model_type="qwen3_moe", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, intermediate_size=64, moe_intermediate_size=16,
                num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    monkeypatch.setitem(train_moe.TESTBEDS, "tiny-test", tiny)
    record = train_moe.train("tiny-test", corpus, tmp_path / "out", minutes=1, steps=3, batch_size=2, seq_len=16,
                             lr=1e-3, seed=0, device="cpu", eval_tokens=64)
    assert record["recipe"]["steps"] == 3 and record["recipe"]["tokens_seen"] == 3 * 2 * 16
    assert set(record["heldout_perplexity"]) == {"code", "prose"}
    assert 0 <= record["specialisation"]["mean_jaccard"] <= 1
    assert record["recipe"]["balancing"].startswith("Switch loss per MoE layer")
    assert len(record["balance"]["layers"]) == 2 and isinstance(record["balance"]["bar_met"], bool)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "tiny-test")
    assert model.config.num_experts == 4
    assert (tmp_path / "out" / "tiny-test" / "loss.png").is_file()
    saved = json.loads((tmp_path / "out" / "tiny-test" / "training.json").read_text())
    assert saved["loss_curve"][0]["step"] == 0
    assert saved["recipe"]["corpus_fingerprint"] == shards.corpus_fingerprint(shards.load_manifest(corpus))


def test_corpus_subset_cuts_training_text_and_keeps_the_rest(tmp_path) -> None:
    subset = pytest.importorskip("subset")
    corpus = tiny_corpus(tmp_path / "corpus")
    manifest = subset.write_subset(corpus, tmp_path / "small", train_tokens=450)
    assert shards.verify_corpus(tmp_path / "small") == []
    train = shards.load_split(tmp_path / "small", "code", "train")
    full = shards.load_split(corpus, "code", "train")
    assert train.n_docs == 2 and np.array_equal(train.tokens, full.tokens[:400])  # whole documents only
    assert manifest["domains"]["prose"]["splits"]["train"]["tokens"] == 400
    for split in ("calibration", "heldout"):
        assert np.array_equal(shards.load_split(tmp_path / "small", "prose", split).tokens,
                              shards.load_split(corpus, "prose", split).tokens)
    with pytest.raises(FileExistsError):
        subset.write_subset(corpus, tmp_path / "small", train_tokens=450)


def test_corpus_fingerprint_follows_the_text_of_each_split(tmp_path) -> None:
    subset = pytest.importorskip("subset")
    corpus = tiny_corpus(tmp_path / "corpus")
    full = shards.corpus_fingerprint(shards.load_manifest(corpus))
    assert set(full["splits"]) == {"train", "calibration", "heldout"}
    assert shards.corpus_fingerprint(shards.load_manifest(corpus)) == full  # deterministic
    cut = shards.corpus_fingerprint(subset.write_subset(corpus, tmp_path / "small", train_tokens=450))
    assert cut["splits"]["train"] != full["splits"]["train"]
    assert {s: cut["splits"][s] for s in ("calibration", "heldout")} == \
        {s: full["splits"][s] for s in ("calibration", "heldout")}
    # one held-out document changed in one domain: only that split's digest moves
    manifest = shards.load_manifest(corpus)
    docs = [np.full(200, 7).tolist() for _ in range(4)]
    manifest["domains"]["prose"]["splits"]["heldout"]["shards"] = shards.write_split(corpus, "prose", "heldout", docs)
    changed = shards.corpus_fingerprint(manifest)
    assert changed["splits"]["heldout"] != full["splits"]["heldout"]
    assert changed["splits"]["calibration"] == full["splits"]["calibration"]


def test_comparison_says_when_its_corpus_is_not_the_testbeds() -> None:
    compare_methods = pytest.importorskip("compare_methods")
    trained = {"splits": {"train": "a" * 64, "calibration": "b" * 64, "heldout": "c" * 64},
               "sources": {"linux-c": "6.1.192-2", "go-src": "1.19.8-2"}}
    same = {"splits": {"train": "d" * 64, "calibration": "b" * 64, "heldout": "c" * 64},
            "sources": dict(trained["sources"])}
    assert "the same calibration and held-out text" in compare_methods.corpus_line(same, trained)
    other = {"splits": {"train": "a" * 64, "calibration": "b" * 64, "heldout": "e" * 64},
             "sources": {"linux-c": "6.1.176-1", "go-src": "1.19.8-2"}}
    line = compare_methods.corpus_line(other, trained)
    assert "**Differs**" in line and "heldout" in line and "calibration" not in line.split("Differs")[1]
    assert "linux-c 6.1.192-2 -> 6.1.176-1" in line and "go-src" not in line
    assert "no corpus fingerprint" in compare_methods.corpus_line(same, None)
    assert "not fingerprinted" in compare_methods.corpus_line(None, trained)


def _balance_loss(layers: tuple, top_k: int = 1) -> float:
    """moekit's per-layer balance loss (what train_moe.py trains with) on a tiny model with that many MoE layers."""
    from moekit.arch.view import MoEModelView
    from moekit.recover import per_layer_balance_loss
    from moekit.tiny import build_tiny_model

    model = build_tiny_model("qwen3_moe", num_experts=4, top_k=top_k, num_hidden_layers=len(layers))
    return float(per_layer_balance_loss(layers, MoEModelView.from_model(model)))


def test_per_layer_balance_loss_by_hand_and_against_the_pooled_loss() -> None:
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    # balanced: every expert chosen equally often with equal mean probability -> exactly 1
    even = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2], [0.2, 0.1, 0.4, 0.3],
                                   [0.3, 0.2, 0.1, 0.4]]))
    assert _balance_loss((even,)) == pytest.approx(1.0)
    # one layer sends every token to expert 0: f = (1, 0, 0, 0), P_0 = 0.7 -> 4 * 0.7
    skewed = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4))
    assert _balance_loss((skewed,)) == pytest.approx(4 * 0.7)
    # two layers starving opposite experts: pooled over layers they look balanced, per layer they do not
    first = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]] * 2))
    second = torch.log(torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]] * 2))
    per_layer = _balance_loss((first, second))
    pooled = float(load_balancing_loss_func((first, second), num_experts=4, top_k=1))
    assert pooled == pytest.approx(1.0, abs=1e-6)  # the artefact: "expert j summed over layers" is even
    # each layer: f = (.5, .5, 0, 0), P = (.4, .4, .1, .1)
    assert per_layer == pytest.approx(4 * (0.5 * 0.4 + 0.5 * 0.4))
