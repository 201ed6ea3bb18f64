"""Capture: compute each MoE layer's experts exactly as the model does and feed the accumulators.

Decorated experts (transformers' ``use_experts_implementation``) run through a registered experts
implementation, ``moekit_capture``: the same grouped computation as the default ``grouped_mm``
implementation (same sort, same ``grouped_mm`` kernel, same weighting and reduction order, so the
output is bit-identical where the default is ``grouped_mm``), which also keeps each (token, expert)
pair's output before gating. DBRX's experts and Llama-4's MoE block are not decorated; they get an
instance-level forward with the same computation (only the selected experts run; Llama-4 scales
the expert *input* by its gate, as the model does).

No per-token Python and no host/device synchronisation happen in the forward pass: every
statistic is a tensor op into on-device accumulators (``moekit.profile.stats``). The batch's
padding mask and named-set index live in a :class:`CaptureState` the caller sets per batch.

Layer-by-layer execution and data parallelism reuse this unchanged: the capture only needs a
layer's modules to run, and the accumulators are sums and maxima (all-reduce with SUM / MAX).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from moekit.arch.experts import DbrxLayout, StackedLayout
from moekit.arch.routing import router_scoring
from moekit.arch.view import MoELayer, MoEModelView
from moekit.profile.stats import LayerStats, PairStats

CAPTURE_IMPLEMENTATION = "moekit_capture"
# Norms whose *input* is the residual stream entering the MoE sub-layer (pre-norm decoder layers).
RESIDUAL_NORM_NAMES = ("post_attention_layernorm", "pre_feedforward_layernorm", "pre_ff_layernorm", "ffn_norm",
                       "norm_2", "ln_2", "norm")


@dataclass
class CaptureState:
    """Per-batch context shared by every layer's capture: named-set index and padding mask."""

    set_index: int = 0
    batch_shape: tuple[int, int] = (1, 1)
    _valid: torch.Tensor | None = None  # [B*S] float 0/1, on the CPU
    _on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def begin_batch(self, set_index: int, attention_mask: torch.Tensor) -> None:
        self.set_index = set_index
        self.batch_shape = (int(attention_mask.shape[0]), int(attention_mask.shape[1]))
        self._valid = attention_mask.reshape(-1).float()
        self._on_device = {attention_mask.device: self._valid}

    def valid(self, device: torch.device, tokens: int) -> torch.Tensor:
        if self._valid is None:
            raise RuntimeError("capture used outside a batch: call CaptureState.begin_batch first")
        if tokens != self._valid.numel():
            raise RuntimeError(f"an MoE layer saw {tokens} tokens in a batch of {self._valid.numel()}; moekit's "
                               "capture expects every token to reach every MoE layer")
        if device not in self._on_device:
            self._on_device[device] = self._valid.to(device, non_blocking=True)
        return self._on_device[device]


