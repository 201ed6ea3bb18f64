"""Upcycling: a dense model's FFNs copied into experts, or an MoE's experts duplicated into more experts.

**Dense -> MoE** (sparse upcycling, Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts
from Dense Checkpoints"): every expert of a layer is a copy of the dense FFN, attention, norms and
embeddings are kept bit for bit, and the router is drawn at random (normal, std ``router_std``,
seeded; ``router_std=0`` gives a zero router). Whatever the router selects, the top-K weights sum to 1
(the families written here renormalise them: Mixtral always, Qwen3-MoE with ``norm_topk_prob``), and
the experts are equal, so the upcycled model computes the dense model at step 0 up to round-off
(tested). Llama and Mistral become stock Mixtral checkpoints, Qwen3 stock Qwen3-MoE ones. Training
(``moekit recover``) is what breaks the symmetry between the copies.

**Partial re-initialisation** (``reinit_ratio`` r > 0; Drop-Upcycling, Nakamura et al., ICLR 2025, "Drop-Upcycling:
Training Sparse Mixture of Experts with Partial Re-initialization"): after the copy, every expert draws its own
random set S of round(r * I) of the I intermediate neurons, and those neurons' rows of the gate and up projections
and columns of the down projection are drawn anew from a normal distribution with the mean and std of the entries
they replace (per matrix and expert). The experts then differ from the start, so that training can make them
specialise instead of keeping near-copies; the model no longer computes the dense one at step 0 (the measured
logit difference is recorded). Where it differs from the paper's reference code: one set S per expert serves all
three matrices (the paper's description: a neuron's weights are dropped together), drawn from moekit's seeded
generator.

**E -> m*E** (expert upcycling, as in "Expert Upcycling: Shifting the Compute-Efficient Frontier of
Mixture-of-Experts"; the duplication rule here is uniform): every expert of every MoE layer is
duplicated ``factor`` times (copies next to each other, so group-limited layouts would keep their
groups), the router's rows, biases and correction biases with it; shared experts and everything else are
kept. Exactness at step 0 depends on the routing maths and the new top-K:

- with ``top_k = factor * K`` every token selects all copies of its original K experts, and the
  copies' weights add up to the original weight wherever weights are a softmax over all experts or are
  renormalised to sum 1 over the selected ones (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3's normalised
  sigmoid, ...): exact. Unnormalised sigmoid weights (each copy keeps the whole weight) and DBRX's p-norm
  with p != 1 are not;
- with the top-K unchanged (the paper's setting, the default) a token selects copies of its top
  K/factor experts instead of its top K: not exact; recovery training is needed.

The difference of the logits before and after, on random token ids, is measured and recorded
either way (``step0_max_logit_difference``), so the record says what the maths above predicts.
Group-limited routing (``n_group > 1``) is refused: its group scores would count an expert's copies
twice.

**Utility-based (non-uniform) duplication** (``utility_data``; the paper's "utility-based expert selection"
guides duplication by gradient importance): the layer still grows from E to ``factor * E`` experts, but every
expert keeps one copy and the other ``(factor - 1) * E`` copies go to the experts in proportion to their
utility (largest remainders; ties to the lower index). The utility of expert j is moekit's choice, because the
paper's exact score was not available here: the first-order Taylor estimate of the loss change from removing
the expert (Molchanov et al. 2019), ``u_j = mean over batches of (sum over the expert's weights of
w * dL/dw)^2`` with L the next-token loss on the calibration text. With unequal copies the router's softmax
counts an expert c_j times, so the model is not exact at step 0 whatever the top-K (measured and recorded as
above).

Both work on a model loaded into memory (``from_pretrained``), unlike pruning's streaming editor: meant
for testbeds and models that fit the RAM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedModel

from moekit.arch.view import MoEModelView
from moekit.data import CalibrationSet
from moekit.edit.checkpoint import check_output_dir, write_checkpoint
from moekit.edit.prune import prune_layer, set_count_attributes, set_top_k
from moekit.errors import UserError
from moekit.model_io import describe_source, load_config, load_model
from moekit.moefy import check_swiglu_ffn, dense_fields
from moekit.outputs import shown_path

# Dense model type -> the stock MoE family that shares its blocks.
UPCYCLE_FAMILIES = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}
PROBE_SEED = 1234


class UpcycleError(UserError):
    """A model or setting upcycling cannot handle; the message says why."""


def upcycled_config(dense: Any, experts: int, top_k: int) -> Any:
    """The config of the MoE that a dense config upcycles into (checked)."""
    model_type = getattr(dense, "model_type", "?")
    target = UPCYCLE_FAMILIES.get(model_type)
    if target is None:
        raise UpcycleError(f"upcycle converts {', '.join(sorted(UPCYCLE_FAMILIES))} models; {model_type!r} has no "
                           "mapping yet")
    check_swiglu_ffn(dense, "upcycle", UpcycleError, attention_bias_allowed=target != "mixtral")
    if experts < 2:
        raise UpcycleError(f"--experts {experts} must be at least 2")
    if not 1 <= top_k <= experts:
        raise UpcycleError(f"--top-k {top_k} must be between 1 and --experts {experts}")
    config_class = CONFIG_MAPPING[target]
    kept = dense_fields(dense, config_class)
    inter = int(dense.intermediate_size)
    if target == "mixtral":
        extra = {"num_local_experts": experts, "intermediate_size": inter}
    else:
        extra = {"num_experts": experts, "moe_intermediate_size": inter, "norm_topk_prob": True,
                 "decoder_sparse_step": 1, "mlp_only_layers": []}
    architecture = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[target]
    return config_class(**{**kept, **extra, "num_experts_per_tok": top_k, "output_router_logits": False,
                           "architectures": [architecture]})


def check_reinit_ratio(reinit_ratio: float) -> None:
    if not 0.0 <= reinit_ratio <= 1.0:
        raise UpcycleError(f"--reinit-ratio {reinit_ratio} must be between 0 (plain copies) and 1 (every neuron "
                           "drawn anew)")


def reinit_neurons(gate_up: torch.Tensor, down: torch.Tensor, ratio: float, generator: torch.Generator
                   ) -> torch.Tensor:
    """Drop-Upcycling's re-initialisation of one expert, in place: ``gate_up`` [2I, H] (gate rows, then up rows)
    and ``down`` [H, I]. Returns the re-initialised neuron indices (sorted)."""
    inter = down.shape[1]
    chosen = torch.randperm(inter, generator=generator)[: round(ratio * inter)].sort().values
    if chosen.numel() == 0:
        return chosen
    rows = chosen.to(gate_up.device)
    for part in (gate_up[:inter], gate_up[inter:]):
        part[rows] = _drawn_like(part[rows], generator)
    down[:, rows] = _drawn_like(down[:, rows], generator)
    return chosen


def _drawn_like(replaced: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Normal draws of ``replaced``'s shape, dtype and device, with the mean and std of its entries."""
    stats = replaced.float()
    drawn = torch.randn(stats.shape, generator=generator) * stats.std(unbiased=False).item() + stats.mean().item()
    return drawn.to(dtype=replaced.dtype, device=replaced.device)


