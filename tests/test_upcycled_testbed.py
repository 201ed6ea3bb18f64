"""benchmarks/smollm2_upcycled_testbed.py's mixed objective: distilling to q = (1 - w) p_dense + w onehot(next token)
through moekit.recover's KL loss has exactly the gradient of (1 - w) KL(dense || student) + w cross-entropy."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "corpus"))

testbed = pytest.importorskip("smollm2_upcycled_testbed")
from moekit.recover import token_losses  # noqa: E402


class FixedLogits(nn.Module):
    """A stand-in dense model that returns given logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.embed = nn.Embedding(logits.shape[-1], 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.9])
def test_mixed_target_gradient_is_the_weighted_sum(weight: float) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab = 2, 7, 11
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length - 1)
    mask[1, -2:] = 0  # padding is left out as recover leaves it out
    dense_logits = torch.randn(batch, length, vocab, generator=gen) * 3
    student = torch.randn(batch, length - 1, vocab, generator=gen, requires_grad=True)
    with torch.no_grad():
        target = testbed.MixedTarget(FixedLogits(dense_logits), weight)(input_ids=ids).logits[:, :-1]
    (mixed,) = torch.autograd.grad(token_losses(student, ids[:, 1:], mask, target), student)
    (kl,) = torch.autograd.grad(token_losses(student, ids[:, 1:], mask, dense_logits[:, :-1]), student)
    (ce,) = torch.autograd.grad(token_losses(student, ids[:, 1:], mask, None), student)
    torch.testing.assert_close(mixed, (1 - weight) * kl + weight * ce)
    assert torch.allclose(target.exp().sum(-1), torch.ones(batch, length - 1))


def test_mixed_target_stays_finite_where_the_dense_probabilities_underflow() -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = torch.full((1, 4, 6), -1e4)
    logits[..., 0] = 1e4  # float32 softmax: every other token's probability is 0
    target = testbed.MixedTarget(FixedLogits(logits), 0.5)(input_ids=ids).logits
    assert torch.isfinite(target).all()
    loss = token_losses(torch.zeros(1, 3, 6, requires_grad=True), ids[:, 1:], torch.ones(1, 3), target[:, :-1])
    assert torch.isfinite(loss)


def test_mixed_target_refuses_weights_outside_zero_one() -> None:
    for weight in (0.0, 1.0):
        with pytest.raises(SystemExit, match="ce-weight"):
            testbed.MixedTarget(FixedLogits(torch.zeros(1, 2, 3)), weight)


def _step0_run(ratio: float, scale: float, eval_tokens: int = 4096) -> dict:
    return {"reinit_ratio": ratio, "experts": 8, "top_k": 2, "domains": ["a", "b"], "seq_len": 1024,
            "eval_tokens_per_domain": eval_tokens, "source": "s", "device": "cpu",
            "versions": {"torch": "t", "transformers": "x"},
            "stages": {"step0": {"heldout_perplexity": {"a": 10.0 * scale, "b": 4.0 * scale ** 3},
                                 "step0_max_logit_difference": ratio,
                                 "divergence": {"mean_pairwise_cosine": (1 - ratio) ** 2, "max_pairwise_cosine": 1},
                                 "balance": {"layers": [{"max_violation": 0.4}, {"max_violation": 0.9}]}}}}


def test_drop_upcycling_step0_table_compares_every_ratio_with_plain_copies() -> None:
    summary_script = pytest.importorskip("drop_upcycling_step0")
    summary = summary_script.summarise([_step0_run(0.5, 2.0), _step0_run(0.0, 1.0)])
    zero, half = summary["rows"]
    assert zero["reinit_ratio"] == 0 and zero["geomean_perplexity_over_copies"] == pytest.approx(1.0)
    # domain a: x2, domain b: x8 -> geometric mean 4
    assert half["perplexity_over_copies"] == {"a": pytest.approx(2.0), "b": pytest.approx(8.0)}
    assert half["geomean_perplexity_over_copies"] == pytest.approx(4.0)
    assert half["max_violation_range"] == [0.4, 0.9]
    assert "| 0.5 | 4.00 |" in summary_script.markdown(summary)
    with pytest.raises(SystemExit, match="--reinit-ratio 0"):
        summary_script.summarise([_step0_run(0.5, 2.0)])
    with pytest.raises(SystemExit, match="eval_tokens_per_domain"):
        summary_script.summarise([_step0_run(0.0, 1.0), _step0_run(0.5, 2.0, eval_tokens=8)])
