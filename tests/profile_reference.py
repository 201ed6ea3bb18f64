"""A slow, plain per-token reference of every profile statistic, for checking the capture.

It runs the model with its default experts implementation, records each MoE block's input and the
residual stream (the input of the norm in front of the block), then loops over tokens in Python:
the model's own router gives the experts and gates, and each selected expert is run alone on the
single token through the experts module itself (one-hot routing, gate 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moekit.arch.view import MoEModelView, model_routing
from moekit.profile.stats import CHUNK_SIZES


def _expert_output(layer, hidden: torch.Tensor, expert: int, gate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_j(x) [H], a_j(x) [I]) for one token; Llama-4 feeds the gated input, as the model does."""
    experts = layer.experts
    w = layer.expert_weights(expert)
    x = hidden * gate if layer.call.kind == "llama4" else hidden
    if hasattr(experts, "_apply_gate") and w.gate is not None and not experts.is_concatenated:
        # GPT-OSS: interleaved gate/up with its own clamped activation
        fused = torch.stack([x @ w.gate.T + w.gate_bias, x @ w.up.T + w.up_bias], dim=-1).reshape(-1)
        act = experts._apply_gate(fused[None])[0]
    else:
        act_fn = experts.mlp.activation_fn if hasattr(experts, "mlp") else experts.act_fn
        gate_out = x @ w.gate.T + (w.gate_bias if w.gate_bias is not None else 0)
        up_out = x @ w.up.T + (w.up_bias if w.up_bias is not None else 0)
        act = act_fn(gate_out) * up_out
    out = act @ w.down.T + (w.down_bias if w.down_bias is not None else 0)
    return out, act


def reference_profile(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, dict]:
    """Per layer: every statistic of ``moekit.profile.stats`` for one set, by plain loops."""
    view = MoEModelView.from_model(model)
    inputs: dict[int, torch.Tensor] = {}
    residuals: dict[int, torch.Tensor] = {}
    handles = []
    for layer in view.layers:
        handles.append(layer.block.register_forward_pre_hook(
            lambda m, a, i=layer.index: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).clone())))
        decoder_layer = model.get_submodule(layer.path.rpartition(".")[0])
        norm = (decoder_layer.norm_attn_norm.norm_2 if hasattr(decoder_layer, "norm_attn_norm")  # DBRX
                else decoder_layer.post_attention_layernorm)
        handles.append(norm.register_forward_pre_hook(
            lambda m, a, i=layer.index: residuals.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        model(input_ids=input_ids)
    for handle in handles:
        handle.remove()

    batch, length = input_ids.shape
    valid = attention_mask.reshape(-1).bool()
    result: dict[int, dict] = {}
    for layer in view.layers:
        experts = layer.num_experts
        hidden = inputs[layer.index]
        with torch.no_grad():
            index, weights = model_routing(layer, hidden)
            logits = F.linear(hidden.float(), layer.router_weight.float(),
                              None if layer.router_bias is None else layer.router_bias.float())
        stats = {name: torch.zeros(experts, dtype=torch.float64) for name in
                 ("count", "gate_sum", "router_prob_sum", "norm_sum", "gated_norm_sum", "norm_max", "act_max",
                  "easy_ep_sum")}
        stats["coactivation"] = torch.zeros(experts, experts, dtype=torch.float64)
        stats["neuron_energy"] = torch.zeros(experts, layer.intermediate_size, dtype=torch.float64)
        stats["neuron_max"] = torch.zeros(experts, layer.intermediate_size, dtype=torch.float64)
        tokens, entropy = 0, 0.0
        for t in range(hidden.shape[0]):
            if not valid[t]:
                continue
            tokens += 1
            if layer.routing.kind in ("sigmoid_topk", "topk_sigmoid"):  # the family's own scores
                p = torch.sigmoid(logits[t].double())
                q = p / p.sum()
            else:
                p = q = torch.softmax(logits[t].double(), dim=-1)
            stats["router_prob_sum"] += p
            entropy += float(-(q * q.log()).sum())
            routed = torch.zeros(hidden.shape[-1], dtype=torch.float64)
            pairs = []
            with torch.no_grad():
                for slot in range(index.shape[1]):
                    j, g = int(index[t, slot]), float(weights[t, slot])
                    out, act = _expert_output(layer, hidden[t], j, g)
                    contribution = out if layer.call.kind == "llama4" else g * out
                    routed += contribution.double()
                    pairs.append((j, g, out.double(), act.double(), float(contribution.double().norm())))
            residual = residuals[layer.index][t].double()
            change = max(0.0, 1 - float(F.cosine_similarity(residual, residual + routed, dim=0)))
            for j, g, out, act, contribution_norm in pairs:
                norm = contribution_norm / g if layer.call.kind == "llama4" else float(out.norm())
                stats["count"][j] += 1
                stats["gate_sum"][j] += g
                stats["norm_sum"][j] += norm
                stats["gated_norm_sum"][j] += contribution_norm
                stats["norm_max"][j] = max(float(stats["norm_max"][j]), norm)
                stats["act_max"][j] = max(float(stats["act_max"][j]), float(out.abs().max()))
                stats["easy_ep_sum"][j] += contribution_norm * change
                stats["neuron_energy"][j] += (g * act) ** 2
                stats["neuron_max"][j] = torch.maximum(stats["neuron_max"][j], (g * act).abs())
                for i, *_ in pairs:
                    stats["coactivation"][i, j] += 1
        chosen = [set(index[t].tolist()) for t in range(hidden.shape[0])]
        chunk_sum, chunk_count = [], []
        for size in CHUNK_SIZES:
            total = count = 0
            for b in range(batch):
                for start in range(0, length - size + 1, size):
                    positions = [b * length + start + o for o in range(size)]
                    if all(valid[p] for p in positions):
                        total += len(set().union(*(chosen[p] for p in positions)))
                        count += 1
            chunk_sum.append(total)
            chunk_count.append(count)
        stats["chunk_experts_sum"] = torch.tensor(chunk_sum, dtype=torch.float64)
        stats["chunk_count"] = torch.tensor(chunk_count, dtype=torch.float64)
        stats["tokens"] = torch.tensor(float(tokens), dtype=torch.float64)
        stats["router_entropy_sum"] = torch.tensor(entropy, dtype=torch.float64)
        result[layer.index] = stats
    assert math.isfinite(sum(float(s["count"].sum()) for s in result.values()))
    return result
