"""The streaming checkpoint editor: prune experts from a local safetensors checkpoint tensor by tensor.

No model is built with weights and ``from_pretrained`` is never called. The structure comes from the
model built on the meta device (``moekit.model_io.load_structure``) and the one view over it
(``MoEModelView``): which layers are MoE, where their experts, router, correction bias and shared
experts live, how many experts there are. Each on-disk tensor name is mapped to the in-memory name it
loads into by transformers' own conversion mapping (``get_model_conversion_mapping``: the renamings
and converters ``from_pretrained`` applies, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp`` and
``experts.{j}.w1`` -> ``experts.gate_up_proj``), so no second per-family table exists here. Then:

- a per-expert tensor (a converter merges ``experts.*`` tensors into the stacked parameter) of a kept
  expert is copied byte for byte, renamed to its new id (0..K-1 in kept order); others are dropped;
- a stacked tensor of the experts module is sliced along its expert rows (``ExpertLayout.expert_rows``:
  1 row per expert for ``[E, ...]``, ``F`` rows for DBRX's ``[E*F, H]``);
- the router's weight and bias rows and the correction bias's last dim are sliced;
- FP8 block scales (``<weight>_scale_inv``, DeepSeek-V3 format) follow their weight, never dequantised;
- every other tensor is copied unchanged.

A tensor inside an MoE block that none of these rules covers is an error naming it, never copied
unsliced. Output shards are written with the hand-written writer of ``moekit.edit.safetensors_io``,
so peak memory is one copy buffer, not a tensor or a shard.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from moekit.arch.experts import replace_tensor
from moekit.arch.view import MoELayer, MoEModelView
from moekit.edit.keep import KeepMap
from moekit.edit.safetensors_io import OutputTensor, Piece, TensorInfo, merge_pieces, read_header
from moekit.model_io import ModelLoadError, check_weight_files

log = logging.getLogger("moekit")

SCALE_SUFFIXES = ("_scale_inv",)  # FP8 block scales stored beside their weight (DeepSeek-V3 format)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_MAX_SHARD = 50 * 10**9  # transformers 5's save_pretrained default
_EXPERT_SEGMENT = re.compile(r"(?:^|\.)experts\.")
_NATURAL = re.compile(r"(\d+)")
ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")


class UnclassifiedTensorError(ModelLoadError):
    """An on-disk tensor of an MoE layer that moekit cannot tell how to prune."""


def natural_key(name: str) -> list[object]:
    """``layers.2`` before ``layers.10``: tensors in the order of the model."""
    return [int(p) if p.isdigit() else p for p in _NATURAL.split(name)]


def safetensors_files(source: str | Path) -> list[Path] | None:
    """The safetensors files of a local checkpoint (the index's shards, or ``model.safetensors``); None for
    a hub id. A local checkpoint stored only as pickle (``.bin``/``.pt``) is refused: moekit does not unpickle
    weights, which can run code."""
    path = Path(source)
    if not path.is_dir():
        return None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        check_weight_files(path)
        return sorted({path / str(v) for v in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(f"{path} holds its weights as pickle files ({', '.join(pickles[:3])}); moekit edits "
                             "safetensors checkpoints only (unpickling can run code). Convert it to safetensors "
                             "first, e.g. load it once with transformers and save_pretrained(safe_serialization=True)")
    raise ModelLoadError(f"cannot load the weights of {path}: it has no model.safetensors or "
                         "model.safetensors.index.json")


def read_source(files: list[Path], source: str | Path) -> list[TensorInfo]:
    """Every tensor of the source's shards, checked: headers readable and within their files, each name once,
    every name of the index present in the shard the index names."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in read_header(file):
            if info.name in tensors:
                raise ModelLoadError(f"cannot load the weights of {source}: tensor {info.name!r} is stored twice "
                                     f"({tensors[info.name].path.name} and {file.name})")
            tensors[info.name] = info
    index = Path(source) / "model.safetensors.index.json"
    if index.is_file():
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            if name not in tensors or tensors[name].path.name != Path(shard).name:
                raise ModelLoadError(f"cannot load the weights of {source}: the index puts {name!r} in {shard}, "
                                     "which does not hold it; the checkpoint is incomplete")
    return sorted(tensors.values(), key=lambda t: natural_key(t.name))


@dataclass(frozen=True)
class Role:
    """What an on-disk tensor is, for pruning. ``kind``: copy, drop, expert (one expert's own tensor, its id
    at ``span`` in the name), stacked (rows of every expert, ``rows`` each), router (rows), correction (last
    dim)."""

    kind: str
    target: str | None = None  # the in-memory name it loads into (None: the model does not use it)
    layer: MoELayer | None = None
    expert: int | None = None
    span: tuple[int, int] | None = None
    rows: int = 1
    scale: bool = False  # an FP8 scale following the weight ``target``
    converted: bool = False  # a transformers converter (not a plain renaming) maps it: shapes differ


def _apply_renamings(name: str, renamings: list[WeightRenaming]) -> str:
    """``name`` after every renaming in turn, as from_pretrained renames before converting (transformers 5.24's
    ``apply_renamings``, written here because 5.17 lacks it)."""
    for renaming in renamings:
        name, _ = renaming.rename_source_key(name)
    return name


class NameMap:
    """On-disk tensor names -> roles, from the meta model's structure and transformers' conversion mapping."""

    def __init__(self, view: MoEModelView) -> None:
        model = view.model
        conversions = get_model_conversion_mapping(model)  # what from_pretrained applies to this model
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self.prefix = model.base_model_prefix
        self.meta = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        self.layers = {layer.path: layer for layer in view.layers}
        self.tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        self.ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
        self.optional = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]

    def rename(self, name: str) -> tuple[str, WeightConverter | None, str | None]:
        """(in-memory name, the converter that matched, its source pattern), as from_pretrained renames."""
        target, pattern = rename_source_key(name, self.renamings, self.converters, self.prefix, self.meta)
        converter = next((c for c in self.converters if pattern in c.source_patterns), None) if pattern else None
        return target, converter, pattern

    def targets(self, name: str) -> list[str]:
        """Every in-memory name ``name`` feeds (a one-to-many converter feeds several)."""
        target, converter, _ = self.rename(name)
        if converter is None or len(converter.target_patterns) == 1:
            return [target]
        first = converter.target_patterns[0]
        return [target.replace(first, other) for other in converter.target_patterns]

    def _layer_of(self, target: str) -> tuple[MoELayer | None, str]:
        path = target
        while "." in path:
            path = path.rpartition(".")[0]
            if path in self.layers:
                return self.layers[path], target[len(path) + 1:]
        return None, target

    def _expert_id(self, name: str, pattern: str, error: str) -> tuple[int, tuple[int, int]]:
        """The expert id a per-expert name holds where its converter's pattern has ``*``, and its position."""
        renamed = _apply_renamings(name, self.renamings)
        regex = r"(\d+)".join(re.escape(part) for part in pattern.split("*"))
        matches = list(re.finditer(regex, renamed))
        if not matches or pattern.count("*") != 1:
            raise UnclassifiedTensorError(f"{error}: cannot tell which expert it belongs to (pattern {pattern!r})")
        match = matches[-1]
        expert, tail = match.group(1), renamed[match.end(1):]
        end = len(name) - len(tail)
        if not name.endswith(expert + tail) or not name[: end - len(expert)].endswith("."):
            raise UnclassifiedTensorError(f"{error}: cannot find its expert id {expert} in the stored name")
        return int(expert), (end - len(expert), end)

    def role(self, name: str) -> Role:
        base, scale = name, False
        for suffix in SCALE_SUFFIXES:
            if name.endswith(suffix):
                base, scale = name[: -len(suffix)], True
        target, converter, pattern = self.rename(base)
        layer, rel = self._layer_of(target)
        error = f"stored tensor {name!r} (loaded as {target!r})"
        if layer is None:
            if target in self.meta:
                return Role("copy", target, scale=scale, converted=converter is not None)
            if any(p.search(name) or p.search(target) for p in self.ignored):
                return Role("drop", target)
            if _EXPERT_SEGMENT.search(target):
                raise UnclassifiedTensorError(f"{error} looks like an expert tensor but lies in none of the model's "
                                              f"MoE layers ({', '.join(self.layers)}); moekit will not copy it "
                                              "unpruned")
            return Role("copy", None, scale=scale)
        error += f" in MoE layer {layer.index}"
        experts = layer.experts_name + "."
        if rel.startswith(experts):
            if pattern is not None and "*" in pattern:
                expert, span = self._expert_id(base, pattern, error)
                if not 0 <= expert < layer.num_experts:
                    raise UnclassifiedTensorError(f"{error} is expert {expert}, but the layer has "
                                                  f"{layer.num_experts} experts (ids 0..{layer.num_experts - 1})")
                return Role("expert", target, layer, expert, span, scale=scale, converted=True)
            rows = layer.layout.expert_rows(layer.experts, rel[len(experts):])
            if rows is not None and converter is None:
                return Role("stacked", target, layer, rows=rows, scale=scale)
        elif not scale and rel in (layer.router_weight_name, layer.router_bias_name) and converter is None:
            return Role("router", target, layer)
        elif not scale and rel == layer.correction_bias_name and converter is None:
            return Role("correction", target, layer)
        elif not rel.startswith(layer.router_name + "."):
            if any(target.startswith(path + ".") for path in layer.shared) or target in self.meta:
                return Role("copy", target, scale=scale, converted=converter is not None)
        raise UnclassifiedTensorError(f"{error}: moekit does not know how to prune it (it is not a per-expert or "
                                      "stacked expert tensor, the router's weight or bias, the correction bias, a "
                                      "shared expert or another known tensor of the block)")


