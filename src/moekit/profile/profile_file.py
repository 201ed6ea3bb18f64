"""The Profile: accumulators per MoE layer and named set, saved as safetensors + JSON metadata.

A profile directory holds ``statistics.safetensors`` (tensors ``layers.{i}.{stat}``, leading dim =
named set) and ``profile.json`` (model fingerprint, sets with token counts and data description,
options, versions). It is written into a temporary directory renamed on success, and
``profile.json`` is written last, so an interrupted run leaves nothing that loads as a profile.

Profiles of disjoint data merge by addition (``merge_profiles``): sums add, maxima take the max,
sets with the same name combine, other sets are kept side by side. Profiles whose sets were drawn
from the same data are refused (the tokens would count twice); options that differ between the
merged profiles are recorded per source, not taken from the first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moekit.arch.routing import router_scoring
from moekit.arch.view import MoEModelView
from moekit.errors import UserError
from moekit.outputs import check_output, writing_directory
from moekit.profile.stats import (
    ALL_STATS,
    CHUNK_SIZES,
    COLLECTED_BY,
    IMPLIED_BY,
    OPTIONAL_STATS,
    SIGNED_STATS,
    STATS,
    profile_flag,
    reduction,
)

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
        return self.has_option("neuron_stats")

    def has_option(self, option: str) -> bool:
        """Whether the profile was collected with the optional statistics of ``option`` (``moekit.profile.stats``:
        ``neuron_stats``, ``merge_stats``); profiles written before an option existed lack it (False)."""
        return bool(self.meta["options"].get(option, False))

    @property
    def optional_statistics(self) -> set[str]:
        return {name for option, stats in OPTIONAL_STATS.items() if self.has_option(option) for name in stats}

    def set_index(self, name: str) -> int:
        if name not in self.set_names:
            raise ProfileError(f"no calibration set {name!r} in this profile; its sets: {', '.join(self.set_names)}")
        return self.set_names.index(name)

    def stat(self, layer: int, name: str, sets: str | list[str] | None = None) -> torch.Tensor:
        """One statistic of one layer, combined over ``sets`` (all sets by default)."""
        if layer not in self.layers:
            raise ProfileError(f"layer {layer} is not an MoE layer of this profile; layers: {sorted(self.layers)}")
        if name not in self.layers[layer]:
            hint = f" (profile with {profile_flag(COLLECTED_BY[name])})" if name in COLLECTED_BY else ""
            raise ProfileError(f"this profile has no statistic {name!r}{hint}")
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
        _check_meta(meta, meta_path)
        try:
            flat = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ProfileError(f"{tensor_path} is corrupted: {err}") from None
        profile = cls(meta, _layers_of(flat, tensor_path))
        profile._validate(path)
        return profile

    def _validate(self, where: Path | str) -> None:
        """Check the statistics against the (already checked) metadata: layers, names, shapes, values.

        Every statistic is a count, a sum or a maximum of non-negative quantities (token and expert
        counts, probabilities, entropies, norms, gate weights -- softmax or sigmoid outputs, rescaled
        by positive factors --, squares and absolute values; ``moekit.profile.stats``), so each must
        be finite and >= 0; and every real token reaches every MoE layer, so each layer's ``tokens``
        equals the set's token count in the metadata."""
        where = Path(where) / TENSOR_FILE
        expected = set(STATS) | self.optional_statistics
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
                dims = ALL_STATS[name][0]
                sizes = {"E": experts, "C": len(CHUNK_SIZES), "I": tensor.shape[-1], "H": tensor.shape[-1],
                         "J": tensor.shape[-1]}
                if tuple(tensor.shape) != (len(self.set_names), *(sizes[d] for d in dims)):
                    raise ProfileError(f"{where}: layers.{index}.{name} has shape {tuple(tensor.shape)} "
                                       "(corrupted profile)")
                _check_values(f"{where}: layers.{index}.{name}", tensor, signed=name in SIGNED_STATS)
            self._check_tokens(where, index)

    def _check_tokens(self, where: Path, index: int) -> None:
        for set_meta, counted in zip(self.meta["sets"], self.layers[index]["tokens"].tolist(), strict=True):
            if counted != set_meta["tokens"]:
                raise ProfileError(f"{where}: set {set_meta['name']!r} has {set_meta['tokens']} tokens in "
                                   f"{META_FILE} but layers.{index}.tokens counts {counted:g} tokens (corrupted "
                                   "or hand-edited profile; profile again)")


def _check_values(what: str, tensor: torch.Tensor, signed: bool = False) -> None:
    if not tensor.is_floating_point():
        raise ProfileError(f"{what} has dtype {tensor.dtype}, not a floating-point one (corrupted profile; "
                           "profile again)")
    if not bool(torch.isfinite(tensor).all()):
        raise ProfileError(f"{what} holds NaN or infinite values (corrupted profile; profile again)")
    if not signed and bool((tensor < 0).any()):
        raise ProfileError(f"{what} holds negative values, which no count, sum or maximum of it can be "
                           "(corrupted profile; profile again)")