def upcycle_dense(dense: PreTrainedModel, experts: int, top_k: int, router_std: float | None = None,
                  seed: int = 0, reinit_ratio: float = 0.0) -> PreTrainedModel:
    """The MoE whose every expert is a copy of ``dense``'s FFN (see the module doc); ``router_std`` None: the
    dense config's ``initializer_range``; ``reinit_ratio`` > 0: that share of every expert's neurons drawn anew
    (Drop-Upcycling, see the module doc)."""
    config = upcycled_config(dense.config, experts, top_k)
    std = float(getattr(dense.config, "initializer_range", 0.02)) if router_std is None else float(router_std)
    if std < 0:
        raise UpcycleError(f"--router-std {router_std} must be at least 0")
    check_reinit_ratio(reinit_ratio)
    first = next(dense.parameters())
    moe = AutoModelForCausalLM.from_config(config, dtype=first.dtype).to(first.device)
    dense_state = dense.state_dict()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in moe.state_dict().items():
            if ".mlp." not in name:
                tensor.copy_(dense_state[name])
        for index, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[index].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # [2I, H]
            layer.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, -1, -1))
            layer.mlp.experts.down_proj.copy_(mlp.down_proj.weight.expand(experts, -1, -1))
            router = layer.mlp.gate.weight
            drawn = torch.randn(router.shape, generator=generator) * std
            router.copy_(drawn.to(router.dtype))
        if reinit_ratio > 0:
            # drawn after every router, from a generator of its own, so the routers match plain upcycling's
            drop = torch.Generator().manual_seed(seed + 1)
            for layer in moe.model.layers:
                weights = layer.mlp.experts
                for expert in range(experts):
                    reinit_neurons(weights.gate_up_proj.data[expert], weights.down_proj.data[expert], reinit_ratio,
                                   drop)
    return moe.eval()


