"""Session fixtures: tiny random models of every supported family, saved once per test session."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING

from moekit.tiny import TINY_FAMILIES, UNLISTED_TINY_FAMILIES, save_tiny_model

ALL_FAMILIES = [f for f in TINY_FAMILIES + UNLISTED_TINY_FAMILIES if f in CONFIG_MAPPING]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dir: Path):
    """tiny_checkpoint(family) -> directory of a saved tiny model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str, **kwargs) -> Path:
        key = family + repr(sorted(kwargs.items()))
        if key not in cache:
            path = tiny_dir / f"{family}-{len(cache)}"
            save_tiny_model(family, path, **kwargs)
            cache[key] = path
        return cache[key]

    return get


@contextmanager
def capture_transformers_log() -> Iterator[io.StringIO]:
    """Everything transformers logs at WARNING or above, while the block runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def random_ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def profiled_tiny_model(root: Path, family: str, option: str, text: str, max_tokens: int) -> Path:
    """``root/model`` (a tiny ``family`` checkpoint), ``root/text.txt`` and two of its profiles: ``root/profile`` with
    the optional statistics ``option`` (``neuron_stats`` or ``merge_stats``) and ``root/plain`` without."""
    from moekit.profile import profile_model

    save_tiny_model(family, root / "model")
    (root / "text.txt").write_text(text)
    for name, on in (("profile", True), ("plain", False)):
        profile_model(root / "model", [f"prose={root / 'text.txt'}"], root / name, seq_len=64, max_tokens=max_tokens,
                      progress=False, **{option: on})
    return root