_TENSOR_NAME = re.compile(r"layers\.(\d+)\.([A-Za-z_]+)")


def _layers_of(flat: dict[str, torch.Tensor], where: Path) -> dict[int, dict[str, torch.Tensor]]:
    """``{"layers.3.count": t}`` -> ``{3: {"count": t}}``; any other name is a corrupted file."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        match = _TENSOR_NAME.fullmatch(key)
        if match is None:
            raise ProfileError(f"{where}: odd tensor name {key!r}; a profile holds only layers.<MoE layer index>."
                               "<statistic> (corrupted profile; profile again)")
        layers.setdefault(int(match[1]), {})[match[2]] = tensor
    return layers


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    """The metadata fields moekit reads, with the right types, before any of them is used."""
    def bad(problem: str) -> ProfileError:
        return ProfileError(f"{where}: {problem} (corrupted or hand-edited profile; profile again)")

    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), dict):
        raise bad("'model' must be an object with a 'fingerprint'")
    _check_fingerprint(model["fingerprint"], bad)
    sets = meta.get("sets")
    if not isinstance(sets, list) or not sets:
        raise bad("'sets' must be a non-empty list of the named calibration sets")
    for entry in sets:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise bad("every set needs a non-empty string 'name'")
        for key in ("tokens", "sequences"):
            if not _is_count(entry.get(key)):
                raise bad(f"set {entry['name']!r}: {key!r} must be an integer >= 0, got {entry.get(key)!r}")
        data = entry.get("data")
        if not isinstance(data, dict) and not (isinstance(data, list) and all(isinstance(d, dict) for d in data)):
            raise bad(f"set {entry['name']!r}: 'data' must describe the data (an object, or a list of them)")
    names = [entry["name"] for entry in sets]
    if len(set(names)) != len(names):
        raise bad(f"set names must be unique, got {names}")
    options = meta.get("options")
    if not isinstance(options, dict) or not isinstance(options.get("neuron_stats"), bool):
        raise bad("'options' must be an object with a true/false 'neuron_stats'")
    if "chunk_sizes" in options and options["chunk_sizes"] != list(CHUNK_SIZES):
        raise bad(f"chunk sizes {options['chunk_sizes']!r} differ from this moekit's {list(CHUNK_SIZES)}")


def _check_fingerprint(fingerprint: dict[str, Any], bad: Callable[[str], ProfileError]) -> None:
    layers, experts = fingerprint.get("moe_layers"), fingerprint.get("num_experts")
    if not isinstance(layers, list) or not layers or not all(_is_count(i) for i in layers) \
            or layers != sorted(set(layers)):
        raise bad(f"fingerprint 'moe_layers' must be a non-empty ascending list of layer indices, got {layers!r}")
    if not isinstance(experts, list) or len(experts) != len(layers) or not all(_is_count(e) and e > 0
                                                                               for e in experts):
        raise bad(f"fingerprint 'num_experts' must be one positive expert count per MoE layer, got {experts!r}")
    top_k = fingerprint.get("top_k")
    if not _is_count(top_k) or top_k < 1:
        raise bad(f"fingerprint 'top_k' must be a positive integer, got {top_k!r}")
    for key in ("model_type", "config_sha256"):
        if not isinstance(fingerprint.get(key), str):
            raise bad(f"fingerprint {key!r} must be a string, got {fingerprint.get(key)!r}")
    if not _is_count(fingerprint.get("num_parameters")):
        raise bad(f"fingerprint 'num_parameters' must be an integer >= 0, got {fingerprint.get('num_parameters')!r}")


def _combine(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b if reduction(name) == "sum" else torch.maximum(a, b)


def merge_profiles(first: Profile, second: Profile) -> Profile:
    """The profile of the union of two profiles' data, which must be disjoint to mean anything.

    Refused: profiles of different models; one with neuron statistics and one without; other chunk
    sizes (the chunk statistics would not add up); and a set that both profiles drew from the same
    data (``_same_draws``), which would count the same tokens twice (``profile merge A A``).

    Options: ``options`` keeps the options every source agrees on; the others (a seed, sequence
    length, token budget, dtype, tokenizer, batch size, device...) are left out of it and listed in
    ``options_differ``, and each source's own options, versions, set token counts and timing are in
    ``merged_from`` (flattened: merging a merged profile lists all its sources). ``versions`` and
    ``versions_differ`` work the same way; ``timing`` (of one run) is only kept per source.
    """
    if first.fingerprint != second.fingerprint:
        raise ProfileError("these profiles were collected on different models; only profiles of the same model "
                           "merge")
    for option in OPTIONAL_STATS:
        if first.has_option(option) != second.has_option(option):
            if option in IMPLIED_BY:
                raise ProfileError(f"one profile has the shared experts' {profile_flag(option)} statistics and the "
                                   "other not (an older moekit wrote it); profile both with this moekit")
            raise ProfileError(f"one profile has the {profile_flag(option)} statistics and the other not; profile "
                               "both the same way")
    chunks = [p.meta["options"].get("chunk_sizes", list(CHUNK_SIZES)) for p in (first, second)]
    if chunks[0] != chunks[1]:
        raise ProfileError(f"these profiles measured chunk sparsity over other chunk sizes ({chunks[0]} and "
                           f"{chunks[1]}); profile both with the same moekit")
    if first.meta.get("router_probabilities") != second.meta.get("router_probabilities"):
        raise ProfileError("these profiles summed different router probabilities (one was written by an older "
                           "moekit, which took softmax probabilities for every router); profile both with the same "
                           "moekit")
    for set_name in first.set_names:
        if set_name in second.set_names:
            _refuse_same_draws(set_name, first.meta["sets"][first.set_index(set_name)],
                               second.meta["sets"][second.set_index(set_name)])
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
                     "data": [d for p in parts for d in _draws(p)]})
    sources = _sources(first) + _sources(second)
    meta = json.loads(json.dumps(first.meta))
    meta.pop("timing", None)
    meta["sets"] = sets
    for field in ("options", "versions"):
        meta[field], meta[f"{field}_differ"] = _agreed([source.get(field) or {} for source in sources])
    meta["merged_from"] = sources
    return Profile(meta, layers)


def _draws(set_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The data descriptions of one set: one per draw (a merged set holds several)."""
    data = set_meta["data"]
    return data if isinstance(data, list) else [data]


