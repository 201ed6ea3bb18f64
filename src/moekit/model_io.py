"""Loading models: the structure alone (no weights, for validation) or the full model.

No code from a checkpoint ever runs unless asked: every load passes ``trust_remote_code`` explicitly
(False, so transformers neither prompts nor imports a checkpoint's ``configuration_*.py`` /
``modeling_*.py``), unless the caller runs inside :func:`trusting_remote_code` (the CLI's
``moekit --trust-remote-code``). Local checkpoints are checked before loading: config, dtype and
device named correctly, every shard the index names present and inside the model directory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moekit.errors import UserError


class ModelLoadError(UserError):
    """The model could not be found or read."""


_REMOTE_CODE: ContextVar[bool] = ContextVar("moekit_trust_remote_code", default=False)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                 "fp64": "float64", "double": "float64"}


@contextmanager
def trusting_remote_code() -> Iterator[None]:
    """Inside this block, loads may run code shipped with a checkpoint (``trust_remote_code=True``)."""
    token = _REMOTE_CODE.set(True)
    try:
        yield
    finally:
        _REMOTE_CODE.reset(token)


def remote_code_trusted() -> bool:
    """Whether loads may run a checkpoint's own code now (only inside :func:`trusting_remote_code`)."""
    return _REMOTE_CODE.get()


def describe_source(source: str | Path) -> str:
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


def check_dtype(dtype: str | torch.dtype) -> None:
    """Refuse a dtype name torch does not have, before anything loads."""
    if isinstance(dtype, torch.dtype) or dtype in DTYPES:
        return
    raise ModelLoadError(f"--dtype {dtype!r} is not a dtype moekit loads; choose one of: {', '.join(DTYPES)} "
                         f"(or {', '.join(DTYPE_ALIASES)})")


def check_device(device: str) -> None:
    """Refuse a device this machine does not have (``cuda`` without a GPU, ``cuda:3`` on a 2-GPU host)."""
    if device in ("cpu", "meta"):
        return
    if device == "auto" or device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError("--device mps: Apple's Metal backend is not available here; use --device cpu")
        return
    raise ModelLoadError(f"--device {device!r} is not a device moekit knows; use cpu, cuda, cuda:N, mps or auto")


def _missing_local(source: str | Path) -> bool:
    """A path that does not exist and cannot be a hub id (so it is a mistyped local path)."""
    text = str(source)
    if Path(text).exists():
        return False
    first = Path(text).parts[0] if Path(text).parts else text
    return (not _HUB_ID.fullmatch(text) or text.startswith((".", "~")) or Path(text).is_absolute()
            or (first != text and Path(first).exists()))


def check_weight_files(path: Path) -> None:
    """Every shard a local checkpoint's index names exists, is a regular file and lies inside ``path``."""
    for index in sorted(path.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError) as err:
            raise ModelLoadError(f"{index} is not a valid shard index: {err}") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map object; the checkpoint is incomplete")
        root = path.resolve()
        for shard in sorted({str(v) for v in weight_map.values()}):
            target = (path / shard).resolve()
            if not target.is_relative_to(root) or Path(shard).is_absolute():
                raise ModelLoadError(f"{index} names the shard {shard!r}, outside the model directory; moekit only "
                                     "reads weights inside it")
            if not target.is_file():
                raise ModelLoadError(f"{index} names the shard {shard!r}, which is missing: the checkpoint is "
                                     "incomplete (download or copy it again)")


def load_config(source: str | Path) -> Any:
    path = Path(source)
    if _missing_local(source):
        raise ModelLoadError(f"{source} does not exist: MODEL must be a Hugging Face model directory or hub id")
    if path.is_file():
        raise ModelLoadError(f"{path} is a file: MODEL must be a Hugging Face model directory or hub id")
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: MODEL must be a Hugging Face model directory or hub id")
    if path.exists():
        try:
            json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {err}") from None
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=remote_code_trusted())
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        where = "local directory" if path.exists() else "directory or hub id (is the hub reachable?)"
        raise ModelLoadError(f"cannot read the config of {source!r} as a {where}: {err}") from None


