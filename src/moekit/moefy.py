"""Turn a dense Llama-style model into a Mixtral MoE: split every FFN's neurons into experts (MoEfication).

A SwiGLU FFN is a sum over its intermediate neurons n: ``FFN(x) = sum_n down[:, n] * act(gate_n . x) * (up_n . x)``.
Partitioning the neurons into E groups of I/E and making each group an expert therefore splits the FFN exactly:
``FFN(x) = sum_e f_e(x)``. The converted model is a stock ``MixtralForCausalLM`` (Mixtral's blocks are
Llama's with the MLP replaced by softmax top-k experts) whose attention, norms and embeddings are the
dense model's, bit for bit.

Partition (``partition_neurons``): balanced k-means on each neuron's unit-normalised
[gate row ; up row ; down column] -- neurons that read and write similar directions share an
expert (MoEfication's parameter clustering) -- every cluster exactly I/E neurons; assignment by
cluster preference under capacity, deterministic for a seed.

Routing weights: Mixtral multiplies expert e's output by w_e, the softmax over the K selected logits
(renormalised, sum 1). To start close to the dense model each expert's down projection is
multiplied by K, so selected experts contribute K * w_e * f_e ~ f_e. Routers (``router``):

- ``zero``: all logits 0, every w_e = 1/K. With K = E every expert is selected, so the converted
  model equals the dense one exactly (tested); with K < E the choice among equal logits is
  arbitrary, so use it only with K = E or before recovery training.
- ``centroid`` (default): expert e's router row is the mean of its neurons' gate rows, a data-free
  stand-in for MoEfication's learned router (which predicts the experts with the largest
  activations): tokens go to the experts whose gate directions they align with. The rows are scaled
  by ``CENTROID_SCALE`` (1e-3) so that the logits keep their order but the softmax over the K
  selected is nearly uniform: K * w_e stays ~1, and the MoE computes about the sum of the selected
  experts' outputs, MoEfication's approximation. (Unscaled, the softmax concentrates on one expert
  and K * w_e amplifies it up to K times: SmolLM2 with 16 experts, top-8, reached perplexity 4e9.)
  Recovery training (routers only, or all weights) is the next step: ``moekit.recover`` / ``moekit recover``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from moekit.edit.checkpoint import check_output_dir, write_checkpoint
from moekit.errors import UserError
from moekit.model_io import describe_source, load_model
from moekit.outputs import shown_path

# Dense model type -> the stock MoE family that shares its blocks.
MOEFY_FAMILIES = {"llama": "mixtral", "mistral": "mixtral"}
RouterInit = Literal["centroid", "zero"]
CENTROID_SCALE = 1e-3  # keeps the centroid router's order, makes its top-K weights nearly equal


class MoefyError(UserError):
    """A dense model or setting moefy cannot convert; the message says why."""


def partition_neurons(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, experts: int, seed: int = 0,
                      iterations: int = 20) -> list[list[int]]:
    """Balanced k-means of the neurons of one FFN (``gate``/``up`` [I, H], ``down`` [H, I]) into ``experts``
    clusters of exactly I / experts neurons each; returns each cluster's sorted neuron ids."""
    neurons = gate.shape[0]
    size = neurons // experts
    features = torch.cat([gate, up, down.T], dim=1).float()
    features = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
    gen = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(neurons, generator=gen)[:experts]].clone()
    assignment = torch.zeros(neurons, dtype=torch.long)
    for _ in range(iterations):
        similarity = features @ centroids.T  # [I, E]
        assignment = _balanced_assign(similarity, size)
        updated = torch.stack([features[assignment == e].mean(0) for e in range(experts)])
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return [sorted(torch.nonzero(assignment == e).flatten().tolist()) for e in range(experts)]