def expert_utility(model: PreTrainedModel, sets: list[CalibrationSet], batch_size: int = 4,
                   progress: bool = False) -> dict[int, torch.Tensor]:
    """Per MoE layer (by decoder-layer index), every expert's utility ``[E]`` (float64): the mean over
    calibration batches of ``(sum over the expert's weights of w * dL/dw)^2``, L the model's next-token loss on
    the batch (padding masked) -- the first-order Taylor estimate of the loss change from removing the expert
    (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning"). One forward and one backward
    pass per batch; only the experts' weights take gradients; the model's ``requires_grad`` flags are restored."""
    from tqdm.auto import tqdm

    view = MoEModelView.from_model(model)
    tensors: dict[int, list[torch.nn.Parameter]] = {}
    for layer in view.layers:
        owned = []
        for name, param in layer.experts.named_parameters():
            rows = layer.layout.expert_rows(layer.experts, name)
            if rows is not None:
                if param.shape[0] != rows * layer.num_experts:
                    raise UpcycleError(f"layer {layer.index}: {name} has {param.shape[0]} rows, not "
                                       f"{rows} x {layer.num_experts} experts")
                owned.append(param)
        if not owned:
            raise UpcycleError(f"layer {layer.index}: found no per-expert weights to take gradients of")
        tensors[layer.index] = owned
    flat = [param for owned in tensors.values() for param in owned]
    flags = {param: param.requires_grad for param in model.parameters()}
    device = next(model.parameters()).device
    utility = {index: torch.zeros(view.num_experts, dtype=torch.float64) for index in tensors}
    batches = [(s.input_ids[i:i + batch_size], s.attention_mask[i:i + batch_size])
               for s in sets for i in range(0, len(s.input_ids), batch_size)]
    if not batches:
        raise UpcycleError("the utility calibration data holds no tokens")
    training = model.training
    try:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        for param in flat:
            param.requires_grad_(True)
        for ids, mask in tqdm(batches, desc="expert utility", unit="batch", disable=not progress):
            ids, mask = ids.to(device), mask.to(device)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            grads = iter(torch.autograd.grad(loss, flat))
            for index, owned in tensors.items():
                taylor = torch.zeros(view.num_experts, dtype=torch.float64)
                for param in owned:
                    product = param.detach().double() * next(grads).double()
                    taylor += product.reshape(view.num_experts, -1).sum(1).cpu()
                utility[index] += taylor.square()
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(training)
    return {index: total / len(batches) for index, total in utility.items()}


def utility_copies(utility: torch.Tensor, total: int) -> list[int]:
    """How many copies each expert gets when a layer of ``len(utility)`` experts grows to ``total``: one each,
    and the ``total - E`` others in proportion to ``utility`` by largest remainders (ties to the lower index);
    uniform when every utility is 0."""
    experts = len(utility)
    extra = total - experts
    if extra < 0:
        raise UpcycleError(f"cannot grow {experts} experts to {total}")
    weights = utility.double().clamp(min=0)
    if float(weights.sum()) <= 0:
        weights = torch.ones(experts, dtype=torch.float64)
    share = weights / weights.sum() * extra
    base = share.floor().long()
    left = extra - int(base.sum())
    order = sorted(range(experts), key=lambda j: (-float(share[j] - base[j]), j))
    for j in order[:left]:
        base[j] += 1
    return [1 + int(c) for c in base]


