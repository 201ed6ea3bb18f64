"""Tiny random MoE models of every supported family, built from stock transformers configs.

For tests, examples and trying moekit without downloading anything:

    model = build_tiny_model("qwen3_moe")            # 8 experts, top-2, 3 layers, hidden 64
    save_tiny_model("qwen3_moe", "tiny-qwen3-moe")   # a checkpoint directory, with a byte tokenizer

Routers are drawn with std 0.5 (and correction biases at random) so routing is far from
uniform and pruning changes outputs measurably -- random init would route almost uniformly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from moekit.arch.view import EXPERT_COUNT_KEYS, TOP_K_KEYS, MoEModelView

# Three special tokens (pad 0, bos 1, eos 2) and the 256 bytes; a little room to spare.
TINY_VOCAB_SIZE = 272
# Positions: one token per byte, so 8-shot GSM8K and 5-shot MMLU prompts (a few thousand bytes) fit, and
# ``moekit speed``'s defaults; rotary embeddings are computed on the fly, so this costs no memory.
TINY_CONTEXT = 8192

# Model types we build and test (names as in CONFIG_MAPPING).
TINY_FAMILIES = (
    "mixtral", "minimax", "minimax_m2", "phimoe", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text",
    "olmoe", "flex_olmo", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe",
    "gpt_oss", "granitemoe", "granitemoeshared", "jamba", "llama4_text", "dbrx",
)

# Dense families, to try ``moekit moefy`` and ``moekit upcycle`` on (no experts).
TINY_DENSE_FAMILIES = ("llama", "qwen3")

# Families not in moekit's table that share a listed family's structure: recognised by probing.
UNLISTED_TINY_FAMILIES = ("exaone_moe", "laguna", "nemotron_h")

_COMMON: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=TINY_VOCAB_SIZE, max_position_embeddings=TINY_CONTEXT,
    shared_expert_intermediate_size=48, moe_shared_expert_intermediate_size=48, q_lora_rank=32, kv_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, moe_layer_start_index=1,
    moe_layer_end_index=2, n_group=1, topk_group=1, expert_layer_period=2, expert_layer_offset=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
_EXTRA: dict[str, dict[str, Any]] = {
    "jamba": dict(attn_layer_period=1, attn_layer_offset=0, use_mamba_kernels=False),
    "qwen3_next": dict(layer_types=["full_attention"] * 3),
    "qwen3_5_moe_text": dict(layer_types=["full_attention"] * 3),
    "granitemoeshared": dict(shared_intermediate_size=48),
    "deepseek_v2": dict(n_shared_experts=1),
    "deepseek_v3": dict(n_shared_experts=1),
    "glm4_moe": dict(n_shared_experts=1),
    "ernie4_5_moe": dict(moe_num_shared_experts=1),
    # its YaRN factor (32) must match max_position_embeddings / original_max_position_embeddings
    "gpt_oss": dict(max_position_embeddings=131072),
}


def tiny_config(model_type: str, num_experts: int = 8, top_k: int = 2, **overrides: Any) -> Any:
    """A stock config of ``model_type`` shrunk to a few thousand parameters."""
    if model_type == "dbrx":
        return CONFIG_MAPPING["dbrx"](
            d_model=64, n_heads=4, n_layers=3, max_seq_len=TINY_CONTEXT, vocab_size=TINY_VOCAB_SIZE, pad_token_id=0,
            attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
            ffn_config={"ffn_hidden_size": 96, "moe_num_experts": num_experts, "moe_top_k": top_k,
                        "hidden_size": 64},
            **overrides,
        )
    present = CONFIG_MAPPING[model_type]().to_dict()
    wanted = {**_COMMON, **_EXTRA.get(model_type, {})}
    kwargs: dict[str, Any] = {}
    for key, value in wanted.items():
        if key in ("head_dim", "num_key_value_heads") and "kv_lora_rank" in present:
            continue  # MLA models derive their head dims and have one key/value head per query head
        if key in present:
            kwargs[key] = value
    kwargs.update({key: num_experts for key in EXPERT_COUNT_KEYS if key in present})
    kwargs.update({key: top_k for key in TOP_K_KEYS if key in present})
    kwargs.update(overrides)
    # Built through the constructor so that derived fields (MLA head dims, layer types) follow.
    return CONFIG_MAPPING[model_type](**kwargs)


def _spread_routers(model: PreTrainedModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in MoEModelView.from_model(model).layers:
            weight = layer.router_weight
            weight.copy_(torch.randn(weight.shape, generator=gen) * 0.5)
            for bias in (layer.router_bias, layer.correction_bias):
                if bias is not None:
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)


def build_tiny_model(model_type: str, num_experts: int = 8, top_k: int = 2, seed: int = 0,
                     **overrides: Any) -> PreTrainedModel:
    """A tiny random float32 model of ``model_type`` with spread-out routers (dense families: no routers), in eval
    mode."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, num_experts, top_k, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type not in TINY_DENSE_FAMILIES:
        _spread_routers(model, seed)
    return model.eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer for tiny models: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, then one token per byte.

    Any text round-trips; no merges, so one UTF-8 byte is one token (what a tiny vocabulary allows).
    """
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for offset, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[char] = 3 + offset
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=TINY_CONTEXT)


def save_tiny_model(model_type: str, out: str | Path, **kwargs: Any) -> Path:
    """Save a tiny model and the byte tokenizer, so the directory works wherever a real model does."""
    out = Path(out)
    build_tiny_model(model_type, **kwargs).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out
