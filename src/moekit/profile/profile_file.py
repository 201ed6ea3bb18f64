"""The Profile: accumulators per MoE layer and named set, saved as safetensors + JSON metadata.

A profile directory holds ``statistics.safetensors`` (tensors ``layers.{i}.{stat}``, leading dim =
named set) and ``profile.json`` (model fingerprint, sets with token counts and data description,
options, versions). It is written into a temporary directory renamed on success, and
``profile.json`` is written last, so an interrupted run leaves nothing that loads as a profile.

Profiles of disjoint data merge by addition (``merge_profiles``): sums add, maxima take the max,
sets with the same name combine, other sets are kept side by side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moekit.arch.view import MoEModelView
from moekit.errors import UserError
from moekit.outputs import check_output, writing_directory
from moekit.profile.stats import CHUNK_SIZES, NEURON_STATS, STATS, reduction

FORMAT = "moekit-profile"
FORMAT_VERSION = 1
META_FILE = "profile.json"
TENSOR_FILE = "statistics.safetensors"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_router_logits"}


class ProfileError(UserError):
    """A profile cannot be read, merged or used with this model."""


def config_sha256(config: Any) -> str:
    """Hash of the architecture-defining config (names, dtype and runtime switches left out)."""
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(view: MoEModelView) -> dict[str, Any]:
    """What must match for a profile to describe a model: type, config, size and MoE shape."""
    model = view.model
    return {
        "model_type": view.model_type,
        "config_sha256": config_sha256(model.config),
        "num_parameters": sum(int(p.numel()) for p in model.parameters()),
        "moe_layers": [layer.index for layer in view.layers],
        "num_experts": [layer.num_experts for layer in view.layers],
        "top_k": view.top_k,
    }


@dataclass
class Profile:
    """Accumulators (``layers[i][stat]``, leading dim = set) and metadata."""

    meta: dict[str, Any]
    layers: dict[int, dict[str, torch.Tensor]]

    @property
    def set_names(self) -> list[str]:
        return [s["name"] for s in self.meta["sets"]]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.meta["model"]["fingerprint"])

    @property
    def has_neuron_stats(self) -> bool:
        return bool(self.meta["options"]["neuron_stats"])

    def set_index(self, name: str) -> int:
        if name not in self.set_names:
            raise ProfileError(f"no calibration set {name!r} in this profile; its sets: {', '.join(self.set_names)}")
        return self.set_names.index(name)

    def stat(self, layer: int, name: str, sets: str | list[str] | None = None) -> torch.Tensor:
        """One statistic of one layer, combined over ``sets`` (all sets by default)."""
        if layer not in self.layers:
            raise ProfileError(f"layer {layer} is not an MoE layer of this profile; layers: {sorted(self.layers)}")
        if name not in self.layers[layer]:
            raise ProfileError(f"this profile has no statistic {name!r}"
                               + (" (profile with --neuron-stats)" if name in NEURON_STATS else ""))
        tensor = self.layers[layer][name]
        chosen = self.set_names if sets is None else [sets] if isinstance(sets, str) else sets
        picked = tensor[[self.set_index(s) for s in chosen]]
        return picked.sum(0) if reduction(name) == "sum" else picked.amax(0)

    def check_model(self, view: MoEModelView) -> None:
        """Raise a clear error if this profile was not collected on ``view``'s model."""
        mine, theirs = self.fingerprint, model_fingerprint(view)
        differ = [key for key in mine if mine[key] != theirs.get(key)]
        if differ:
            details = "; ".join(f"{k}: profile {mine[k]!r} vs model {theirs.get(k)!r}" for k in differ
                                if k != "config_sha256") or "the configs differ"
            raise ProfileError(f"the profile was collected on another model ({self.meta['model'].get('source')}): "
                               f"{details}. Profile this model first (moekit profile MODEL --data ...)")

    def save(self, out: str | Path, overwrite: bool = False, sources: Sequence[str | Path | None] = (),
             inputs: Sequence[str | Path | None] = ()) -> Path:
        """Write the profile to the directory ``out`` atomically (``moekit.outputs``: never over a source or
        an input, an existing directory only with ``overwrite`` and only if it holds a moekit profile)."""
        path = check_output(out, kind="profile", overwrite=overwrite, sources=sources, inputs=inputs)
        tensors = {f"layers.{i}.{name}": t.contiguous() for i, stats in self.layers.items()
                   for name, t in stats.items()}
        with writing_directory(path, "profile") as tmp:
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_dir():
            raise ProfileError(f"{path} is not a profile directory (moekit profile writes one)")
        meta_path, tensor_path = path / META_FILE, path / TENSOR_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ProfileError(f"{path} is not a complete profile: it needs {META_FILE} and {TENSOR_FILE} "
                               "(an interrupted run leaves neither; profile again)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ProfileError(f"{meta_path} is corrupted: {err}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ProfileError(f"{meta_path} is not a moekit profile")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ProfileError(f"{path} has profile format version {meta.get('format_version')}; this moekit "
                               f"reads version {FORMAT_VERSION}")
        try:
            flat = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ProfileError(f"{tensor_path} is corrupted: {err}") from None
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            _, index, name = key.split(".", 2)
            layers.setdefault(int(index), {})[name] = tensor
        profile = cls(meta, layers)
        profile._validate(path)
        return profile

    def _validate(self, where: Path | str) -> None:
        expected = set(STATS) | (set(NEURON_STATS) if self.has_neuron_stats else set())
        fingerprint = self.fingerprint
        if sorted(self.layers) != fingerprint["moe_layers"]:
            raise ProfileError(f"{where}: layers {sorted(self.layers)} do not match the metadata's "
                               f"{fingerprint['moe_layers']} (corrupted profile)")
        for index, experts in zip(fingerprint["moe_layers"], fingerprint["num_experts"], strict=True):
            stats = self.layers[index]
            if set(stats) != expected:
                raise ProfileError(f"{where}: layer {index} has statistics {sorted(stats)}, expected "
                                   f"{sorted(expected)} (corrupted profile)")
            for name, tensor in stats.items():
                dims = {**STATS, **NEURON_STATS}[name][0]
                sizes = {"E": experts, "C": len(CHUNK_SIZES), "I": tensor.shape[-1]}
                if tuple(tensor.shape) != (len(self.set_names), *(sizes[d] for d in dims)):
                    raise ProfileError(f"{where}: layers.{index}.{name} has shape {tuple(tensor.shape)} "
                                       "(corrupted profile)")


def _combine(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b if reduction(name) == "sum" else torch.maximum(a, b)


def merge_profiles(first: Profile, second: Profile) -> Profile:
    """The profile of the union of two profiles' data (which must be disjoint to mean anything)."""
    if first.fingerprint != second.fingerprint:
        raise ProfileError("these profiles were collected on different models; only profiles of the same model "
                           "merge")
    if first.has_neuron_stats != second.has_neuron_stats:
        raise ProfileError("one profile has neuron statistics and the other not; profile both the same way")
    names = first.set_names + [n for n in second.set_names if n not in first.set_names]
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for index, stats in first.layers.items():
        layers[index] = {}
        for name, tensor in stats.items():
            other = second.layers[index][name]
            rows = []
            for set_name in names:
                a = tensor[first.set_index(set_name)] if set_name in first.set_names else None
                b = other[second.set_index(set_name)] if set_name in second.set_names else None
                rows.append(_combine(name, a, b) if a is not None and b is not None else a if a is not None else b)
            layers[index][name] = torch.stack(rows)
    sets = []
    for set_name in names:
        parts = [p.meta["sets"][p.set_index(set_name)] for p in (first, second) if set_name in p.set_names]
        sets.append({"name": set_name, "tokens": sum(p["tokens"] for p in parts),
                     "sequences": sum(p["sequences"] for p in parts),
                     "data": [d for p in parts for d in (p["data"] if isinstance(p["data"], list) else [p["data"]])]})
    meta = json.loads(json.dumps(first.meta))
    meta["sets"] = sets
    meta["merged_from"] = [_summary(first), _summary(second)]
    return Profile(meta, layers)


def _summary(profile: Profile) -> dict[str, Any]:
    return {"sets": profile.set_names, "tokens": [s["tokens"] for s in profile.meta["sets"]],
            "versions": profile.meta.get("versions"), "options": profile.meta.get("options")}


def new_meta(view: MoEModelView, source: str, sets: list[dict[str, Any]], options: dict[str, Any],
             versions: dict[str, str], easy_ep_input: dict[int, str]) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"source": source, "fingerprint": model_fingerprint(view)},
        "sets": sets,
        "options": {**options, "chunk_sizes": list(CHUNK_SIZES)},
        "easy_ep_input": {str(k): v for k, v in easy_ep_input.items()},
        "versions": versions,
    }