def _same_draws(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Why two draws of a set certainly share documents, or None if they may be disjoint.

    What identifies the data is the content hash of the documents it was drawn from (``content_sha256``;
    the path is not: a copy is the same data). Draws from the same documents share documents for sure
    when they used the same seed (the same shuffled order: the smaller draw's documents are the first
    ones of the larger, whatever the sequence length and token budget) or when either used every
    document (the seed then only reorders them). Two partial draws with other seeds are independent
    samples that may share some documents (about used_a * used_b / documents); they merge, as more
    samples of the corpus, not as disjoint data. Draws without a content hash (in-memory data) cannot
    be compared and are taken to be disjoint."""
    content = a.get("content_sha256")
    if not content or content != b.get("content_sha256"):
        return None
    where = f"content_sha256 {content}, {a.get('path') or b.get('path') or 'in memory'}"
    if a.get("seed") == b.get("seed"):
        return f"the same documents ({where}) with the same seed {a.get('seed')}"
    for draw in (a, b):
        if isinstance(draw.get("documents"), int) and draw.get("documents_used") == draw["documents"]:
            return f"the same documents ({where}), and one of them used every one of the documents"
    return None


def _refuse_same_draws(name: str, first: dict[str, Any], second: dict[str, Any]) -> None:
    for a in _draws(first):
        for b in _draws(second):
            why = _same_draws(a, b)
            if why:
                raise ProfileError(f"set {name!r} of both profiles was drawn from {why}: merging would count the "
                                   "same tokens twice. Merge profiles of disjoint data (e.g. shards of a corpus), "
                                   "or profile once with a larger --max-tokens")


def _agreed(values: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """(the keys every dict has with one value, sorted names of the keys that differ or are missing somewhere)."""
    keys = sorted({key for value in values for key in value})
    same = {key: values[0][key] for key in keys
            if all(key in value and value[key] == values[0][key] for value in values)}
    return same, [key for key in keys if key not in same]


def _sources(profile: Profile) -> list[dict[str, Any]]:
    return json.loads(json.dumps(profile.meta["merged_from"])) if "merged_from" in profile.meta \
        else [_summary(profile)]


def _summary(profile: Profile) -> dict[str, Any]:
    return {"source": profile.meta["model"].get("source"), "sets": profile.set_names,
            "tokens": [s["tokens"] for s in profile.meta["sets"]], "versions": profile.meta.get("versions"),
            "options": profile.meta.get("options"), "timing": profile.meta.get("timing")}


def new_meta(view: MoEModelView, source: str, sets: list[dict[str, Any]], options: dict[str, Any],
             versions: dict[str, str], easy_ep_input: dict[int, str]) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"source": source, "fingerprint": model_fingerprint(view)},
        "sets": sets,
        "options": {**options, "chunk_sizes": list(CHUNK_SIZES)},
        "easy_ep_input": {str(k): v for k, v in easy_ep_input.items()},
        "router_probabilities": {str(layer.index): router_scoring(layer.routing) for layer in view.layers},
        "versions": versions,
    }
