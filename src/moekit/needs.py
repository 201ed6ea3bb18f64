"""What a run will need, known before it starts: memory, disk, and whether they are there.

``moekit profile`` and ``moekit prune`` print these numbers before they load a weight (``--dry-run``
prints them and stops), and refuse a run that cannot succeed: an output larger than the free space
of its disk, or a model whose weights exceed the device's free memory. Everything is computed from
the config (the model built on the meta device) and the sizes of the checkpoint's files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.arch.view import MoEModelView
from moekit.errors import UserError
from moekit.eval.speed import checkpoint_bytes
from moekit.model_io import available_memory, element_bytes, load_structure, weight_bytes

GiB = 2**30


def format_bytes(n: int | None) -> str:
    """``n`` bytes for people: GiB from 128 MiB up, else MiB; "unknown" for None."""
    return "unknown" if n is None else f"{n / GiB:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class RunNeeds:
    """The memory and disk one run needs, and what is free (None where it cannot be known)."""

    model_bytes: int  # the weights, in the dtype the run computes in
    largest_layer_bytes: int  # the largest decoder layer's weights
    activation_bytes: int  # hidden states of one batch entering and leaving a layer
    output_bytes: int  # what the run writes
    output_dir: Path
    output_free_bytes: int | None
    device: str
    device_free_bytes: int | None
    resident_bytes: int = 0  # layer by layer: the weights outside the decoder layers and the LM head (the embedding)
    calibration_bytes: int = 0  # layer by layer: the hidden states of every calibration token, kept between layers

    @property
    def whole_bytes(self) -> int:
        """Device memory of a whole-model run: every weight and one batch of activations."""
        return self.model_bytes + self.activation_bytes

    @property
    def layerwise_bytes(self) -> int:
        """Device memory of a layer-by-layer run: the embedding (first) or one layer (then), and one batch (the
        hidden states of the other batches wait in CPU memory when they do not fit)."""
        return max(self.resident_bytes, self.largest_layer_bytes) + self.activation_bytes

    def fits_whole(self) -> bool:
        return self.device_free_bytes is None or self.whole_bytes <= self.device_free_bytes

    def lines(self, layerwise: bool = False) -> list[str]:
        size = format_bytes
        lines = [f"model weights {size(self.model_bytes)} (largest layer {size(self.largest_layer_bytes)}), "
                 f"activations per batch {size(self.activation_bytes)}; {self.device} has "
                 f"{size(self.device_free_bytes)} free"]
        if layerwise:
            lines.append(f"layer by layer: {size(self.layerwise_bytes)} on {self.device} (the embedding "
                         f"{size(self.resident_bytes)} or one layer, and one batch), hidden states of up to "
                         f"{size(self.calibration_bytes)} for the calibration tokens")
        if self.output_bytes or self.output_free_bytes is not None:
            lines.append(f"output about {size(self.output_bytes)}; {self.output_dir} has "
                         f"{size(self.output_free_bytes)} free")
        return lines

    def check(self, needs_device: bool = True, layerwise: bool = False) -> None:
        """Refuse what cannot succeed, with what to do."""
        if self.output_free_bytes is not None and self.output_bytes > self.output_free_bytes:
            raise UserError(f"the output needs about {self.output_bytes / GiB:.2f} GiB but {self.output_dir} has "
                            f"{self.output_free_bytes / GiB:.2f} GiB free; free space or write elsewhere (--out)")
        free = self.device_free_bytes
        if not needs_device or free is None:
            return
        if layerwise and self.layerwise_bytes > free:
            raise UserError(f"even layer by layer the run needs {self.layerwise_bytes / GiB:.2f} GiB on {self.device} "
                            f"(the embedding or one decoder layer, and one batch) but {free / GiB:.2f} "
                            "GiB are free; use a smaller --batch-size or --seq-len, --dtype bfloat16, or a larger "
                            "device")
        if not layerwise and self.whole_bytes > free:
            raise UserError(f"the model needs {self.whole_bytes / GiB:.2f} GiB on {self.device} (weights and one batch "
                            f"of activations) but {free / GiB:.2f} GiB are free; profile it layer by layer "
                            "(--sequential), use --dtype bfloat16, --device auto (every GPU of this host), a smaller "
                            "--batch-size, or a larger machine")


def check_disk_room(out: str | Path, needed: int) -> None:
    """Refuse, before writing, an output of ``needed`` bytes that the free space of its disk cannot hold."""
    where, free = _free_disk(Path(out).resolve().parent)
    if free is not None and needed > free:
        raise UserError(f"the output needs {needed / GiB:.2f} GiB but {where} has {free / GiB:.2f} GiB free; free "
                        "space or write elsewhere (--out)")


def _free_disk(path: Path) -> tuple[Path, int | None]:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return existing, shutil.disk_usage(existing).free
    except OSError:
        return existing, None


def _layer_bytes(view: MoEModelView, element: int) -> int:
    """Bytes of the largest decoder layer (the module that holds an MoE block)."""
    model = view.model
    sizes = []
    for layer in view.layers:
        block = model.get_submodule(layer.path.rpartition(".")[0])
        sizes.append(sum(int(p.numel()) for p in block.parameters()))
    return max(sizes, default=0) * element


def _resident_bytes(view: MoEModelView, element: int) -> int:
    """Bytes of the weights a layer-by-layer run loads outside the decoder layers (all but the LM head)."""
    model = view.model
    layer_list = model.get_submodule(view.decoder_layers_path)
    head = model.get_output_embeddings()
    skipped = {id(p) for p in layer_list.parameters()} | ({id(p) for p in head.parameters()} if head else set())
    embedding = model.get_input_embeddings()
    kept = {id(p) for p in embedding.parameters()} if embedding is not None else set()  # a tied head: held once
    return sum(int(p.numel()) for p in model.parameters() if id(p) not in skipped or id(p) in kept) * element


def profile_needs(source: str | Path, out: str | Path | None, *, dtype: str, device: str, batch_size: int, seq_len: int,
                  sets: int, neuron_stats: bool, max_tokens: int | None = None,
                  merge_stats: bool = False, gradients: bool = False, input_norms: bool = False) -> RunNeeds:
    """Needs of profiling ``source``: the model on ``device``, one batch of hidden states, a small profile (and, for a
    layer-by-layer run, the hidden states of up to ``max_tokens`` tokens per set). ``out`` None: no output (its
    size and disk are not looked at). ``gradients``: a backward pass keeps every layer's activations for the
    batch (estimated as 12 hidden-sized tensors per decoder layer, plus the routed experts' intermediate
    activations) and the float32 logits and their gradient."""
    view = MoEModelView.from_model(load_structure(source))
    model_bytes = weight_bytes(source, dtype, view.model)
    element = element_bytes(view.model, dtype)
    hidden = int(getattr(view.model.config, "hidden_size", 0) or view.layers[0].router_weight.shape[-1])
    experts = max(layer.num_experts for layer in view.layers)
    neurons = neuron_stats or gradients
    per_layer = experts * (16 + experts) + (2 * experts * view.layers[0].intermediate_size if neurons else 0) \
        + (experts * (experts + hidden) if merge_stats else 0) \
        + (experts * view.layers[0].intermediate_size if gradients else 0) \
        + (experts * (hidden + view.layers[0].intermediate_size) if input_norms else 0)
    activations = 2 * batch_size * seq_len * hidden * element
    if gradients:
        tokens = batch_size * seq_len
        top_k = view.layers[0].top_k
        vocab = int(getattr(view.model.config, "vocab_size", 0) or 0)
        decoder_layers = int(getattr(view.model.config, "num_hidden_layers", 0) or len(view.layers))
        activations = decoder_layers * tokens * element * (12 * hidden + 3 * top_k * view.layers[0].intermediate_size) \
            + 2 * tokens * vocab * 4
    output_dir, free = _free_disk(Path(out).resolve().parent) if out is not None else (Path(), None)
    return RunNeeds(model_bytes=model_bytes, largest_layer_bytes=_layer_bytes(view, element),
                    activation_bytes=activations,
                    output_bytes=8 * sets * per_layer * len(view.layers) if out is not None else 0,
                    output_dir=output_dir,
                    output_free_bytes=free, device=device, device_free_bytes=_device_free(device),
                    resident_bytes=_resident_bytes(view, element),
                    calibration_bytes=sets * -(-(max_tokens or 0) // seq_len) * seq_len * hidden * element)


def eval_needs(source: str | Path, *, dtype: str, device: str, batch_size: int, seq_len: int) -> RunNeeds:
    """Needs of evaluating ``source``: the whole model on ``device`` and one batch of sequences of ``seq_len``
    tokens, whose float32 log-probabilities over the vocabulary are usually the largest activation (task items
    are padded to the longest in their batch, usually far below ``seq_len``; perplexity windows reach it)."""
    view = MoEModelView.from_model(load_structure(source))
    element = element_bytes(view.model, dtype)
    config = view.model.config
    hidden = int(getattr(config, "hidden_size", 0) or view.layers[0].router_weight.shape[-1])
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokens = batch_size * seq_len
    return RunNeeds(model_bytes=weight_bytes(source, dtype, view.model),
                    largest_layer_bytes=_layer_bytes(view, element),
                    activation_bytes=tokens * (2 * hidden * element + 4 * vocab), output_bytes=0, output_dir=Path(),
                    output_free_bytes=None, device=device, device_free_bytes=_device_free(device))


def prune_needs(source: str | Path, out: str | Path, *, kept: int, dtype: str = "auto") -> RunNeeds:
    """Needs of pruning ``source`` to ``kept`` experts per layer: the output's size on disk."""
    view = MoEModelView.from_model(load_structure(source))
    element = element_bytes(view.model, dtype)
    total = sum(int(p.numel()) for p in view.model.parameters())
    model_bytes = total * element
    removed = sum(layer.expert_parameters() * (layer.num_experts - kept) // max(layer.num_experts, 1)
                  for layer in view.layers)
    stored = checkpoint_bytes(source)[0] if dtype == "auto" and Path(source).is_dir() else 0
    output = round((stored or model_bytes) * (total - removed) / max(total, 1))
    output_dir, free = _free_disk(Path(out).resolve().parent)
    return RunNeeds(model_bytes=model_bytes, largest_layer_bytes=_layer_bytes(view, element), activation_bytes=0,
                    output_bytes=output, output_dir=output_dir, output_free_bytes=free, device="cpu",
                    device_free_bytes=available_memory("cpu"))


def _device_free(device: str) -> int | None:
    if device == "auto":
        if not torch.cuda.is_available():
            return None
        return sum(int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count()))
    return available_memory(device)