class LayerCapture:
    """Hooks' view of one MoE layer: its accumulators and the residual stream of the current batch."""

    def __init__(self, layer: MoELayer, state: CaptureState, num_sets: int, neuron_stats: bool,
                 merge_stats: bool = False, gradients: bool = False, input_norms: bool = False) -> None:
        self.layer, self.state, self.merge_stats, self.gradients = layer, state, merge_stats, gradients
        self.input_norms = input_norms
        self.stats = LayerStats(num_sets, layer.num_experts, layer.intermediate_size, neuron_stats, merge_stats,
                                hidden=int(layer.router_weight.shape[-1]), gradients=gradients,
                                input_norms=input_norms, shared_width=layer.shared_width)
        self.neuron_stats = self.stats.neuron_stats  # --gradients collects them too
        self.scoring = router_scoring(layer.routing)
        self.residuals: dict[int, torch.Tensor] = {}  # norm output storage pointer -> norm input
        self.easy_ep_input = "not run"

    def on_router_input(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        valid = self.state.valid(hidden.device, hidden.shape[0])
        with torch.no_grad():
            self.stats.add_router(self.state.set_index, self.layer.router_logits(hidden), valid, self.scoring)

    def on_norm(self, _module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            self.residuals[output.untyped_storage().data_ptr()] = args[0]

    def on_shared_down_input(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the shared MLP's down projection: its input b_t (every token, weight 1)."""
        b = args[0].reshape(-1, args[0].shape[-1])
        with torch.no_grad():
            self.stats.add_shared_neurons(self.state.set_index, b.detach().float(),
                                          self.state.valid(b.device, b.shape[0]))

    def on_shared_output(self, module: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> None:
        """Forward hook on the shared MLP's down projection (--gradients): a backward hook on its output that
        projects d^s_t = dL/d(output_t) onto every column of the down projection, d^s_t . W_down^s[:, m]."""
        if not output.requires_grad:
            return
        set_index = self.state.set_index
        valid = self.state.valid(output.device, output.reshape(-1, output.shape[-1]).shape[0])

        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                projected = grad.reshape(-1, grad.shape[-1]).to(module.weight.dtype) @ module.weight  # [T, J]
                self.stats.add_shared_gradients(set_index, projected, valid)
        output.register_hook(hook)

    def residual_for(self, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream whose normalised form is ``hidden``, else ``hidden`` (post-norm families)."""
        residual = self.residuals.pop(hidden.untyped_storage().data_ptr(), None)
        self.residuals.clear()
        if residual is not None and residual.numel() == hidden.numel():
            self.easy_ep_input = "residual stream"
            return residual.reshape(hidden.shape)
        self.easy_ep_input = "MoE block input"
        return hidden


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x [P, in]`` sorted by expert times each expert's ``weight`` (``[E, out, in]``, or ``[E, in, out]``
    when ``transposed``); ``offsets`` are the cumulative pair counts. The kernel transformers' default
    ``grouped_mm`` implementation uses, so results are bit-identical to it."""
    w = weight if transposed else weight.transpose(-2, -1)
    grouped = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    usable = grouped is not None and (w.device.type != "cuda" or torch.cuda.get_device_capability(w.device) >= (8, 0))
    if usable:
        return grouped(x.to(w.dtype), w, offs=offsets)
    # Old torch: one matmul per expert (one host sync to read the offsets).
    out = torch.zeros(x.shape[0], w.shape[-1], device=x.device, dtype=w.dtype)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end].to(w.dtype) @ w[expert]
        start = end
    return out


def down_projection(experts: nn.Module, layout: Any) -> tuple[torch.Tensor, bool]:
    """(the experts' stacked down-projection weight, ``transposed`` for :func:`grouped_linear` from the [P, I]
    intermediate activations to the [P, H] outputs). The other direction, [P, H] -> [P, I], is ``not transposed``."""
    if isinstance(layout, DbrxLayout):
        mlp = experts.mlp
        return mlp.w2.view(-1, mlp.ffn_hidden_size, mlp.w2.shape[-1]), True  # [E, I, H]
    return experts.down_proj, layout.is_transposed


def expert_outputs(experts: nn.Module, layout: Any, x: torch.Tensor, expert_ids: torch.Tensor,
                    offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs ``[P, H]``, intermediate activations ``[P, I]``) of each pair's expert, before gating."""
    if isinstance(layout, DbrxLayout):
        mlp = experts.mlp
        shape = (-1, mlp.ffn_hidden_size, mlp.w1.shape[-1])
        gate = grouped_linear(x, mlp.w1.view(shape), offsets, transposed=False)
        up = grouped_linear(x, mlp.v1.view(shape), offsets, transposed=False)
        intermediate = mlp.activation_fn(gate) * up
        down, transposed = down_projection(experts, layout)
        return grouped_linear(intermediate, down, offsets, transposed), intermediate
    assert isinstance(layout, StackedLayout)
    first = experts.gate_up_proj if layout.has_gate else experts.up_proj
    proj = grouped_linear(x, first, offsets, layout.is_transposed)
    if layout.has_bias:
        proj.add_((experts.gate_up_proj_bias if layout.has_gate else experts.up_proj_bias)[expert_ids])
    if not layout.has_gate:
        intermediate = experts.act_fn(proj)
    elif hasattr(experts, "_apply_gate"):
        intermediate = experts._apply_gate(proj)
    else:  # Llama-4's experts: gate and up concatenated, act(gate) * up
        gate, up = proj.chunk(2, dim=-1)
        intermediate = up * experts.act_fn(gate)
    down, transposed = down_projection(experts, layout)
    out = grouped_linear(intermediate, down, offsets, transposed)
    if layout.has_bias:
        out.add_(experts.down_proj_bias[expert_ids])
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out, intermediate


def capture_forward(capture: LayerCapture, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, input_gated: bool = False) -> torch.Tensor:
    """The routed experts' output for ``hidden`` (``[T, H]``), as the model computes it, plus statistics.

    ``input_gated``: the family scales each expert's input by its gate instead of its output (Llama-4);
    then the recorded ``g ||f||`` is the norm of the expert's contribution and ``||f||`` that over g.
    """
    layer = capture.layer
    experts, num_experts = layer.experts, layer.num_experts
    x = hidden.reshape(-1, hidden.shape[-1])
    num_tokens, num_top_k = top_k_index.shape
    sample_weights = top_k_weights.reshape(-1)  # [P]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    tokens = perm // num_top_k  # [P] token of each sorted pair
    x_sorted = x[tokens]
    weights_sorted = sample_weights[perm]
    if input_gated:
        x_sorted = x_sorted * weights_sorted[:, None].to(x_sorted.dtype)
    counts = torch.histc(expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int(),
                         bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    out, intermediate = expert_outputs(experts, layer.layout, x_sorted, expert_ids, offsets)
    weighted = out if input_gated else out * weights_sorted.unsqueeze(-1)  # [P, H]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    routed = weighted[inverse].view(num_tokens, num_top_k, -1).sum(dim=1).to(hidden.dtype)  # [T, H]

    with torch.no_grad():  # statistics only: nothing of them enters a backward pass (--gradients)
        state = capture.state
        valid = state.valid(x.device, num_tokens)
        out_norm = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)  # no float32 copy of out
        low, high = torch.aminmax(out, dim=-1)
        gate = weights_sorted.float()
        pairs = PairStats(
            expert=expert_ids, token=tokens, gate=gate,
            norm=out_norm / gate.clamp(min=torch.finfo(torch.float32).tiny) if input_gated else out_norm,
            gated_norm=out_norm if input_gated else gate.abs() * out_norm,
            act_max=torch.maximum(high, -low).float(),
            intermediate=intermediate if capture.neuron_stats or capture.input_norms else None,
            inputs=x_sorted if capture.input_norms else None,
        )
        residual = capture.residual_for(x).float()
        change = (1 - F.cosine_similarity(residual, residual + routed.float(), dim=-1)).clamp(min=0)  # [T]
        capture.stats.add_routing(state.set_index, top_k_index, valid, state.batch_shape)
        capture.stats.add_pairs(state.set_index, pairs, valid, change)
        if capture.merge_stats:
            _all_expert_outputs(capture, x, valid)
    if capture.gradients and routed.requires_grad:
        routed.register_hook(_output_gradient_hook(capture, state.set_index, expert_ids, tokens, offsets,
                                                   valid[tokens]))
    return routed


def _output_gradient_hook(capture: LayerCapture, set_index: int, expert_ids: torch.Tensor, tokens: torch.Tensor,
                          offsets: torch.Tensor, keep: torch.Tensor) -> Any:
    """The backward hook on the routed output y [T, H]: each pair's d_t = dL/dy_t projected on its expert's
    down-projection columns, d_t . W_down_j[:, n] (``[P, I]``, one grouped matmul), squared and summed per expert."""
    def hook(grad: torch.Tensor) -> None:
        layer = capture.layer
        d_sorted = grad.reshape(-1, grad.shape[-1])[tokens]
        with torch.no_grad():
            down, transposed = down_projection(layer.experts, layer.layout)
            projected = grouped_linear(d_sorted, down, offsets, transposed=not transposed)
            capture.stats.add_output_gradients(set_index, expert_ids, projected, keep)
    return hook


def _all_expert_outputs(capture: LayerCapture, x: torch.Tensor, valid: torch.Tensor) -> None:
    """Every expert run on every token of the batch (ungated, unscaled input), summed per expert: HC-SMoE's
    expert representation. One grouped call per expert (the other experts get empty groups)."""
    layer = capture.layer
    num_tokens, num_experts = x.shape[0], layer.num_experts
    for expert in range(num_experts):
        ids = torch.full((num_tokens,), expert, dtype=torch.long, device=x.device)
        offsets = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
        offsets[expert:] = num_tokens
        out, _ = expert_outputs(layer.experts, layer.layout, x, ids, offsets)
        capture.stats.add_all_expert_outputs(capture.state.set_index, expert, out, valid)


def _decorated_capture(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """The registered experts implementation: captures where a capture is attached, else plain grouped_mm."""
    capture: LayerCapture | None = experts.__dict__.get("_moekit_capture")
    if capture is None:
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, hidden, top_k_index, top_k_weights)
    return capture_forward(capture, hidden, top_k_index, top_k_weights)


ExpertsInterface.register(CAPTURE_IMPLEMENTATION, _decorated_capture)


def _is_decorated(layer: MoELayer) -> bool:
    """Experts built by ``use_experts_implementation`` (they carry its flags and a config)."""
    return hasattr(layer.experts, "has_gate") and hasattr(layer.experts, "config")


def _llama4_block_forward(block: nn.Module, capture: LayerCapture) -> Any:
    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden_states.reshape(-1, block.hidden_dim)
        scores, logits = block.router(hidden)  # scores: sigmoid of the selected logits, 0 elsewhere
        weights, index = torch.topk(scores, block.top_k, dim=-1)
        routed = capture_forward(capture, hidden, index, weights, input_gated=True)
        out = block.shared_expert(hidden)
        out.add_(routed)
        return out, logits
    return forward


def _dbrx_experts_forward(capture: LayerCapture) -> Any:
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        routed = capture_forward(capture, hidden_states, top_k_index, top_k_weights)
        return routed.view(hidden_states.shape[0], -1, routed.shape[-1])
    return forward


class Capture:
    """Every layer's capture and the shared per-batch state, while :func:`capturing` is active."""

    def __init__(self, view: MoEModelView, num_sets: int, neuron_stats: bool, merge_stats: bool = False,
                 gradients: bool = False, input_norms: bool = False) -> None:
        self.view = view
        self.state = CaptureState()
        self.layers = {layer.index: LayerCapture(layer, self.state, num_sets, neuron_stats, merge_stats, gradients,
                                                 input_norms) for layer in view.layers}

    def all_reduce_(self, device: torch.device | None = None, group: object | None = None) -> None:
        """Sum (and max) every accumulator over the ranks of a ``torch.distributed`` group (on ``device``, default:
        each layer's router's; a layer-by-layer run has freed its layers)."""
        for capture in self.layers.values():
            capture.stats.all_reduce_(device or capture.layer.router_weight.device, group)

    def results(self) -> dict[int, dict[str, torch.Tensor]]:
        return {index: capture.stats.result() for index, capture in self.layers.items()}


def _residual_norms(model: nn.Module, layer: MoELayer) -> list[nn.Module]:
    decoder_layer = model.get_submodule(layer.path.rpartition(".")[0])
    found = []
    for name, module in decoder_layer.named_modules():
        if name.rsplit(".", 1)[-1] in RESIDUAL_NORM_NAMES and not name.startswith(layer.path.rsplit(".", 1)[-1]):
            found.append(module)
    return found


@contextmanager
def capturing(view: MoEModelView, num_sets: int = 1, neuron_stats: bool = False,
              merge_stats: bool = False, gradients: bool = False, input_norms: bool = False) -> Iterator[Capture]:
    """Attach the capture to every MoE layer of ``view.model``; everything is undone on exit. ``gradients``: the
    routed outputs also get a backward hook (HEAPr's statistic; the caller runs the backward pass). ``input_norms``:
    Wanda's per-expert input norms too."""
    model = view.model
    if gradients:
        normed = [layer.path for layer in view.layers if getattr(layer.experts, "has_post_expert_norm", False)]
        if normed:
            raise RuntimeError(f"--gradients: the experts of {normed[0]} normalise their output after the down "
                               "projection, so a neuron's contribution is not along its down-projection column; "
                               "HEAPr's output-space statistic is not defined for them")
    capture = Capture(view, num_sets, neuron_stats, merge_stats, gradients, input_norms)
    handles: list[Any] = []
    instance_patches: list[tuple[nn.Module, str]] = []
    previous_implementation = None
    try:
        for layer in view.layers:
            layer_capture = capture.layers[layer.index]
            handles.append(layer.router.register_forward_pre_hook(layer_capture.on_router_input, with_kwargs=True))
            for norm in _residual_norms(model, layer):
                handles.append(norm.register_forward_hook(layer_capture.on_norm))
            shared = layer.shared_mlp
            if shared is not None and layer_capture.neuron_stats:  # the shared experts' own neurons
                handles.append(shared[1].down_proj.register_forward_pre_hook(layer_capture.on_shared_down_input))
                if gradients:
                    handles.append(shared[1].down_proj.register_forward_hook(layer_capture.on_shared_output))
            if layer.call.kind == "llama4":
                layer.block.forward = _llama4_block_forward(layer.block, layer_capture)
                instance_patches.append((layer.block, "forward"))
            elif isinstance(layer.layout, DbrxLayout):
                layer.experts.forward = _dbrx_experts_forward(layer_capture)
                instance_patches.append((layer.experts, "forward"))
            elif _is_decorated(layer):
                layer.experts._moekit_capture = layer_capture
                instance_patches.append((layer.experts, "_moekit_capture"))
            else:
                raise RuntimeError(f"moekit cannot capture the experts of {type(layer.experts).__name__}")
        decorated = [layer for layer in view.layers if _is_decorated(layer)]
        if decorated:
            previous_implementation = model.config._experts_implementation
            model.set_experts_implementation(CAPTURE_IMPLEMENTATION)
            stale = [layer.path for layer in decorated
                     if layer.experts.config._experts_implementation != CAPTURE_IMPLEMENTATION]
            if stale:
                raise RuntimeError(f"could not switch the experts implementation of {stale} to moekit's capture")
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        for module, attr in instance_patches:
            module.__dict__.pop(attr, None)
        if previous_implementation is not None:
            model.set_experts_implementation(previous_implementation)
