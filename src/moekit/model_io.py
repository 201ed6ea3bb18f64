"""Loading models: the structure alone (no weights, for validation) or the full model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


class ModelLoadError(ValueError):
    """The model could not be found or read."""


def describe_source(source: str | Path) -> str:
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


def load_config(source: str | Path) -> Any:
    path = Path(source)
    if path.is_file():
        raise ModelLoadError(f"{path} is a file: MODEL must be a Hugging Face model directory or hub id")
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: MODEL must be a Hugging Face model directory or hub id")
    if path.exists():
        try:
            json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {err}") from None
    try:
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        where = "local directory" if path.exists() else "directory or hub id (is the hub reachable?)"
        raise ModelLoadError(f"cannot read the config of {source!r} as a {where}: {err}") from None


def load_structure(source: str | Path) -> PreTrainedModel:
    """The model built from its config on the meta device: every module, no weights, no memory."""
    config = load_config(source)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ModelLoadError(f"{source!r} is not a causal language model transformers can build: {err}") from None
    return model.eval()


def load_model(source: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu") -> PreTrainedModel:
    """The full model, in its stored dtype by default, in eval mode."""
    load_config(source)  # clear errors first
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device not in ("cpu", "meta"):
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    return model.eval()
