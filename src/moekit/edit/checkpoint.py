"""Writing edited checkpoints: atomically (temp dir, rename on success), never over the source
(``moekit.outputs``), with the source's tokenizer files, a model card and the plan beside the weights."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from moekit.outputs import OutputError, check_output, writing_directory

log = logging.getLogger("moekit")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
NOT_COPIED = {"config.json", "README.md", "moekit_plan.json", "model.safetensors.index.json",
              "pytorch_model.bin.index.json"}
PLAN_FILE = "moekit_plan.json"
CARD_FILE = "README.md"


OutputDirError = OutputError  # the name earlier versions exported


def check_output_dir(out: str | Path, source: str | Path | None, overwrite: bool,
                     sources: Iterable[str | Path | None] = (), inputs: Iterable[str | Path | None] = ()) -> Path:
    """The checks of :func:`moekit.outputs.check_output` for a checkpoint directory made from ``source``."""
    return check_output(out, kind="checkpoint", overwrite=overwrite, sources=[source, *sources], inputs=inputs)


def _copy_side_files(source: Path, dest: Path) -> tuple[list[str], list[str]]:
    """Copy the source's tokenizer and other small files; return (copied, skipped links).

    Only regular files directly inside the source are copied: a symbolic link is skipped (and named),
    so a link to a private file elsewhere never puts that file's content into the new checkpoint."""
    copied: list[str] = []
    skipped: list[str] = []
    if not source.is_dir():
        return copied, skipped
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.name in NOT_COPIED or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if item.is_symlink():
            skipped.append(item.name)
            continue
        if not item.is_file() or (dest / item.name).exists():
            continue
        shutil.copy2(item, dest / item.name)
        copied.append(item.name)
    if skipped:
        log.warning("not copied from %s (symbolic links; copy the files themselves if they belong with the model): "
                    "%s", source, ", ".join(skipped))
    return copied, skipped


def _write_config_aliases(dest: Path, aliases: dict[str, Any]) -> None:
    """Write every alias of the edited fields, so that transformers 4.5x and 5.x both read them."""
    path = dest / "config.json"
    data = json.loads(path.read_text())
    data.update(aliases)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_checkpoint(
    model: PreTrainedModel,
    out: str | Path,
    source: str | Path,
    plan: dict[str, Any],
    card: str,
    overwrite: bool = False,
    config_aliases: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save ``model`` with plan, card and ``extra_files`` (name -> bytes) to ``out`` atomically. Nothing is
    left behind on failure."""
    out_path = check_output_dir(out, source, overwrite)
    with writing_directory(out_path, "checkpoint") as tmp:
        model.save_pretrained(tmp)
        finish_checkpoint(tmp, source, plan, card, config_aliases, extra_files)
    return out_path


def finish_checkpoint(tmp: Path, source: str | Path, plan: dict[str, Any], card: str,
                      config_aliases: dict[str, Any] | None = None,
                      extra_files: dict[str, bytes] | None = None) -> None:
    """Everything beside the weights and config of a checkpoint being written in ``tmp``: every alias of the
    edited config fields, the source's side files, the plan, the card and ``extra_files``. The one way both
    the in-memory writer (:func:`write_checkpoint`) and the streaming editor (``moekit.edit.stream``) end."""
    if config_aliases:
        _write_config_aliases(tmp, config_aliases)
    _copy_side_files(Path(source), tmp)
    (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
    (tmp / CARD_FILE).write_text(card)
    for name, content in (extra_files or {}).items():
        (tmp / name).write_bytes(content)
