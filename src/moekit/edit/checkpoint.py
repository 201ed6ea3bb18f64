"""Writing edited checkpoints: atomically (temp dir, rename on success), never over the source,
with the source's tokenizer files, a model card and the plan beside the weights."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
NOT_COPIED = {"config.json", "README.md", "moekit_plan.json", "model.safetensors.index.json",
              "pytorch_model.bin.index.json"}
PLAN_FILE = "moekit_plan.json"
CARD_FILE = "README.md"


class OutputDirError(ValueError):
    """The output directory cannot be written as asked."""


def check_output_dir(out: str | Path, source: str | Path | None, overwrite: bool) -> Path:
    """Refuse an output that is, or contains, the source; refuse an existing one unless ``overwrite``."""
    out_path = Path(out).resolve()
    src = Path(source) if source is not None else None
    if src is not None and src.exists():
        src = src.resolve()
        if out_path == src:
            raise OutputDirError(f"output directory {out_path} is the source model; choose a new directory")
        if src.is_relative_to(out_path):
            raise OutputDirError(f"output directory {out_path} contains the source model {src}; choose a "
                                 "directory outside it")
    if out_path.exists() and not overwrite:
        raise OutputDirError(f"output directory {out_path} already exists; choose a new one or pass --overwrite")
    if out_path.exists() and not out_path.is_dir():
        raise OutputDirError(f"output path {out_path} exists and is not a directory")
    return out_path


def _copy_side_files(source: Path, dest: Path) -> list[str]:
    copied = []
    if not source.is_dir():
        return copied
    for item in sorted(source.iterdir()):
        if (not item.is_file() or item.name.startswith(".") or item.name in NOT_COPIED
                or item.name.endswith(WEIGHT_SUFFIXES) or (dest / item.name).exists()):
            continue
        shutil.copy2(item, dest / item.name)
        copied.append(item.name)
    return copied


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
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.moekit-tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        if config_aliases:
            _write_config_aliases(tmp, config_aliases)
        _copy_side_files(Path(source), tmp)
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
        (tmp / CARD_FILE).write_text(card)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
        if out_path.exists():
            old = out_path.parent / f".{out_path.name}.moekit-old-{uuid.uuid4().hex[:8]}"
            out_path.rename(old)
            tmp.rename(out_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path