def duplicate_experts(model: PreTrainedModel, factor: int, top_k: int | None = None,
                      copies: dict[int, list[int]] | None = None) -> MoEModelView:
    """Duplicate the experts of every MoE layer in place, E becoming ``factor * E``: every expert ``factor`` times
    (expert j's copies at ``j*factor .. j*factor+factor-1``), or, with ``copies`` (per decoder-layer index, the
    copies of each expert, summing to ``factor * E``; ``utility_copies``), expert j ``copies[layer][j]`` times,
    copies next to each other in expert order; ``top_k`` the new experts per token (default: unchanged)."""
    view = MoEModelView.from_model(model)
    if factor < 2:
        raise UpcycleError(f"--factor {factor} must be at least 2")
    if copies is not None:
        for layer in view.layers:
            counts = copies.get(layer.index)
            if (counts is None or len(counts) != layer.num_experts or min(counts) < 1
                    or sum(counts) != factor * layer.num_experts):
                raise UpcycleError(f"layer {layer.index}: copies {counts} must give each of its "
                                   f"{layer.num_experts} experts at least one copy and {factor * layer.num_experts} "
                                   "in all")
    spec = view.layers[0].routing
    if spec.group_limited:
        raise UpcycleError(f"{view.model_type} routes within {spec.n_group} expert groups; duplicating experts "
                           "would count copies twice in the group scores, which upcycle does not handle")
    experts = view.num_experts * factor
    new_top_k = view.top_k if top_k is None else top_k
    if not 1 <= new_top_k <= experts:
        raise UpcycleError(f"--top-k {new_top_k} must be between 1 and the {experts} experts after duplication")
    if spec.kind == "sparsemixer" and new_top_k != view.top_k:
        raise UpcycleError("PhiMoE's sparsemixer routing is hard-wired to two experts per token; --top-k cannot "
                           "change it")
    with torch.no_grad():
        for layer in view.layers:
            counts = copies[layer.index] if copies is not None else [factor] * layer.num_experts
            prune_layer(layer, [j for j in range(layer.num_experts) for _ in range(counts[j])])
    view.config_fields.set_expert_count(model.config, experts)
    set_count_attributes(model, experts)
    if new_top_k != view.top_k:
        set_top_k(view, new_top_k)
    return MoEModelView.from_model(model)


