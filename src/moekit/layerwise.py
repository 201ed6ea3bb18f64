"""Running a model one decoder layer at a time, straight from its safetensors shards.

For models larger than the device (or the RAM): the model is built on the meta device, and only what
runs now holds memory -- the embedding while the token ids become hidden states, then one decoder
layer at a time (with the small modules outside the layers: rotary embedding, norm), while the hidden
states of every calibration batch wait between layers (in pinned CPU memory on a GPU, unless they
are small beside its free memory)::

    with LayerwiseModel("model-dir", dtype="bfloat16", device="cuda") as run:
        run.embed(batches)                           # batch input_ids -> hidden states entering layer 0
        for index in run.layer_indices:
            with run.loaded(index):                  # this layer's weights from the shards; the next prefetched
                for b in range(len(batches)):
                    run.forward(index, b)            # the layer's output replaces batch b's hidden states

Per-expert tensors are read straight into the stacked parameter transformers' converter would build
from them (``_placed_experts``: one copy, no intermediate stack); the layer's other tensors are
loaded by transformers' own loader (``convert_and_load_state_dict_in_model``: the renamings,
conversions and fp32-kept modules ``from_pretrained`` applies), fed only the layer's tensors;
non-persistent buffers (rotary frequencies) are initialised by the model's ``_init_weights``, as
``from_pretrained`` does. Each
layer is called with exactly the arguments the model's own forward passes it (attention masks per
layer type, position embeddings, ...): a pass of the model in which the earlier layers return their
input and layer ``i`` records its arguments and stops, so no family table is needed and hybrid
models get each layer's own mask. A layer's output is the same as in the whole model. The LM head is
never loaded.

While layer ``i`` computes, a background thread reads layer ``i+1``'s tensors from disk and converts
them on the CPU (into a second meta model, pinned), so the main thread only copies a few large
tensors to the device -- where CPU memory holds the second layer (``read_ahead``; otherwise each
layer is read after the previous one is freed, and the run says so). Arguments are found once per
layer and batch shape.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.utils import logging as hf_logging

from moekit.arch.view import MoEModelView
from moekit.edit import stream
from moekit.model_io import (
    ModelLoadError,
    available_memory,
    check_device,
    check_dtype,
    config_dtype,
    load_config,
    remote_code_trusted,
)

log = logging.getLogger("moekit")

try:  # transformers 5: where from_pretrained's loader takes its settings
    from transformers.modeling_utils import LoadStateDictConfig
except ImportError:  # pragma: no cover - every transformers moekit supports has it
    LoadStateDictConfig = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class _Placement:
    """Where one stored per-expert tensor goes: rows ``[pattern * n, (pattern + 1) * n)`` of ``target[expert]``."""

    target: str
    shape: tuple[int, ...]  # the stacked parameter's
    dtype: torch.dtype
    info: stream.TensorInfo
    expert: int
    pattern: int


class _Stop(Exception):
    """Raised by the layer whose arguments were wanted, to end the recording pass there."""


def resolve_dtype(config: Any, tensors: list[stream.TensorInfo], dtype: str | torch.dtype) -> torch.dtype:
    """The dtype ``from_pretrained(dtype=dtype)`` computes in: the named one, else the config's, else the stored one."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return getattr(torch, dtype)
    return config_dtype(config) or stream.stored_dtype(tensors) or torch.float32


