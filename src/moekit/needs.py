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

    def lines(self) -> list[str]:
        size = format_bytes
        return [f"model weights {size(self.model_bytes)} (largest layer {size(self.largest_layer_bytes)}), "
                f"activations per batch {size(self.activation_bytes)}; {self.device} has "
                f"{size(self.device_free_bytes)} free",
                f"output about {size(self.output_bytes)}; {self.output_dir} has {size(self.output_free_bytes)} free"]

    def check(self, needs_device: bool = True) -> None:
        """Refuse what cannot succeed, with what to do."""
        if self.output_free_bytes is not None and self.output_bytes > self.output_free_bytes:
            raise UserError(f"the output needs about {self.output_bytes / GiB:.2f} GiB but {self.output_dir} has "
                            f"{self.output_free_bytes / GiB:.2f} GiB free; free space or write elsewhere (--out)")
        needed = self.model_bytes + self.activation_bytes
        if needs_device and self.device_free_bytes is not None and needed > self.device_free_bytes:
            raise UserError(f"the model needs {needed / GiB:.2f} GiB on {self.device} (weights and one batch of "
                            f"activations) but {self.device_free_bytes / GiB:.2f} GiB are free; use --dtype bfloat16, "
                            "--device auto (every GPU of this host), a smaller --batch-size, or a larger machine")


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


def profile_needs(source: str | Path, out: str | Path, *, dtype: str, device: str, batch_size: int, seq_len: int,
                  sets: int, neuron_stats: bool) -> RunNeeds:
    """Needs of profiling ``source``: the model on ``device``, one batch of hidden states, a small profile."""
    view = MoEModelView.from_model(load_structure(source))
    model_bytes = weight_bytes(source, dtype, view.model)
    element = element_bytes(view.model, dtype)
    hidden = int(getattr(view.model.config, "hidden_size", 0) or view.layers[0].router_weight.shape[-1])
    experts = max(layer.num_experts for layer in view.layers)
    per_layer = experts * (16 + experts) + (2 * experts * view.layers[0].intermediate_size if neuron_stats else 0)
    output_dir, free = _free_disk(Path(out).resolve().parent)
    return RunNeeds(model_bytes=model_bytes, largest_layer_bytes=_layer_bytes(view, element),
                    activation_bytes=2 * batch_size * seq_len * hidden * element,
                    output_bytes=8 * sets * per_layer * len(view.layers), output_dir=output_dir,
                    output_free_bytes=free, device=device, device_free_bytes=_device_free(device))


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
