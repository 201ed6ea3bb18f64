"""The one way moekit loads a tokenizer: never runs checkpoint code unless asked, never returns an empty one.

``AutoTokenizer.from_pretrained`` on a model directory without tokenizer files does not always fail:
for some model types it builds a tokenizer with no vocabulary (one special token), which encodes
every text to no tokens, so a profile ran on "1 token" per document and exited 0. Every caller in
moekit goes through ``load_tokenizer``, which checks that the result can encode text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.data.sources import DataError

# Files a saved tokenizer consists of (any one is enough for some tokenizer class to load from).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")
_PROBE = "Hello world"
_FIX = "pass --tokenizer DIR with the model's tokenizer (tokenizer= from Python), or save it into the model directory"


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds any file a saved tokenizer is made of."""
    directory = Path(directory)
    return any((directory / name).is_file() for name in TOKENIZER_FILES) or any(directory.glob("*.tiktoken"))


def _no_files(source: str | Path) -> bool:
    path = Path(source)
    return path.is_dir() and not has_tokenizer_files(path)


def _no_files_error(source: str | Path) -> DataError:
    return DataError(f"cannot load a tokenizer: {source} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
                     f"; {_FIX}")


def _check_usable(tokenizer: Any, source: str | Path) -> None:
    """Refuse a tokenizer that encodes text to nothing, or to unknown tokens only, or has only special tokens."""
    try:
        vocabulary = len(tokenizer.get_vocab())
        ids = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    except Exception as err:  # a broken tokenizer can fail in many ways; all mean the same to the user
        raise DataError(f"the tokenizer loaded from {source} cannot encode text ({err}); {_FIX}") from None
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    unknown = getattr(tokenizer, "unk_token_id", None)
    if vocabulary <= len(special) or not [i for i in ids if i != unknown]:
        if _no_files(source):
            raise _no_files_error(source)
        raise DataError(f"the tokenizer loaded from {source} is unusable: {vocabulary} tokens in its vocabulary "
                        f"({len(special)} special), and {_PROBE!r} encodes to {ids}; {_FIX}")


def load_tokenizer(source: str | Path, *, trust_remote_code: bool | None = None) -> Any:
    """The tokenizer of ``source`` (a directory or a model name), checked to encode text to real tokens.

    ``trust_remote_code`` is always passed to transformers, so a checkpoint's own Python code never runs
    and transformers never stops to ask about it; None (the default) means: only inside
    ``moekit.model_io.trusting_remote_code()`` (the CLI's ``--trust-remote-code``).
    """
    from transformers import AutoTokenizer

    from moekit.model_io import remote_code_trusted

    if trust_remote_code is None:
        trust_remote_code = remote_code_trusted()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:
        if _no_files(source):
            raise _no_files_error(source) from None
        raise DataError(f"cannot load a tokenizer from {source}: {err}. {_FIX[0].upper()}{_FIX[1:]}") from None
    _check_usable(tokenizer, source)
    return tokenizer