class LayerwiseModel:
    """A local safetensors checkpoint, run decoder layer by decoder layer on one device (see the module doc).

    ``keep_hidden_on_device``: where the batches' hidden states wait between layers (None: on the device when
    they are small beside its free memory). ``read_ahead``: read the next layer while one runs (None: when CPU
    memory holds the extra layer)."""

    def __init__(self, source: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 keep_hidden_on_device: bool | None = None, read_ahead: bool | None = None) -> None:
        check_dtype(dtype)
        if device in ("auto", "meta"):
            raise ModelLoadError(f"--device {device}: layer-by-layer runs compute on one device; use cpu, cuda or "
                                 "cuda:N")
        check_device(device)
        if not Path(source).is_dir():
            raise ModelLoadError(f"{source}: layer-by-layer runs read a local safetensors checkpoint; download it "
                                 "first (e.g. huggingface-cli download) and pass its directory")
        config = load_config(source)
        files = stream.safetensors_files(source)
        assert files is not None  # a directory: its files, or an error naming what is missing
        if getattr(config, "quantization_config", None) is not None:
            raise ModelLoadError(f"{source} is quantized ({_quant_method(config)}); layer-by-layer profiling reads "
                                 "unquantized weights only (prune and apply edit quantized checkpoints; to profile, "
                                 "dequantize it first or profile it whole on a GPU)")
        self.source, self.device = source, torch.device(device)
        self.tensors = stream.read_source(files, source)
        self.dtype = resolve_dtype(config, self.tensors, dtype)
        self.model = self._meta_model(config)
        self._staging = self._meta_model(config)  # where the prefetch thread loads the next layer, on the CPU
        view = MoEModelView.from_model(self.model)
        if not view.family_known:  # the view probes the routing of unlisted families on the stored routers
            stream.load_router_tensors(view, self.tensors)
            view = MoEModelView.from_model(self.model)
        self.view = view
        list_path = view.decoder_layers_path
        self.layer_list_path = list_path
        self.base_path = list_path.rpartition(".")[0]  # the decoder: embedding, decoder layers, norm
        self.base = self.model.get_submodule(self.base_path)
        layers = self.model.get_submodule(list_path)
        if not isinstance(layers, nn.ModuleList):
            raise ModelLoadError(f"{source}: its decoder layers ({list_path}) are not a ModuleList; moekit cannot run "
                                 "this model layer by layer")
        self.layers = layers
        self.layer_indices = list(range(len(layers)))
        self.conversions = get_model_conversion_mapping(self.model)
        self.dtype_plan = self.model._get_dtype_plan(self.dtype) if hasattr(self.model, "_get_dtype_plan") else {}
        self._names = stream.NameMap(view)
        self._names_by_layer, self._outer_names = self._group_tensors()
        self.hidden: list[torch.Tensor] = []
        self._inputs: list[torch.Tensor] = []
        self.keep_hidden_on_device = keep_hidden_on_device
        self.read_ahead = read_ahead
        self._prefetch: tuple[int, threading.Thread, dict[str, Any]] | None = None
        self._calls: dict[tuple[Any, ...], tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would print once per layer

    def _meta_model(self, config: Any) -> nn.Module:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=remote_code_trusted())
        return model.eval()

    # -- which stored tensors feed what ------------------------------------------------------------------------------
    def _group_tensors(self) -> tuple[dict[int, list[stream.TensorInfo]], list[stream.TensorInfo]]:
        names = self._names
        lm_head = self.model.get_output_embeddings()
        head_names = {f"{n}." for n, m in self.model.named_modules() if m is lm_head} if lm_head is not None else set()
        prefix = self.layer_list_path + "."
        by_layer: dict[int, list[stream.TensorInfo]] = {}
        outer: list[stream.TensorInfo] = []
        for info in self.tensors:
            targets = [t for t in names.targets(info.name) if t in names.meta]
            if not targets:
                continue  # not loaded by transformers either (unexpected or ignored keys)
            target = targets[0]
            if target.startswith(prefix):
                by_layer.setdefault(int(target[len(prefix):].split(".")[0]), []).append(info)
            elif not any(target.startswith(h) for h in head_names):  # the LM head is never run here
                outer.append(info)
        return by_layer, outer

    def layer_bytes(self, index: int) -> int:
        layer = self.layers[index]
        return sum(int(p.numel()) * p.element_size() for p in layer.parameters())

    @functools.cached_property
    def largest_layer_bytes(self) -> int:
        return max((self.layer_bytes(i) for i in self.layer_indices), default=0)

    # -- loading and freeing -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _opened(self, infos: list[stream.TensorInfo]) -> Iterator[dict[str, Any]]:
        """Lazy slices of the stored tensors (one open handle per shard): transformers' loader reads them with its
        own worker threads, as from_pretrained does."""
        with contextlib.ExitStack() as stack:
            handles = {path: stack.enter_context(safe_open(str(path), "pt")) for path in {i.path for i in infos}}
            yield {info.name: handles[info.path].get_slice(info.name) for info in infos}

    def _materialize_buffers(self, module: nn.Module) -> None:
        """Non-persistent buffers (not in any checkpoint) on the device, initialised as from_pretrained does."""
        for sub in module.modules():
            meta = [n for n, b in sub.named_buffers(recurse=False) if b is not None and b.is_meta]
            if not meta:
                continue
            for name in meta:
                sub._buffers[name] = torch.empty_like(sub._buffers[name], device=self.device)
            self.model._init_weights(sub)

    def _convert_and_load(self, tensors: dict[str, torch.Tensor], model: nn.Module | None = None,
                          device: torch.device | None = None) -> list[str]:
        """Load stored ``tensors`` into a meta model (default: the one that runs, on its device) as from_pretrained
        would; the errors transformers reports."""
        config = LoadStateDictConfig(device_map={"": str(device or self.device)}, dtype=self.dtype,
                                     dtype_plan=self.dtype_plan, weight_mapping=self.conversions)
        info, _ = convert_and_load_state_dict_in_model(model if model is not None else self.model, tensors, config)
        errors = [str(e) for e in [*getattr(info, "error_msgs", []),
                                   *(getattr(info, "conversion_errors", {}) or {}).values()]]
        if getattr(info, "mismatched_keys", None):
            errors.append(f"shapes differ from the config: {sorted(map(str, info.mismatched_keys))[:3]}")
        return errors

    def _check_loaded(self, module: nn.Module | dict[str, torch.Tensor], where: str, errors: list[str]) -> None:
        """Every weight (and persistent buffer) of ``module`` (or of a state dict) loaded, and transformers reported
        no error."""
        state = module if isinstance(module, dict) else module.state_dict()
        missing = [n for n, t in state.items() if t.is_meta]
        if missing:
            what = (f"{len(missing)} weight(s) of {where} are missing from the checkpoint "
                    f"(e.g. {', '.join(missing[:3])})")
        elif errors:
            what = f"loading {where} failed: {'; '.join(errors[:3])}"
        else:
            return
        raise ModelLoadError(f"cannot load {self.source}: {what}. The checkpoint is incomplete or its config does not "
                             "match its weights")

    def _outer_modules(self) -> list[tuple[str, nn.Module]]:
        """Direct children of the decoder other than its layers (embedding, rotary embedding, final norm)."""
        out = []
        for name, child in self.base.named_children():
            full = f"{self.base_path}.{name}" if self.base_path else name
            if full != self.layer_list_path:
                out.append((full, child))
        return out

    def _load_outer(self) -> None:
        outer = self._outer_modules()
        for _, child in outer:
            self._materialize_buffers(child)
        with self._opened(self._outer_names) as tensors:
            errors = self._convert_and_load(tensors)
        for full, child in outer:
            self._check_loaded(child, full, errors)

    def _placed_experts(self, infos: list[stream.TensorInfo]) -> tuple[dict[str, list[_Placement]],
                                                                        list[stream.TensorInfo]]:
        """Split a layer's stored tensors into per-expert tensors that moekit copies straight into their stacked
        parameter (target name -> where each goes) and the rest, which transformers' loader converts.

        Placed: the per-expert tensors of a converter made of ``MergeModulelist(dim=0)``, optionally followed by
        ``Concatenate(dim=1)`` (every MoE family's experts in transformers 5): expert ``j`` of source pattern ``p``
        is rows ``[p * n, (p + 1) * n)`` of ``target[j]``, which is what stacking then concatenating computes, with
        one copy from the file into the target and no intermediate stack (transformers' loader holds each
        parameter's sources, their stack and their concatenation at once: three times the layer)."""
        placed: dict[str, list[_Placement]] = {}
        rest: list[stream.TensorInfo] = []
        for info in infos:
            placement = self._placement(info)
            if placement is None:
                rest.append(info)
            else:
                placed.setdefault(placement.target, []).append(placement)
        return placed, rest

    def _placement(self, info: stream.TensorInfo) -> _Placement | None:
        names = self._names
        role = names.role(info.name)
        if role.kind != "expert" or role.scale or role.expert is None or role.target is None:
            return None
        target, converter, pattern = names.rename(info.name)
        if converter is None or pattern is None or any(key in target for key in self.dtype_plan):
            return None
        ops = [type(op).__name__ for op in converter.operations]
        dims = [getattr(op, "dim", None) for op in converter.operations]
        if ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) or any(d not in (0, 1) for d in dims) \
                or dims[0] != 0 or (len(dims) == 2 and dims[1] != 1) or \
                getattr(converter.operations[-1], "num_shards_attribute", None) is not None:
            return None
        shape = names.meta.get(target)
        patterns = len(converter.source_patterns)
        if shape is None or len(shape) != len(info.shape) + 1 or not info.shape or \
                shape[1] != patterns * info.shape[0] or tuple(shape[2:]) != tuple(info.shape[1:]) or \
                (len(ops) == 1 and patterns != 1):
            return None
        dtype = self._staging.get_parameter(target).dtype
        if stream.ST_DTYPES.get(str(dtype).removeprefix("torch.")) != info.dtype:
            return None  # a cast: transformers' loader does it
        return _Placement(target, tuple(shape), dtype, info, role.expert, converter.source_patterns.index(pattern))

    def _fill(self, target: str, placements: list[_Placement]) -> torch.Tensor:
        """The stacked parameter ``target``, every expert's stored bytes read straight into its rows (pinned memory
        when the device is a GPU); an error if an expert's tensor is missing."""
        first = placements[0]
        shape, dtype = first.shape, first.dtype
        out = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        raw = out.reshape(-1).view(torch.uint8).numpy()
        patterns = shape[1] // first.info.shape[0]
        expected = {(j, p) for j in range(shape[0]) for p in range(patterns)}
        seen = set()
        files: dict[Path, Any] = {}
        try:
            for placement in placements:
                info = placement.info
                start = (placement.expert * shape[1] + placement.pattern * info.shape[0]) * \
                    (out[0, 0].numel() * out.element_size())
                view = memoryview(raw)[start:start + info.nbytes]
                handle = files.get(info.path)
                if handle is None:
                    handle = files[info.path] = open(info.path, "rb")
                done = 0
                while done < info.nbytes:
                    got = os.preadv(handle.fileno(), [view[done:]], info.begin + done)
                    if got <= 0:
                        raise ModelLoadError(f"cannot load {self.source}: {info.path.name} ended while reading "
                                             f"{info.name} (truncated?)")
                    done += got
                seen.add((placement.expert, placement.pattern))
        finally:
            for handle in files.values():
                handle.close()
        if seen != expected:
            missing = sorted(expected - seen)[:3]
            raise ModelLoadError(f"cannot load {self.source}: {target} lacks the stored tensors of expert(s) "
                                 f"{', '.join(str(j) for j, _ in missing)}. The checkpoint is incomplete")
        return out

    def _stage(self, index: int) -> dict[str, torch.Tensor]:
        """Decoder layer ``index``'s weights, read from disk and converted as from_pretrained converts them, in CPU
        memory (pinned when the device is a GPU): its state dict, ready to be copied to the device."""
        where = f"{self.layer_list_path}.{index}"
        staged = self._staging.get_submodule(self.layer_list_path)[index]
        placed, rest = self._placed_experts(self._names_by_layer.get(index, []))
        try:
            with self._opened(rest) as tensors:
                errors = self._convert_and_load(tensors, self._staging, torch.device("cpu"))
            cuda = self.device.type == "cuda"
            state = {k: (v.pin_memory() if cuda and not v.is_meta else v) for k, v in staged.state_dict().items()}
            for target, placements in placed.items():
                state[target[len(where) + 1:]] = self._fill(target, placements)
            self._check_loaded(state, where, errors)
            return state
        finally:
            staged.to_empty(device="meta")

    def _reads_ahead(self) -> bool:
        """Whether the next layer is read while one runs: only where CPU memory holds a second layer beside the one
        running (on a GPU the running layer is on the device), with 1 GiB to spare; otherwise each layer is read
        after the previous one is freed, which the run says."""
        if self.read_ahead is None:
            largest = self.largest_layer_bytes
            free = available_memory("cpu")
            needed = largest * (2 if self.device.type == "cpu" else 1) + 2**30
            self.read_ahead = free is None or free >= needed
            if not self.read_ahead:
                log.info("not reading the next layer ahead: %.2f GiB of CPU memory are free and two layers need "
                         "%.2f GiB", (free or 0) / 2**30, needed / 2**30)
        return self.read_ahead

    def _start_prefetch(self, index: int) -> None:
        if index >= len(self.layers) or self._prefetch is not None or not self._reads_ahead():
            return
        box: dict[str, Any] = {}

        def stage() -> None:
            try:
                box["state"] = self._stage(index)
            except BaseException as err:  # handed to the main thread, which raises it
                box["error"] = err
        thread = threading.Thread(target=stage, name=f"moekit-prefetch-layer-{index}", daemon=True)
        thread.start()
        self._prefetch = (index, thread, box)

    def _take_prefetched(self, index: int) -> dict[str, torch.Tensor]:
        if self._prefetch is None or self._prefetch[0] != index:
            self._drop_prefetch()
            return self._stage(index)
        _, thread, box = self._prefetch
        thread.join()
        self._prefetch = None
        if "error" in box:
            raise box["error"]
        return box["state"]

    def _drop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch[1].join()
            self._prefetch = None

    @contextlib.contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights on the device, freed (back to the meta device) on exit. Its
        weights were read and converted by a background thread while the previous layer ran; the next layer's
        start now."""
        layer = self.layers[index]
        state = self._take_prefetched(index)
        try:
            self._materialize_buffers(layer)
            layer.load_state_dict({k: v.to(self.device, non_blocking=True) for k, v in state.items()}, assign=True)
            layer.requires_grad_(False)  # no autograd graph can keep a freed layer's weights alive
            del state
            self._start_prefetch(index + 1)
            yield layer
        finally:
            layer.to_empty(device="meta")
            self._calls.clear()

    # -- running -----------------------------------------------------------------------------------------------------
    def layer_call(self, index: int, batch: int) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
        """(positional args after the hidden states, keyword args, hidden states) the model's forward passes decoder
        layer ``index`` for batch ``batch``, found by a pass in which the earlier layers return their input.

        Before the first layer (``embed``) the pass starts from the batch's token ids; afterwards from an
        uninitialised tensor shaped like its hidden states (what the model computes before its layers -- masks,
        position embeddings -- depends on their shape, dtype and device only), so the embedding is not needed."""
        found: dict[str, Any] = {}

        def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_states

        def record(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            found.update(args=args, kwargs=kwargs, hidden=hidden_states)
            raise _Stop

        patched = [self.layers[j] for j in range(index + 1)]
        for j, layer in enumerate(patched):
            layer.forward = record if j == index else passthrough  # instance attributes, removed below
        if batch < len(self.hidden):
            stored = self.hidden[batch]
            inputs = {"inputs_embeds": torch.empty(stored.shape, dtype=stored.dtype, device=self.device)}
        else:
            inputs = {"input_ids": self._inputs[batch].to(self.device)}
        try:
            self.base(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            for layer in patched:
                layer.__dict__.pop("forward", None)
        if "kwargs" not in found:
            raise ModelLoadError(f"the model's forward never called decoder layer {index}; moekit cannot run it "
                                 "layer by layer")
        return found["args"], found["kwargs"], found["hidden"]

    def embed(self, batches: Sequence[torch.Tensor], hidden: Sequence[torch.Tensor] | None = None,
              first_layer: int = 0) -> None:
        """Load the modules outside the decoder layers and compute every batch's hidden states entering layer 0
        (or take ``hidden``, those entering ``first_layer``, saved by an interrupted run)."""
        self._load_outer()
        self._inputs = list(batches)
        self._start_prefetch(first_layer)
        if hidden is not None:
            if len(hidden) != len(self._inputs):
                raise ModelLoadError(f"{len(hidden)} saved hidden states for {len(self._inputs)} batches")
            self.hidden = [self._store(h.to(self.device)) for h in hidden]
            self._free_embedding()
            return
        self.hidden = []
        with torch.inference_mode():
            for b in range(len(self._inputs)):
                self.hidden.append(self._store(self.layer_call(0, b)[2]))
        self._free_embedding()

    def _free_embedding(self) -> None:
        """The embedding is needed only to start: from now on the layers start from the stored hidden states."""
        embedding = self.model.get_input_embeddings()
        if embedding is not None and not any(p.is_meta for p in embedding.parameters()):
            embedding.to_empty(device="meta")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _store(self, hidden: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Where batch ``batch``'s hidden states wait for the next layer: on the device, or copied (without waiting)
        into the batch's pinned CPU buffer, reused from layer to layer (same stream: read before overwritten)."""
        if self._keep_on_device():
            return hidden
        if self.device.type != "cuda":
            return hidden.to("cpu")
        buffer = self.hidden[batch] if batch is not None and batch < len(self.hidden) else None
        if buffer is None or buffer.device.type != "cpu" or buffer.shape != hidden.shape or \
                buffer.dtype != hidden.dtype:
            buffer = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        return buffer.copy_(hidden, non_blocking=True)

    def hidden_states(self) -> list[torch.Tensor]:
        """Every batch's hidden states entering the next layer, complete (pending copies waited for)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.hidden

    def _keep_on_device(self) -> bool:
        """Hidden states stay on a GPU only when they are small beside its free memory (at most a tenth of what two
        layers leave): a batch's working memory through an MoE layer is several times its hidden states and cannot
        be known before it runs, while a copy to pinned CPU memory and back costs little next to a layer."""
        if self.keep_hidden_on_device is None:
            if self.device.type == "cpu":
                self.keep_hidden_on_device = True
            else:
                hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
                element = torch.empty((), dtype=self.dtype).element_size()
                total = sum(int(ids.numel()) for ids in self._inputs) * hidden * element
                largest = self.largest_layer_bytes
                free = available_memory(str(self.device)) or 0
                self.keep_hidden_on_device = total <= (free - 2 * largest) / 10
                if not self.keep_hidden_on_device:
                    log.info("the hidden states of the calibration data (%.2f GiB) wait in pinned CPU memory between "
                             "layers", total / 2**30)
        return self.keep_hidden_on_device

    def forward(self, index: int, batch: int, keep: bool = True) -> torch.Tensor:
        """Run loaded layer ``index`` on batch ``batch``'s hidden states and return its output; ``keep``: the output
        replaces the batch's hidden states (the input of the next layer)."""
        stored = self.hidden[batch]
        key = (index, tuple(stored.shape), stored.dtype)
        if key not in self._calls:  # the arguments depend on the shape alone: found once per layer and shape
            self._calls[key] = self.layer_call(index, batch)[:2]
        args, kwargs = self._calls[key]
        hidden = stored.to(self.device, non_blocking=True)
        out = self.layers[index](hidden, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if keep:
            self.hidden[batch] = self._store(out, batch)
        return out

    def close(self) -> None:
        self._drop_prefetch()
        self.hidden, self._inputs = [], []
        self._calls.clear()
        self.model.to_empty(device="meta")
        if self._bars:
            hf_logging.enable_progress_bar()

    def __enter__(self) -> LayerwiseModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def layerwise_possible(source: str | Path, device: str) -> bool:
    """Whether ``source`` can run layer by layer on ``device``: a local unquantized safetensors checkpoint, one
    device."""
    if device in ("auto", "meta"):
        return False
    try:
        files = stream.safetensors_files(source)
    except ModelLoadError:
        return False
    return files is not None and getattr(load_config(source), "quantization_config", None) is None


def _quant_method(config: Any) -> str:
    quant = config.quantization_config
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method or "quantization_config")


def layers_with_expert_weights(source: str | Path, view: Any) -> Iterator[tuple[Any, Any]]:
    """Each MoE layer of ``view`` (a ``MoEModelView`` of ``source``) loaded from ``source``'s shards on the CPU, one
    decoder layer held at a time, with a function from an expert index to its weights (``ExpertWeights``, views
    into the loaded layer: valid while the layer is the one yielded)."""
    with LayerwiseModel(source, device="cpu", read_ahead=False) as run:
        loaded = {layer.index: layer for layer in run.view.layers}
        for layer in view.layers:
            with run.loaded(layer.index):
                live = loaded[layer.index]
                yield live, (lambda e, lv=live: lv.layout.expert_weights(lv.experts, e))
