"""Writing edited checkpoints: atomically (temp dir, rename on success), never over the source
(``moekit.outputs``), with the source's tokenizer files, a model card and the plan beside the weights."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from moekit.data.tokenizer import TOKENIZER_FILES
from moekit.outputs import OutputError, check_output, portable_record, writing_directory

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


# What a new checkpoint takes from its source besides weights and config: the tokenizer, the chat template,
# generation and processor configs, and the code files the config's auto_map names. The source's own records
# (training logs, loss plots, evaluation files, its card) describe another model and are left out.
MODEL_FILES = frozenset({*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                         "chat_template.json", "generation_config.json", "preprocessor_config.json",
                         "processor_config.json"})


@dataclass
class SideFiles:
    """What happened to each file beside the source's weights."""

    copied: list[str]
    links: list[str]  # symbolic links: never followed
    left_out: list[str]  # records of the source, not part of the model


def _code_files(source: Path) -> set[str]:
    """The ``*.py`` files the source config's ``auto_map`` points at (``module.Class`` or ``repo--module.Class``)."""
    try:
        auto_map = json.loads((source / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    return {ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs}


def _copy_side_files(source: Path, dest: Path) -> SideFiles:
    """Copy the files the new model needs from the source directory (``MODEL_FILES``, auto_map code).

    Only regular files directly inside the source are copied: a symbolic link is skipped (and named),
    so a link to a private file elsewhere never puts that file's content into the new checkpoint."""
    result = SideFiles([], [], [])
    if not source.is_dir():
        return result
    code = _code_files(source)
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.name in NOT_COPIED or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if item.is_symlink():
            result.links.append(item.name)
        elif not item.is_file() or (dest / item.name).exists():
            continue
        elif item.name in MODEL_FILES or item.name.endswith(".tiktoken") or item.name in code:
            shutil.copy2(item, dest / item.name)
            result.copied.append(item.name)
        else:
            result.left_out.append(item.name)
    if result.links:
        log.warning("not copied from %s (symbolic links; copy the files themselves if they belong with the model): "
                    "%s", source, ", ".join(result.links))
    return result


def _side_files_section(files: SideFiles) -> str:
    lines = ["", "## Files from the source", "",
             f"Copied: {', '.join(f'`{n}`' for n in files.copied) or 'none'}."]
    if files.left_out:
        lines.append(f"Not copied (records of the source model, not of this one): "
                     f"{', '.join(f'`{n}`' for n in files.left_out)}.")
    if files.links:
        lines.append(f"Not copied (symbolic links): {', '.join(f'`{n}`' for n in files.links)}.")
    return "\n".join(lines) + "\n"


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
    files = _copy_side_files(Path(source), tmp)
    # the plan travels with the checkpoint: this machine's absolute paths become ../name or name
    (tmp / PLAN_FILE).write_text(json.dumps(portable_record(plan, tmp), indent=2, sort_keys=True) + "\n")
    (tmp / CARD_FILE).write_text(card.rstrip("\n") + "\n" + _side_files_section(files))
    for name, content in (extra_files or {}).items():
        (tmp / name).write_bytes(content)