def probe_logits(model: PreTrainedModel, seed: int = PROBE_SEED) -> torch.Tensor:
    """The model's float32 logits on two sequences of random token ids: what upcycling is checked on."""
    ids = torch.randint(0, int(model.config.vocab_size), (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float()


def upcycle_to_checkpoint(source: str | Path, out: str | Path, *, experts: int | None = None,
                          factor: int | None = None, top_k: int | None = None, router_std: float | None = None,
                          seed: int = 0, dtype: str = "auto", overwrite: bool = False,
                          utility_data: list[str] | None = None, utility_tokens: int = 16384,
                          seq_len: int = 512, progress: bool = False, reinit_ratio: float = 0.0
                          ) -> tuple[Path, dict[str, Any]]:
    """Upcycle the model at ``source`` and write a stock checkpoint to ``out``: a dense model into ``experts``
    copies of its FFN (top-``top_k``, default 2), or an MoE's experts ``factor`` times (``top_k`` default:
    unchanged), uniformly or, with ``utility_data`` (``NAME=PATH`` sets, ``utility_tokens`` tokens each, packed
    in ``seq_len``-token sequences), by expert utility (``expert_utility``, ``utility_copies``). Returns the path
    and the record saved as ``moekit_plan.json``."""
    from moekit.data import DataSpec

    check_output_dir(out, source, overwrite)
    if utility_data and factor is None:
        raise UpcycleError("utility-based duplication grows an MoE's experts: give --factor M with --utility-data")
    if utility_tokens < 1 or seq_len < 2:
        raise UpcycleError(f"--utility-tokens ({utility_tokens}) must be at least 1 and --seq-len ({seq_len}) at "
                           "least 2")
    specs = [DataSpec.parse(d) for d in utility_data or []]  # missing files are errors before weights load
    config = load_config(source)
    dense = getattr(config, "model_type", None) in UPCYCLE_FAMILIES
    if dense and (experts is None or factor is not None):
        raise UpcycleError(f"{source} is a dense {config.model_type} model: give --experts E (and --top-k), not "
                           "--factor")
    if not dense and (factor is None or experts is not None):
        raise UpcycleError(f"{source} is not a dense {'/'.join(sorted(UPCYCLE_FAMILIES))} model: to duplicate an "
                           "MoE's experts give --factor M (and --top-k), not --experts")
    check_reinit_ratio(reinit_ratio)
    if reinit_ratio > 0 and not dense:
        raise UpcycleError("--reinit-ratio re-initialises the copies of a dense FFN (Drop-Upcycling); it does not "
                           "apply to duplicating an MoE's experts (--factor)")
    if dense:
        upcycled_config(config, experts or 0, top_k or 2)  # errors before any weight loads
    # the utility data is read and tokenised before any weight loads (a missing tokenizer or empty file fails fast)
    sets: list[CalibrationSet] = []
    if specs:
        from moekit.data import load_calibration_set, load_tokenizer

        tokenizer = load_tokenizer(source)
        sets = [load_calibration_set(spec, tokenizer, seq_len, utility_tokens, seed) for spec in specs]
    model = load_model(source, dtype=dtype)
    reference = probe_logits(model)
    if dense:
        assert experts is not None
        moe = upcycle_dense(model, experts, top_k or 2, router_std, seed, reinit_ratio)
        difference = float((probe_logits(moe) - reference).abs().max())
        record = {"format": "moekit.upcycle/1", "mode": "dense", "source": describe_source(source),
                  "experts": experts, "top_k": top_k or 2,
                  "router_std": router_std if router_std is not None else getattr(config, "initializer_range", 0.02),
                  "seed": seed, "reinit_ratio": reinit_ratio, "step0_max_logit_difference": difference}
        if reinit_ratio > 0:
            record["reinit"] = {"method": "Drop-Upcycling (Nakamura et al. 2025)", "neurons_per_expert":
                                round(reinit_ratio * int(config.intermediate_size)),
                                "distribution": "normal with the mean and std of the entries replaced, per matrix "
                                "and expert", "seed": seed + 1}
        what = (f"every FFN copied into {experts} experts, top-{top_k or 2} routing, router drawn with std "
                f"{record['router_std']} (seed {seed})"
                + (f", {reinit_ratio:.0%} of each expert's neurons re-initialised (Drop-Upcycling)"
                   if reinit_ratio > 0 else ""))
    else:
        assert factor is not None
        before = MoEModelView.from_model(model)
        old_experts, old_top_k = before.num_experts, before.top_k
        duplication: dict[str, Any] = {"rule": "uniform"}
        copies = None
        if sets:
            utility = expert_utility(model, sets, progress=progress)
            copies = {index: utility_copies(u, factor * old_experts) for index, u in utility.items()}
            duplication = {"rule": "utility", "score": "mean over batches of (sum_w w * dL/dw)^2 per expert, L the "
                           "next-token loss (first-order Taylor, Molchanov et al. 2019)",
                           "allocation": "one copy each, the rest proportional to utility (largest remainders)",
                           "data": {s.name: int(s.attention_mask.sum()) for s in sets},
                           "copies": {str(i): c for i, c in copies.items()},
                           "utility": {str(i): [float(x) for x in u] for i, u in utility.items()}}
        view = duplicate_experts(model, factor, top_k, copies=copies)
        moe = view.model
        difference = float((probe_logits(moe) - reference).abs().max())
        record = {"format": "moekit.upcycle/1", "mode": "duplicate", "source": describe_source(source),
                  "factor": factor, "experts": {"before": old_experts, "after": view.num_experts},
                  "top_k": {"before": old_top_k, "after": view.top_k}, "duplication": duplication["rule"],
                  "duplication_details": duplication, "step0_max_logit_difference": difference}
        how = ("duplicated by utility (one copy each, the rest in proportion to gradient importance; most copies: "
               f"{max(max(c) for c in copies.values())})" if copies else f"duplicated {factor} times")
        what = (f"every expert {how} ({old_experts} -> {view.num_experts} per layer), "
                f"top-{old_top_k} -> top-{view.top_k}")
    card = (f"# {Path(out).name}\n\nUpcycled by `moekit upcycle` from `{shown_path(source, out)}`: {what}. "
            f"Largest logit difference to the source on random tokens at step 0: {difference:.3g}. Not trained yet: "
            f"train it with `moekit recover {Path(out).name} --teacher <the source> --data NAME=PATH`.\n")
    return write_checkpoint(moe, out, source, record, card, overwrite=overwrite), record