def _mismatch(source: str | Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load {source}: {what}. The checkpoint is incomplete or its config does not match "
                          "its weights")


def _slice_rows(info: TensorInfo, keep: list[int], count: int, rows: int, error: str) -> OutputTensor:
    """Rows ``[e*rows, (e+1)*rows)`` of every kept expert ``e``, in kept order."""
    if not info.shape or info.shape[0] != count * rows:
        raise UnclassifiedTensorError(f"{error} has shape {list(info.shape)}; expected {count * rows} leading rows "
                                      f"({count} experts x {rows})")
    row = info.nbytes // info.shape[0]
    pieces = [Piece(info.path, info.begin + e * rows * row, rows * row) for e in keep]
    return OutputTensor(info.name, info.dtype, (len(keep) * rows, *info.shape[1:]), merge_pieces(pieces))


def _slice_last(info: TensorInfo, keep: list[int], count: int, error: str) -> OutputTensor:
    """The kept experts' entries of a tensor whose last dim is the expert (``[E]``, ERNIE's ``[1, E]``)."""
    if not info.shape or info.shape[-1] != count:
        raise UnclassifiedTensorError(f"{error} has shape {list(info.shape)}; expected the last dim {count}")
    numel = info.numel
    item = info.nbytes // max(numel, 1)
    pieces = [Piece(info.path, info.begin + (lead * count + e) * item, item)
              for lead in range(numel // count) for e in keep]
    return OutputTensor(info.name, info.dtype, (*info.shape[:-1], len(keep)), merge_pieces(pieces))


def plan_tensors(view: MoEModelView, keep: KeepMap, tensors: list[TensorInfo],
                 source: str | Path) -> list[OutputTensor]:
    """The output tensors of pruning ``tensors`` (the source's) to ``keep``, each as source byte ranges.

    Also checks the checkpoint against the structure, as ``from_pretrained`` would: stored shapes equal the
    config's, every weight the model needs is present."""
    names = NameMap(view)
    out: list[OutputTensor] = []
    covered: set[str] = set()
    merged_numel: dict[str, int] = {}
    dropped: list[str] = []
    unused: list[str] = []
    for info in tensors:
        role = names.role(info.name)
        error = f"stored tensor {info.name!r}"
        if role.target is not None and not role.scale:
            covered.update(names.targets(info.name))
        if role.kind != "drop" and role.target is not None and not role.scale:
            if role.converted and role.kind == "expert":
                merged_numel[role.target] = merged_numel.get(role.target, 0) + info.numel
            elif not role.converted and names.meta.get(role.target) not in (None, info.shape):
                raise _mismatch(source, f"{info.name} has shape {list(info.shape)} but the config gives "
                                        f"{list(names.meta[role.target])}")
        if role.kind == "drop":
            dropped.append(info.name)
        elif role.kind == "copy":
            if role.target is None:
                unused.append(info.name)
            out.append(OutputTensor(info.name, info.dtype, info.shape, [Piece(info.path, info.begin, info.nbytes)]))
        elif role.kind == "expert":
            assert role.layer is not None and role.span is not None and role.expert is not None
            kept = keep[role.layer.index]
            if role.expert in kept:
                start, end = role.span
                new = info.name[:start] + str(kept.index(role.expert)) + info.name[end:]
                out.append(OutputTensor(new, info.dtype, info.shape, [Piece(info.path, info.begin, info.nbytes)]))
        else:
            assert role.layer is not None
            kept, count = keep[role.layer.index], role.layer.num_experts
            if role.kind == "correction":
                out.append(_slice_last(info, kept, count, error))
            else:
                out.append(_slice_rows(info, kept, count, role.rows, error))
    for target, numel in merged_numel.items():
        expected = math.prod(names.meta.get(target, ()))
        if target in names.meta and numel != expected:
            raise _mismatch(source, f"the stored per-expert tensors of {target} hold {numel} values but the config "
                                    f"gives {list(names.meta[target])} ({expected})")
    missing = sorted(k for k in names.meta if k not in covered and k not in names.tied
                     and not any(p.search(k) for p in names.optional))
    if missing:
        raise _mismatch(source, f"{len(missing)} weight(s) the config needs are missing from the checkpoint "
                                f"(e.g. {', '.join(missing[:3])})")
    if dropped:
        log.warning("not written (transformers ignores them on load, and their experts are not pruned): %d tensors, "
                    "e.g. %s", len(dropped), ", ".join(dropped[:3]))
    if unused:
        log.warning("copied unchanged, though transformers does not load them: %s", ", ".join(unused[:5]))
    return sorted(out, key=lambda t: natural_key(t.name))


def load_router_tensors(view: MoEModelView, tensors: list[TensorInfo]) -> None:
    """Fill the meta model's router weights, biases and correction biases from disk (a few ``[E, H]`` tensors),
    so that the view can probe the routing of a family not in moekit's table as it does on a loaded model."""
    names = NameMap(view)
    for info in tensors:
        role = names.role(info.name)
        if role.kind not in ("router", "correction") or role.layer is None or role.target is None:
            continue
        with safe_open(str(info.path), "pt") as handle:
            tensor = handle.get_tensor(info.name)
        owner, _, attr = role.target.rpartition(".")
        replace_tensor(view.model.get_submodule(owner), attr, tensor)


def stored_dtype(tensors: list[TensorInfo]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor stored (what ``from_pretrained`` uses without a config dtype)."""
    reverse = {v: k for k, v in ST_DTYPES.items()}
    for info in tensors:
        if info.dtype in reverse:
            return getattr(torch, reverse[info.dtype])
    return None


def needs_cast(tensors: list[TensorInfo], dtype: str | torch.dtype) -> bool:
    """Whether saving in ``dtype`` changes a stored floating-point tensor (the streaming editor copies bytes)."""
    if dtype == "auto":
        return False
    name = str(dtype).removeprefix("torch.")
    wanted = ST_DTYPES.get(name)
    return any(info.dtype in FLOAT_DTYPES and info.dtype != wanted for info in tensors)


def default_shard_size(files: list[Path]) -> int:
    """The source's largest shard (so the output is sharded like it), at most transformers' default."""
    return min(max(f.stat().st_size for f in files), DEFAULT_MAX_SHARD)
