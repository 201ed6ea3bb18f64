"""Resuming an interrupted layer-by-layer profile (``moekit profile --sequential --resume``).

A layer-by-layer run saves, after a decoder layer finishes (when ``interval`` seconds have passed since
the last save; 5 minutes by default, so that saving costs little next to computing), what it needs
to continue: the accumulators
of the finished MoE layers and every batch's hidden states at the boundary, one safetensors file per
rank, written atomically. The state lives beside the output, in ``.NAME.moekit-resume``, and is
removed when the profile is written. A resumed run continues from the saved boundary and computes
exactly what the uninterrupted run would (the same batches through the same layers).

The state records a fingerprint of the run (model, data, options, world size); a state of another
run is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.data import CalibrationSet
from moekit.errors import UserError

DEFAULT_INTERVAL = 300.0  # seconds between saves


class ResumeError(UserError):
    """A resume state that is absent, damaged or of another run."""


def resume_dir(out: str | Path) -> Path:
    """Where the resumable state of a profile written to ``out`` lives."""
    out = Path(out)
    return out.parent / f".{out.name}.moekit-resume"


def run_fingerprint(source: str, sets: list[CalibrationSet], options: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for a saved state to continue this run: the model, every token, the options."""
    tokens = hashlib.sha256()
    for cset in sets:
        tokens.update(cset.input_ids.numpy().tobytes())
        tokens.update(cset.attention_mask.numpy().tobytes())
    return {"model": str(source), "sets": [[s.name, s.num_tokens, s.num_sequences] for s in sets],
            "tokens_sha256": tokens.hexdigest(), "options": {k: options[k] for k in sorted(options)}}


@dataclass
class SavedState:
    done: int  # decoder layers finished: 0 .. done-1
    stats: dict[int, dict[str, torch.Tensor]]  # MoE layer -> accumulators (this rank's)
    easy_ep_input: dict[int, str]
    hidden: list[torch.Tensor]  # every batch's hidden states entering layer ``done``


class LayerwiseState:
    """This rank's saved state of one layer-by-layer run."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any], rank: int = 0,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.directory, self.fingerprint, self.rank, self.interval = Path(directory), fingerprint, rank, interval
        self.file = self.directory / f"rank{rank}.safetensors"
        self._last = time.monotonic()

    def exists(self) -> bool:
        return self.directory.exists()

    def describe(self) -> str:
        """``layer N of the run`` for messages, or why it cannot be read."""
        try:
            with safe_open(str(self.file), "pt") as handle:
                meta = json.loads(handle.metadata()["state"])
            return f"{meta['done']} decoder layer(s) done"
        except Exception:
            return "unreadable"

    def load(self) -> SavedState:
        try:
            with safe_open(str(self.file), "pt") as handle:
                meta = json.loads(handle.metadata()["state"])
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as err:
            raise ResumeError(f"cannot resume from {self.directory}: {self.file.name} is missing or damaged ({err}); "
                              f"delete {self.directory} and run again without --resume") from None
        if meta.get("fingerprint") != self.fingerprint:
            raise ResumeError(f"cannot resume from {self.directory}: it was saved by another run (a different model, "
                              "data or options). Run the same command as before with --resume, or delete it to start "
                              "over")
        stats: dict[int, dict[str, torch.Tensor]] = {}
        hidden: dict[int, torch.Tensor] = {}
        for name, tensor in tensors.items():
            kind, index, *rest = name.split(".")
            if kind == "stats":
                stats.setdefault(int(index), {})[rest[0]] = tensor
            else:
                hidden[int(index)] = tensor
        return SavedState(int(meta["done"]), stats, {int(k): v for k, v in meta["easy_ep_input"].items()},
                          [hidden[b] for b in range(len(hidden))])

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def save(self, done: int, stats: dict[int, dict[str, torch.Tensor]], easy_ep_input: dict[int, str],
             hidden: list[torch.Tensor]) -> None:
        """Save atomically: the finished layers' accumulators and the hidden states entering layer ``done``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"stats.{layer}.{name}": t.detach().to("cpu").contiguous()
                   for layer, named in stats.items() for name, t in named.items()}
        tensors.update({f"hidden.{b}": h.detach().to("cpu").contiguous() for b, h in enumerate(hidden)})
        meta = {"done": done, "fingerprint": self.fingerprint, "easy_ep_input": {str(k): v for k, v in
                                                                                 easy_ep_input.items()}}
        partial = self.file.with_name(self.file.name + ".partial")
        save_file(tensors, str(partial), metadata={"state": json.dumps(meta)})
        os.replace(partial, self.file)
        self._last = time.monotonic()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
