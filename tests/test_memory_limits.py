"""The memory a run may use: a cgroup's limit (containers, schedulers) counts, not only the machine's free RAM."""

from __future__ import annotations

from pathlib import Path

from moekit.model_io import cgroup_memory_free


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_limit_minus_usage_with_inactive_cache_counted_free(tmp_path) -> None:
    root = tmp_path / "cgroup"
    job = root / "memory" / "jobs" / "42"
    _write(job / "memory.limit_in_bytes", "8000\n")
    _write(job / "memory.usage_in_bytes", "5000\n")
    _write(job / "memory.stat", "cache 3000\ntotal_inactive_file 1000\nrss 2000\n")
    _write(job.parent / "memory.limit_in_bytes", "9223372036854771712\n")  # the parent: unlimited
    _write(job.parent / "memory.usage_in_bytes", "7000\n")
    membership = tmp_path / "cgroup-of-self"
    membership.write_text("5:devices:/\n4:memory:/jobs/42\n0::/\n")
    assert cgroup_memory_free(root, membership) == 8000 - 5000 + 1000


def test_cgroup_v2_the_tightest_ancestor_wins(tmp_path) -> None:
    root = tmp_path / "cgroup"
    leaf = root / "user.slice" / "job"
    _write(leaf / "memory.max", "max\n")
    _write(leaf / "memory.current", "100\n")
    _write(leaf.parent / "memory.max", "1000\n")
    _write(leaf.parent / "memory.current", "600\n")
    _write(leaf.parent / "memory.stat", "anon 500\ninactive_file 50\n")
    membership = tmp_path / "cgroup-of-self"
    membership.write_text("0::/user.slice/job\n")
    assert cgroup_memory_free(root, membership) == 1000 - 600 + 50


def test_no_limit_or_no_cgroups_means_unknown(tmp_path) -> None:
    membership = tmp_path / "cgroup-of-self"
    membership.write_text("0::/\n")
    assert cgroup_memory_free(tmp_path / "none", membership) is None
    assert cgroup_memory_free(tmp_path, tmp_path / "missing") is None