def load_structure(source: str | Path) -> PreTrainedModel:
    """The model built from its config on the meta device: every module, no weights, no memory."""
    config = load_config(source)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote_code_trusted())
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise ModelLoadError(f"{source!r} is not a causal language model transformers can build: {err}") from None
    return model.eval()


def available_memory(device: str) -> int | None:
    """Free bytes on ``device`` (a CUDA device, or the CPU's available RAM on Linux); None if unknown."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device)
        if index.index is None:
            index = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(index)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:  # a cap set with torch.cuda.set_per_process_memory_fraction counts too
            free = min(free, int(fraction(index) * total) - torch.cuda.memory_reserved(index))
        return max(int(free), 0)
    if device == "cpu" and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        free = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        limited = cgroup_memory_free()
        return min(free, limited) if limited is not None else free
    return None


_UNLIMITED = 2**60


def cgroup_memory_free(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Memory this process may still use under its cgroup's memory limit (a container's, or one a scheduler set),
    which the machine-wide free memory does not show; None without a limit. Inactive file cache counts as free.
    The tightest limit of the cgroup and its ancestors wins (cgroup v2 ``memory.max``, v1
    ``memory.limit_in_bytes``)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        directory = base / path.lstrip("/")
        while True:
            free = _cgroup_free(directory, *files)
            if free is not None:
                best = free if best is None else min(best, free)
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return best


def _cgroup_free(directory: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    try:
        limit_text = (directory / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= _UNLIMITED:
            return None
        usage = int((directory / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    cache = 0
    try:
        for stat in (directory / "memory.stat").read_text().splitlines():
            key, _, value = stat.partition(" ")
            if key == cache_key:
                cache = int(value)
    except (OSError, ValueError):
        pass
    return max(int(limit_text) - usage + cache, 0)


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config names (``dtype``, or the older ``torch_dtype``), None if it names none."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


def element_bytes(structure: PreTrainedModel, dtype: str | torch.dtype = "auto") -> int:
    """Bytes of one parameter in ``dtype`` ("auto": the config's dtype, else float32)."""
    if dtype == "auto":
        dtype = config_dtype(structure.config) or torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def weight_bytes(source: str | Path, dtype: str | torch.dtype = "auto",
                 structure: PreTrainedModel | None = None) -> int:
    """Bytes the model's parameters take in ``dtype`` (``structure``: the model already built on meta)."""
    structure = structure if structure is not None else load_structure(source)
    return sum(int(p.numel()) for p in structure.parameters()) * element_bytes(structure, dtype)


def check_fits(source: str | Path, dtype: str | torch.dtype, device: str) -> None:
    """Refuse, before loading, a model whose weights alone exceed the device's free memory."""
    free = available_memory(device)
    if free is None:
        return
    needed = weight_bytes(source, dtype)
    if needed > free:
        raise ModelLoadError(
            f"{source} does not fit: its weights need {needed / 2**30:.2f} GiB in {dtype} but {device} has "
            f"{free / 2**30:.2f} GiB free. Use --dtype bfloat16, --device auto (every GPU of this host), or a "
            "machine with more memory")


def load_model(source: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu") -> PreTrainedModel:
    """The full model, in its stored dtype by default, in eval mode; a clear error if it cannot fit."""
    check_dtype(dtype)
    check_device(device)
    load_config(source)  # clear errors first
    if Path(source).is_dir():
        check_weight_files(Path(source))
    check_fits(source, dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": remote_code_trusted()}
    if device not in ("cpu", "meta"):
        kwargs["device_map"] = device
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(source), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise ModelLoadError(f"cannot load the weights of {source}: {err}. The checkpoint is incomplete or corrupt, "
                             "or its config does not match its weights") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:  # transformers would fill them with random values: garbage in, garbage out
        raise ModelLoadError(f"cannot load {source}: {len(missing)} weight(s) the config needs are missing from the "
                             f"checkpoint or have another shape (e.g. {', '.join(missing[:3])}). The checkpoint is "
                             "incomplete or its config does not match its weights")
    return model.eval()