def _balanced_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Each neuron to its most similar cluster that still has room, strongest preferences first."""
    neurons, experts = similarity.shape
    order = torch.argsort(similarity.flatten(), descending=True, stable=True)
    assignment = torch.full((neurons,), -1, dtype=torch.long)
    room = [size] * experts
    for flat in order.tolist():
        neuron, expert = divmod(flat, experts)
        if assignment[neuron] < 0 and room[expert] > 0:
            assignment[neuron] = expert
            room[expert] -= 1
    return assignment


def moe_config(dense: Any, experts: int, top_k: int) -> MixtralConfig:
    """The Mixtral config of a converted dense config (checked)."""
    model_type = getattr(dense, "model_type", "?")
    if model_type not in MOEFY_FAMILIES:
        raise MoefyError(f"moefy converts {', '.join(sorted(MOEFY_FAMILIES))} models (to Mixtral); {model_type!r} "
                         "has no mapping yet")
    check_swiglu_ffn(dense, "moefy", MoefyError, attention_bias_allowed=False)
    inter = int(dense.intermediate_size)
    if experts < 2 or inter % experts:
        raise MoefyError(f"--experts {experts} must be at least 2 and divide the FFN size {inter}")
    if not 1 <= top_k <= experts:
        raise MoefyError(f"--top-k {top_k} must be between 1 and --experts {experts}")
    return MixtralConfig(**{**dense_fields(dense, MixtralConfig), "intermediate_size": inter // experts,
                            "num_local_experts": experts, "num_experts_per_tok": top_k,
                            "architectures": ["MixtralForCausalLM"]})


def check_swiglu_ffn(dense: Any, what: str, error: type[UserError], attention_bias_allowed: bool) -> None:
    """A dense config whose FFN the MoE families' experts can hold: SwiGLU with SiLU, no biases (and, for
    Mixtral, no attention biases)."""
    if getattr(dense, "hidden_act", "silu") != "silu" or getattr(dense, "mlp_bias", False):
        raise error(f"{what} needs a SwiGLU FFN with SiLU and no biases (what the MoE families' experts are)")
    if not attention_bias_allowed and getattr(dense, "attention_bias", False):
        raise error("the dense model has attention biases, which Mixtral's attention lacks")


def dense_fields(dense: Any, config_class: Any) -> dict[str, Any]:
    """The dense config's fields that ``config_class`` (the MoE family's config) also has."""
    fields = config_class().to_dict()
    return {k: v for k, v in dense.to_dict().items() if k in fields and k not in ("model_type", "architectures")}


def moefy_model(dense: Any, experts: int, top_k: int, router: RouterInit = "centroid",
                seed: int = 0) -> tuple[MixtralForCausalLM, list[list[list[int]]]]:
    """(the Mixtral model, per layer the neuron ids of every expert) for a loaded dense model."""
    if router not in ("centroid", "zero"):
        raise MoefyError(f"unknown router initialisation {router!r}; valid: centroid, zero")
    config = moe_config(dense.config, experts, top_k)
    first = next(dense.parameters())
    moe = AutoModelForCausalLM.from_config(config, dtype=first.dtype).to(first.device)  # where the dense model is
    dense_state = dense.state_dict()
    moe_state = moe.state_dict()
    partitions = []
    with torch.no_grad():
        for name, tensor in moe_state.items():
            if ".mlp." not in name:
                tensor.copy_(dense_state[name])
        for index, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[index].mlp
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            groups = partition_neurons(gate, up, down, experts, seed + index)
            partitions.append(groups)
            ids = torch.tensor(groups)  # [E, I/E]
            layer.mlp.experts.gate_up_proj.copy_(torch.cat([gate[ids], up[ids]], dim=1))
            layer.mlp.experts.down_proj.copy_(down[:, ids].permute(1, 0, 2) * top_k)
            weight = layer.mlp.gate.weight
            weight.copy_(torch.zeros_like(weight) if router == "zero" else gate[ids].mean(1) * CENTROID_SCALE)
    return moe.eval(), partitions


def moefy_record(source: str, experts: int, top_k: int, router: str, seed: int,
                 partitions: list[list[list[int]]]) -> dict[str, Any]:
    """The ``moekit_plan.json`` record of a conversion: its settings and every layer's partition."""
    return {"format": "moekit.moefy/1", "source": source, "experts": experts, "top_k": top_k, "router": router,
            "seed": seed, "down_proj_scale": top_k,
            "partitions": {str(i): groups for i, groups in enumerate(partitions)}}


def moefy_to_checkpoint(source: str | Path, out: str | Path, experts: int, top_k: int,
                        router: RouterInit = "centroid", seed: int = 0, overwrite: bool = False,
                        dtype: str = "auto") -> Path:
    """Convert the dense model at ``source`` and write a stock Mixtral checkpoint (with its tokenizer) to ``out``."""
    from moekit.model_io import load_config

    check_output_dir(out, source, overwrite)
    moe_config(load_config(source), experts, top_k)  # errors before any weight loads
    dense = load_model(source, dtype=dtype)
    moe, partitions = moefy_model(dense, experts, top_k, router, seed)
    record = moefy_record(describe_source(source), experts, top_k, router, seed, partitions)
    card = (f"# {Path(out).name}\n\nConverted by `moekit moefy` from the dense `{shown_path(source, out)}`: every FFN "
            f"split into {experts} experts of {moe.config.intermediate_size} neurons (balanced k-means of neuron "
            f"weights), top-{top_k} routing, router initialised `{router}`, experts' down projections scaled by "
            f"{top_k}. Attention, norms and embeddings are the dense model's. Not trained yet: recover quality with "
            f"`moekit recover {Path(out).name} --teacher <the dense model> --data NAME=PATH`.\n")
    return write_checkpoint(moe, out, source, record, card, overwrite=overwrite)
