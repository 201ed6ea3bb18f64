"""Per-expert access to expert weights, whatever the storage layout.

Layouts (``EXPERT_LAYOUTS``):

- ``stacked``: the transformers 5 experts class decorated with ``use_experts_implementation``
  (and Llama-4's undecorated ``Llama4TextExperts``, which stores the same way). Tensors have the
  expert index as dim 0: ``gate_up_proj [E, 2I, H]`` (or ``[E, H, 2I]`` when transposed), gate and
  up either concatenated (rows ``[:I]`` / ``[I:]``) or interleaved (even / odd, GPT-OSS);
  ``down_proj [E, H, I]`` (``[E, I, H]`` transposed); optional biases; ``up_proj`` alone when the
  experts have no gate. Any other tensor of the module with leading dim E (FP8 ``*_scale_inv``)
  is per-expert too and is sliced with the rest.
- ``dbrx``: DBRX's ``mlp.w1`` (gate), ``mlp.v1`` (up), ``mlp.w2`` (down, transposed), each 2-D
  ``[E*F, H]``.

Canonical per-expert weights (``ExpertWeights``): gate ``[I, H]``, up ``[I, H]``, down ``[H, I]``,
so that ``f(x) = down @ (act(gate @ x + b_g) * (up @ x + b_u)) + b_d`` for standard SwiGLU experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.registry import Registry


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor | None  # [I, H]; None when the experts have no gate projection
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]


class ExpertLayout:
    """How one experts module stores its E experts."""

    name = "abstract"

    def num_experts(self, experts: nn.Module) -> int:
        raise NotImplementedError

    def intermediate_size(self, experts: nn.Module) -> int:
        raise NotImplementedError

    def expert_weights(self, experts: nn.Module, expert: int) -> ExpertWeights:
        raise NotImplementedError

    def keep_experts(self, experts: nn.Module, keep: torch.Tensor) -> None:
        """Keep only the experts listed in ``keep`` (long ``[E']``), in that order, in place."""
        raise NotImplementedError

    def keep_neurons(self, experts: nn.Module, keep: torch.Tensor) -> None:
        """Keep only neurons ``keep[e]`` (long ``[E, I']``, the same count I' for every expert) of each expert e, in
        that order, in place: gate and up rows and down columns (and their biases) together, so expert e then
        computes exactly what it computed with the other neurons' activations set to 0."""
        raise NotImplementedError

    def expert_rows(self, experts: nn.Module, name: str) -> int | None:
        """How many leading rows of the experts module's tensor ``name`` (a parameter or buffer path relative
        to the module) each expert owns, expert ``e`` owning rows ``[e*r, (e+1)*r)``; None if the tensor is not
        per-expert. The one statement of which stored tensors follow their expert: in-memory pruning
        (``keep_experts``) and the streaming editor (``moekit.edit.stream``) both slice by it."""
        raise NotImplementedError

    def describe(self, experts: nn.Module) -> str:
        return self.name


EXPERT_LAYOUTS: Registry[ExpertLayout] = Registry("expert layout")


def replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter or buffer of ``module`` for ``value`` (a new shape is fine)."""
    if name in module._parameters:
        old = module._parameters[name]
        assert old is not None
        module._parameters[name] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value.contiguous()
    else:
        raise AttributeError(f"{type(module).__name__}.{name} is neither a parameter nor a buffer")


COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")


INTERMEDIATE_ATTRIBUTES = ("intermediate_dim", "intermediate_size", "expert_dim", "ffn_hidden_size")


def set_intermediate_attributes(module: nn.Module, old: int, new: int) -> None:
    """Set every integer expert-width attribute of an experts module that held the old width."""
    for attr in INTERMEDIATE_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value == old:
            setattr(module, attr, new)


SHARED_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def shared_mlp_weights(mlp: nn.Module) -> ExpertWeights:
    """A shared-expert MLP (``gate_proj``, ``up_proj``, ``down_proj`` linear layers, ``MoELayer.shared_mlp``) as one
    expert's weights, canonical shapes (views into the module)."""
    gate, up, down = (getattr(mlp, name) for name in SHARED_MLP_PROJECTIONS)
    return ExpertWeights(gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias)


def keep_shared_neurons(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep only neurons ``keep`` (long ``[J']``, ascending) of a shared-expert MLP, in place: rows of its gate and
    up projections (and their biases), columns of its down projection; it then computes exactly what it computed
    with the other neurons' activations set to 0. Refused for quantized layers (scales that span neurons)."""
    for name in SHARED_MLP_PROJECTIONS:
        tensors = set(dict(getattr(mlp, name).named_parameters()) | dict(getattr(mlp, name).named_buffers()))
        if tensors - {"weight", "bias"}:
            raise ValueError(f"the shared experts' {name} also stores {sorted(tensors - {'weight', 'bias'})} "
                             "(quantization scales?): their blocks span neurons, so neurons cannot be removed; "
                             "dequantize first")
    gate, up, down = (getattr(mlp, name) for name in SHARED_MLP_PROJECTIONS)
    old = int(down.in_features)
    for linear in (gate, up):
        index = keep.long().to(linear.weight.device)
        replace_tensor(linear, "weight", linear.weight.detach()[index])
        if linear.bias is not None:
            replace_tensor(linear, "bias", linear.bias.detach()[index])
        linear.out_features = int(keep.numel())
    replace_tensor(down, "weight", down.weight.detach()[:, keep.long().to(down.weight.device)])
    down.in_features = int(keep.numel())
    set_intermediate_attributes(mlp, old, int(keep.numel()))


def take_along(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor [E, ...]`` with, for every expert e, only the positions ``index[e]`` (``[E, n]``) of dim ``dim``."""
    shape = [1] * tensor.dim()
    shape[0], shape[dim] = index.shape
    expanded = list(tensor.shape)
    expanded[dim] = index.shape[1]
    return tensor.gather(dim, index.to(tensor.device).view(shape).expand(expanded))


def set_count_attributes(module: nn.Module, num_experts: int) -> None:
    """Set every integer expert-count attribute a module keeps (its forward reads them)."""
    for attr in COUNT_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(module, attr, num_experts)


@dataclass(frozen=True)
class StackedLayout(ExpertLayout):
    """Experts stacked on dim 0; flags as in ``use_experts_implementation``."""

    has_gate: bool = True
    is_transposed: bool = False
    is_concatenated: bool = True
    has_bias: bool = False
    name: str = "stacked"  # type: ignore[misc]

    @classmethod
    def from_module(cls, experts: nn.Module) -> StackedLayout:
        return cls(has_gate=bool(experts.has_gate), is_transposed=bool(experts.is_transposed),
                   is_concatenated=bool(experts.is_concatenated), has_bias=bool(experts.has_bias))

    def _first(self, experts: nn.Module) -> torch.Tensor:
        return experts.gate_up_proj if self.has_gate else experts.up_proj

    def num_experts(self, experts: nn.Module) -> int:
        return int(self._first(experts).shape[0])

    def intermediate_size(self, experts: nn.Module) -> int:
        down = experts.down_proj
        return int(down.shape[1] if self.is_transposed else down.shape[2])

    def _split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a gate/up tensor along its last dim (already oriented [.., 2I])."""
        if self.is_concatenated:
            gate, up = fused.chunk(2, dim=-1)
            return gate, up
        return fused[..., ::2], fused[..., 1::2]

    def expert_weights(self, experts: nn.Module, expert: int) -> ExpertWeights:
        first = self._first(experts)[expert]
        first = first if self.is_transposed else first.T  # [H, 2I] or [H, I]
        down = experts.down_proj[expert]
        down = down.T if self.is_transposed else down  # [H, I]
        if self.has_gate:
            gate, up = self._split(first)
            gate, up = gate.T, up.T
        else:
            gate, up = None, first.T
        gate_bias = up_bias = down_bias = None
        if self.has_bias:
            if self.has_gate:
                gate_bias, up_bias = self._split(experts.gate_up_proj_bias[expert])
            else:
                up_bias = experts.up_proj_bias[expert]
            down_bias = experts.down_proj_bias[expert]
        return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)

    def expert_rows(self, experts: nn.Module, name: str) -> int | None:
        tensor = dict(experts.named_parameters(recurse=False)).get(name)
        if tensor is None:
            tensor = dict(experts.named_buffers(recurse=False)).get(name)
        if tensor is not None and tensor.dim() >= 1 and tensor.shape[0] == self.num_experts(experts):
            return 1
        return None

    def keep_experts(self, experts: nn.Module, keep: torch.Tensor) -> None:
        tensors = list(experts.named_parameters(recurse=False)) + list(experts.named_buffers(recurse=False))
        per_expert = [(name, t) for name, t in tensors if self.expert_rows(experts, name) == 1]  # before any changes
        for name, tensor in per_expert:
            replace_tensor(experts, name, tensor.detach().index_select(0, keep.to(tensor.device)))
        set_count_attributes(experts, int(keep.numel()))

    NEURON_TENSORS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")

    def _fused_positions(self, keep: torch.Tensor, width: int) -> torch.Tensor:
        """Positions of the kept neurons' gate and up entries along a fused gate/up dim of size 2·width."""
        if self.is_concatenated:
            return torch.cat([keep, keep + width], dim=1)
        return torch.stack([2 * keep, 2 * keep + 1], dim=-1).flatten(1)

    def keep_neurons(self, experts: nn.Module, keep: torch.Tensor) -> None:
        tensors = dict(experts.named_parameters(recurse=False)) | dict(experts.named_buffers(recurse=False))
        others = [n for n in tensors if n not in self.NEURON_TENSORS and self.expert_rows(experts, n) == 1]
        if others:
            raise ValueError(f"the experts also store {others} per expert (FP8 block scales?): their blocks span "
                             "neurons, so neurons cannot be removed from quantized experts; dequantize first")
        width = self.intermediate_size(experts)
        keep = keep.long()
        fused = self._fused_positions(keep, width) if self.has_gate else keep
        first = "gate_up_proj" if self.has_gate else "up_proj"
        new = {first: take_along(tensors[first].detach(), 2 if self.is_transposed else 1, fused),
               "down_proj": take_along(tensors["down_proj"].detach(), 1 if self.is_transposed else 2, keep)}
        if self.has_bias:
            new[f"{first}_bias"] = take_along(tensors[f"{first}_bias"].detach(), 1, fused)
        for name, value in new.items():
            replace_tensor(experts, name, value)
        set_intermediate_attributes(experts, width, int(keep.shape[1]))

    def describe(self, experts: nn.Module) -> str:
        flags = ["gate+up" if self.has_gate else "up only",
                 "concatenated" if self.is_concatenated else "interleaved"]
        if self.is_transposed:
            flags.append("transposed")
        if self.has_bias:
            flags.append("bias")
        return f"stacked [{', '.join(flags)}]"


EXPERT_LAYOUTS.register("stacked")(StackedLayout())


class DbrxLayout(ExpertLayout):
    """DBRX: ``mlp.w1``/``mlp.v1``/``mlp.w2`` as 2-D ``[E*F, H]``."""

    name = "dbrx"
    TENSORS = ("w1", "v1", "w2")

    def num_experts(self, experts: nn.Module) -> int:
        return int(experts.mlp.w1.shape[0] // experts.mlp.ffn_hidden_size)

    def intermediate_size(self, experts: nn.Module) -> int:
        return int(experts.mlp.ffn_hidden_size)

    def _view(self, tensor: torch.Tensor, ffn: int) -> torch.Tensor:
        return tensor.view(-1, ffn, tensor.shape[-1])

    def expert_weights(self, experts: nn.Module, expert: int) -> ExpertWeights:
        ffn = experts.mlp.ffn_hidden_size
        gate = self._view(experts.mlp.w1, ffn)[expert]
        up = self._view(experts.mlp.v1, ffn)[expert]
        down = self._view(experts.mlp.w2, ffn)[expert].T
        return ExpertWeights(gate, up, down)

    def keep_neurons(self, experts: nn.Module, keep: torch.Tensor) -> None:
        ffn = experts.mlp.ffn_hidden_size
        for name in self.TENSORS:  # w1 (gate), v1 (up) rows and w2 (down, stored transposed) rows: neuron n of e
            tensor = getattr(experts.mlp, name).detach()
            kept = take_along(self._view(tensor, ffn), 1, keep.long())
            replace_tensor(experts.mlp, name, kept.reshape(-1, tensor.shape[-1]))
        set_intermediate_attributes(experts.mlp, ffn, int(keep.shape[1]))
        set_intermediate_attributes(experts, ffn, int(keep.shape[1]))

    def expert_rows(self, experts: nn.Module, name: str) -> int | None:
        return int(experts.mlp.ffn_hidden_size) if name in {f"mlp.{t}" for t in self.TENSORS} else None

    def keep_experts(self, experts: nn.Module, keep: torch.Tensor) -> None:
        ffn = experts.mlp.ffn_hidden_size
        for name in self.TENSORS:
            tensor = getattr(experts.mlp, name).detach()
            kept = self._view(tensor, ffn).index_select(0, keep.to(tensor.device))
            replace_tensor(experts.mlp, name, kept.reshape(-1, tensor.shape[-1]))
        experts.mlp.moe_num_experts = int(keep.numel())
        set_count_attributes(experts, int(keep.numel()))


EXPERT_LAYOUTS.register("dbrx")(DbrxLayout())

# Experts classes that are not decorated but store experts the decorated way.
UNDECORATED_STACKED: dict[str, StackedLayout] = {
    "Llama4TextExperts": StackedLayout(has_gate=True, is_transposed=True, is_concatenated=True),
}
UNDECORATED_OTHER: dict[str, str] = {"DbrxExperts": "dbrx"}


def layout_of(module: nn.Module) -> ExpertLayout | None:
    """The layout of an experts module, or None if ``module`` is not an experts module."""
    if all(hasattr(module, f) for f in ("has_gate", "is_transposed", "is_concatenated", "has_bias")) and (
        hasattr(module, "gate_up_proj") or hasattr(module, "up_proj")
    ):
        return StackedLayout.from_module(module)
    name = type(module).__name__
    if name in UNDECORATED_STACKED:
        return UNDECORATED_STACKED[name]
    if name in UNDECORATED_OTHER:
        return EXPERT_LAYOUTS.get(UNDECORATED_OTHER[name])
    return None


def write_expert_weights(layout: ExpertLayout, experts: nn.Module, expert: int, new: ExpertWeights) -> None:
    """Overwrite expert ``expert``'s weights in place with ``new`` (canonical shapes, cast to the stored dtype).

    Every layout's ``expert_weights`` returns views into the stored tensors (slices, transposes, the chunks or
    strided halves of a fused gate/up tensor), so copying into them writes the layout's own storage, whatever it
    is; a layout whose view were a copy would silently drop the write, so that is checked."""
    current = layout.expert_weights(experts, expert)
    stored = [t for t in (*experts.parameters(), *experts.buffers())]
    with torch.no_grad():
        for field in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
            old, value = getattr(current, field), getattr(new, field)
            if old is None and value is None:
                continue
            if old is None or value is None or tuple(old.shape) != tuple(value.shape):
                raise ValueError(f"expert {expert}: {field} is {None if old is None else list(old.shape)} in the "
                                 f"model but {None if value is None else list(value.shape)} in the merged expert")
            if not any(old.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in stored):
                raise ValueError(f"{layout.name} layout: the {field} weights are not a view of the stored tensor")
            old.copy_(value.to(old.dtype))


def expert_parameter_count(experts: nn.Module) -> int:
    return sum(int(p.numel()) for p in experts.parameters())
