"""Torch threads under a CPU quota: `--threads 0` takes no more threads than a cgroup quota allows."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from adaptation import cli

from wyoming_tinyalign.cpus import cpu_quota

V1_CPU = Path("/sys/fs/cgroup/cpu")


@pytest.fixture
def half_a_cpu() -> Iterator[Path]:
    """A real cgroup (v1 `cpu` controller) allowing half a CPU's time."""
    if not os.access(V1_CPU, os.W_OK) or not (V1_CPU / "cpu.cfs_quota_us").is_file():
        pytest.skip("needs root and a writable cgroup v1 cpu controller")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: torch runs one thread anyway")
    folder = V1_CPU / f"tinyalign-test-{os.getpid()}"
    folder.mkdir()
    try:
        (folder / "cpu.cfs_quota_us").write_text(str(int((folder / "cpu.cfs_period_us").read_text()) // 2))
        yield folder
    finally:
        folder.rmdir()


def _cli_log(cgroup: Path, tmp_path: Path, *flags: str) -> str:
    """What a command run inside `cgroup` logs (`rollback` on an empty data dir: it fails at once)."""
    join = lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731
    done = cli("rollback", "--data-dir", str(tmp_path), *flags, timeout=120, preexec_fn=join)
    assert "nothing to roll back" in done.stderr, done.stderr
    return done.stderr


def test_a_command_runs_as_many_threads_as_a_cpu_quota_allows(half_a_cpu: Path, tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert f"a CPU quota of 0.5 CPUs (cgroup): 1 torch thread, not {cpus}" in _cli_log(half_a_cpu, tmp_path)
    assert "CPU quota" not in _cli_log(half_a_cpu, tmp_path, "--threads", "2")  # (as many as asked for)


def test_the_quota_is_the_smallest_from_the_process_cgroup_up(tmp_path: Path) -> None:
    """cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us`), nested, and as a container sees them: its own
    cgroup at the mount's root, under a path that names the host's."""
    root, membership = tmp_path / "fs", tmp_path / "cgroup"

    def cgroup(folder: Path, **files: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name.replace("_", ".", 1)).write_text(text)

    membership.write_text("0::/household/assistant\n")
    cgroup(root / "household", cpu_max="150000 100000\n")
    cgroup(root / "household" / "assistant", cpu_max="max 100000\n")
    assert cpu_quota(root, membership) == 1.5
    (root / "household" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(root, membership) is None  # (no quota anywhere)

    membership.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    cgroup(root / "cpu,cpuacct", cpu_cfs_quota_us="-1\n", cpu_cfs_period_us="100000\n")
    assert cpu_quota(root, membership) is None
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("50000\n")  # the container's, at the root
    assert cpu_quota(root, membership) == 0.5
    assert cpu_quota(root, tmp_path / "no-such-file") is None
    membership.write_text("garbage\n0::/odd\n")  # (what cannot be read is no quota, not an error)
    cgroup(root / "odd", cpu_max="100000 0\n")
    assert cpu_quota(root, membership) is None
