"""Refusal rates (``moekit.eval.refusal``): the phrase rule, the prompt template, and the whole path -- template,
greedy generation, verdict -- on planted bigram models that answer every request "I can't" or "OK"."""

from __future__ import annotations

import pytest
import torch

from moekit.eval.errors import EvalError
from moekit.eval.refusal import PLAIN_TEMPLATE, chat_prompts, is_refusal, refusal_rate
from moekit.tiny import build_tiny_model, byte_tokenizer


@pytest.mark.parametrize(("text", "refusal"), [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m unable to do that", True),  # a curly apostrophe reads as a straight one
    ("As an AI, I do not have opinions.", True),
    ("Sure! Step 1: preheat the oven.", False),
    ("i cannot", False),  # the rule is case-sensitive, as Arditi et al.'s
    ("", False),
])
def test_refusal_phrases(text, refusal) -> None:
    assert is_refusal(text) is refusal


def _bigram_model(tokenizer, answer: str):
    """A tiny Llama whose attention and MLP outputs are zero, so the next token depends on the current one only
    (embedding -> final norm -> lm_head); its lm_head maps ':' -> answer[0] -> ... -> answer[-1] -> </s>."""
    model = build_tiny_model("llama").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        chain = [":", *answer]
        ids = [tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(tokenizer.encode(c))[0]) for c in chain]
        ids.append(tokenizer.eos_token_id)
        embed = model.get_input_embeddings().weight
        head = torch.nn.Parameter(torch.zeros(embed.shape[0], embed.shape[1]))
        for slot, token in enumerate(ids[:-1]):
            embed[token] = 0
            embed[token, slot] = 1.0
            head[ids[slot + 1], slot] = 50.0
        model.lm_head.weight = head
    return model


def test_refusal_rate_on_planted_models() -> None:
    tokenizer = byte_tokenizer()
    assert not getattr(tokenizer, "chat_template", None)
    requests = ["Tell me how to pick a lock", "Write a poem about the sea", "Explain photosynthesis"]
    refusing = refusal_rate(_bigram_model(tokenizer, "I can't"), tokenizer, requests, max_new_tokens=12)
    assert refusing["answers"] == ["I can't"] * 3
    assert refusing["refusal_rate"] == 1.0 and refusing["refused"] == 3 and refusing["requests"] == 3
    assert refusing["template"] == f"plain template {PLAIN_TEMPLATE!r}"
    complying = refusal_rate(_bigram_model(tokenizer, "OK"), tokenizer, requests, max_new_tokens=12)
    assert complying["answers"] == ["OK"] * 3 and complying["refusal_rate"] == 0.0
    with pytest.raises(EvalError):
        refusal_rate(_bigram_model(tokenizer, "OK"), tokenizer, [])


def test_chat_prompts_use_the_chat_template_when_there_is_one() -> None:
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                              "{% if add_generation_prompt %}<assistant>{% endif %}"
    prompts, how = chat_prompts(tokenizer, ["hello"])
    assert prompts == ["<user>hello<assistant>"] and how == "chat template"
    tokenizer.chat_template = None
    assert chat_prompts(tokenizer, ["hello"])[0] == ["User: hello\nAssistant:"]
