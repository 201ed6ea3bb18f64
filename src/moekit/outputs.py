"""Where moekit writes: one check for every output, and one atomic writer for files and directories.

Every command that writes (profile, profile merge, prune, apply, moefy, recover, report, run, demo,
``--json`` results, plan files) goes through :func:`check_output` before any weight loads and then
writes through :func:`writing_directory` or :func:`writing_file`. The rules, so that nothing of the
user's is ever deleted or overwritten by mistake:

- never the source model (or teacher, tokenizer, bundled model), never a directory that contains a
  source, never a path inside a source directory (a checkpoint is not a scratch folder);
- never one of the command's inputs (data, profile, plan, recipe, result files), never a directory
  that holds one (replacing it would delete the input);
- never an existing path without ``--overwrite``; with it, a directory is replaced only if moekit
  wrote it *as the same kind of output* (a profile replaces a profile, a checkpoint a checkpoint),
  recognised by its own metadata (``moekit_plan.json``, ``profile.json``) or by the
  ``.moekit-output.json`` marker every moekit directory carries; an empty directory is written into
  without ``--overwrite`` (nothing is lost);
  a file is replaced only if it is a regular file; a symbolic link is never written through.

Writes go to a hidden temporary sibling ``.NAME.moekit-tmp-XXXXXXXX`` (locked with ``flock`` while in
use) that is renamed onto the target only when complete, so an interrupted or failed run (disk
full, Ctrl-C, a kill) leaves nothing at the target. A temporary left by a killed run is removed the
next time anything is written to the same target (and that is said).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from moekit.errors import UserError

try:
    import fcntl
except ImportError:  # not on Windows: leftovers are then never judged stale
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("moekit")

OutputKind = Literal["checkpoint", "profile", "report", "run", "demo", "file"]
MARKER_FILE = ".moekit-output.json"
TEMP_TAG = "moekit-tmp"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:moekit-tmp|moekit-old|tmp)-[0-9a-f]{8}")


class OutputError(UserError):
    """An output path that moekit must not (or cannot) write as asked; the message says what to do."""


def _kind_of(path: Path) -> str | None:
    """The kind of moekit output an existing directory holds, or None if moekit did not write it."""
    marker = path / MARKER_FILE
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if isinstance(kind, str):
            return kind
    # outputs of moekit versions before the marker, recognised by their own metadata
    plan = path / "moekit_plan.json"
    if plan.is_file() and (path / "config.json").is_file() and _json_format(plan).startswith("moekit"):
        return "checkpoint"
    if (path / "profile.json").is_file() and _json_format(path / "profile.json") == "moekit-profile":
        return "profile"
    if (path / "recipe.resolved.yaml").is_file():
        return "run"
    if (path / "results.json").is_file() and (path / "profile").is_dir() and (path / "report.md").is_file():
        return "demo"
    names = {p.name for p in path.iterdir()}
    if {"report.md", "report.html"} <= names <= {"report.md", "report.html", "figures"}:
        return "report"
    return None


def _json_format(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    return str(data.get("format", "")) if isinstance(data, dict) else ""


def _local(paths: Iterable[str | Path | None]) -> list[Path]:
    return [Path(p).resolve() for p in paths if p is not None and str(p) and Path(p).exists()]


def shown_path(path: str | Path, base: str | Path | None) -> str:
    """A path as a model card or report shows it, without this machine's folders: relative to ``base`` (the
    folder the card or report is written to) when it is at most one folder up from it (``../tiny`` for a
    sibling), else its last component. A hub id or placeholder (no such local path), or no ``base``: as given."""
    path = Path(path)
    if base is None or (not path.is_absolute() and not path.exists()):
        return str(path)
    relative = Path(os.path.relpath(path.resolve(), Path(base).resolve()))
    return str(relative) if relative.parts[:2].count("..") <= 1 else path.name


def portable_record(record: Any, base: str | Path) -> Any:
    """A copy of a JSON record (a plan, an upcycling or recovery record) to be written into ``base``, with every
    string that is an absolute path of this machine shown as ``shown_path`` shows it (``../tiny``, or the last
    component): records travel with checkpoints, and this machine's folders are not theirs to publish. Other
    strings, hashes and fingerprints are kept as they are."""
    if isinstance(record, dict):
        return {key: portable_record(value, base) for key, value in record.items()}
    if isinstance(record, list):
        return [portable_record(value, base) for value in record]
    if isinstance(record, str) and len(record) < 4096 and os.path.isabs(record):
        return shown_path(record, base)
    return record


def check_output(out: str | Path, *, kind: OutputKind, overwrite: bool = False,
                 sources: Iterable[str | Path | None] = (), inputs: Iterable[str | Path | None] = (),
                 offers_overwrite: bool = True) -> Path:
    """Check that ``out`` may be written as a ``kind`` output (see the module docstring); return it resolved.

    ``sources``: models and other directories read while (or after) the output is written: the output
    may not be one, contain one or lie inside one. ``inputs``: files and directories read before
    writing starts: the output may not be one of them or hold one. Paths that do not exist locally (hub
    ids) are skipped. ``offers_overwrite``: whether the command has an ``--overwrite`` to suggest.
    """
    given = Path(out)
    if str(out) == "":
        raise OutputError("the output path is empty; give --out PATH")
    if given.is_symlink():
        raise OutputError(f"output {given} is a symbolic link; moekit does not write through links: give the "
                          "real path or a new one")
    path = given.resolve()
    for source in _local(sources):
        if path == source:
            raise OutputError(f"output {path} is the source model {source}; choose a new path")
        if source.is_relative_to(path):
            raise OutputError(f"output {path} contains the source model {source}; choose a path outside it")
        if source.is_dir() and path.is_relative_to(source):
            raise OutputError(f"output {path} lies inside the source model {source}; moekit does not write into a "
                              "source directory: choose a path outside it")
    for item in _local(inputs):
        if path == item:
            raise OutputError(f"output {path} is one of this command's inputs; choose a new path")
        if item.is_relative_to(path):
            raise OutputError(f"output {path} contains the input {item}, which replacing it would delete; copy "
                              "the input elsewhere or choose another output path")
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            raise OutputError(f"cannot write {path}: {path.parent} is a file, not a directory")
        return path
    if path.is_dir() and kind != "file" and not any(path.iterdir()):
        return path  # an empty directory: nothing to lose
    if not overwrite:
        raise OutputError(f"{path} already exists; choose a new path"
                          + (" or pass --overwrite to replace it" if offers_overwrite else ""))
    if kind == "file":
        if not path.is_file():
            raise OutputError(f"{path} exists and is not a regular file; choose a file path")
        return path
    if not path.is_dir():
        raise OutputError(f"{path} exists and is a file, not a directory; choose a new directory")
    found = _kind_of(path)
    if found is None:
        raise OutputError(f"{path} exists and was not written by moekit; --overwrite only replaces moekit's own "
                          "outputs. Remove it yourself or choose a new directory")
    if found != kind:
        raise OutputError(f"{path} holds a moekit {found}, not a {kind}; --overwrite only replaces an output of "
                          "the same kind. Choose another directory")
    return path


def _locked(path: Path) -> int | None:
    """An open descriptor on ``path`` holding an exclusive lock, or None if another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(out: Path) -> list[Path]:
    """Remove temporaries of ``out`` left by killed runs (those no running process holds); return them."""
    if fcntl is None or not out.parent.is_dir():
        return []
    removed = []
    for candidate in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        match = _LEFTOVER.fullmatch(candidate.name)
        if not match or match["name"] != out.name or candidate.is_symlink():
            continue
        try:
            fd = _locked(candidate)
        except OSError:
            continue
        if fd is None:  # a running moekit is writing it
            continue
        try:
            _remove(candidate)
        finally:
            os.close(fd)
        removed.append(candidate)
    if removed:
        log.warning("removed %d leftover temporar%s of an interrupted run beside %s: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", out, ", ".join(p.name for p in removed))
    return removed


def _temp_path(out: Path) -> Path:
    return out.parent / f".{out.name}.{TEMP_TAG}-{uuid.uuid4().hex[:8]}"


def _marker(kind: str) -> str:
    import moekit

    return json.dumps({"kind": kind, "written_by": f"moekit {moekit.__version__}"}, sort_keys=True) + "\n"


@contextmanager
def _held_temporary(out: Path, make: Callable[[Path], None]) -> Iterator[Path]:
    """A new temporary beside ``out`` (made by ``make``), locked while in use, removed if the block fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = _temp_path(out)
    make(tmp)
    fd = _locked(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def writing_directory(out: str | Path, kind: OutputKind) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes ``out`` (replacing what was there),
    with the ``kind`` marker; on any failure (or interrupt) it is removed and ``out`` is untouched.

    ``out`` must have passed :func:`check_output`."""
    out = Path(out)
    with _held_temporary(out, Path.mkdir) as tmp:
        yield tmp
        (tmp / MARKER_FILE).write_text(_marker(kind))
        _follow_umask(tmp)
        _replace(tmp, out)


def _current_umask() -> int:
    """The process umask, read from /proc where it can be (setting it to read it back races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(tmp: Path) -> None:
    """Give every file written into ``tmp`` the permissions a plain ``open`` would: some writers (transformers'
    ``save_pretrained`` among them) write through private temporary files, mode 0600, which would leave a checkpoint
    that another account on the machine (a serving process, a colleague) cannot read. Only missing read/write bits
    the umask allows are added; nothing is taken away."""
    allowed = 0o666 & ~_current_umask()
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode & 0o7777
            if mode | allowed != mode:
                path.chmod(mode | allowed)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` onto ``out``; an existing ``out`` is moved aside first, then removed."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.moekit-old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    _remove(old)


@contextmanager
def writing_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; on success it replaces ``out`` atomically; on failure it is
    removed. ``out`` must have passed :func:`check_output`."""
    out = Path(out)
    with _held_temporary(out, Path.touch) as tmp:
        yield tmp
        os.replace(tmp, out)


def write_text_file(out: str | Path, text: str) -> Path:
    """Write ``text`` to the already checked ``out`` atomically."""
    with writing_file(out) as tmp:
        tmp.write_text(text)
    return Path(out)


def write_json_file(out: str | Path, data: object, *, indent: int = 1, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON to the already checked ``out`` atomically."""
    return write_text_file(out, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")
