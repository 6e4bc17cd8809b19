"""The CPU time a cgroup quota allows this process (`docker run --cpus`, a Kubernetes CPU limit).

torch sizes its thread pool by the CPUs the process may run on (its affinity); a quota does not shrink
those, it throttles the whole group once its threads have used their share of each period, and
threads that wait on each other then wait on throttled ones. At real-size shapes on 2 cores under a
quota of 1 CPU an answer took 1185 ms on 2 threads and 982 on 1 (benchmarks/RESULTS.md, "Under a CPU
quota").
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> float | None:
    """CPUs' worth of time per period that this process's cgroups allow: the smallest quota from its
    cgroup up to the hierarchy's root, in cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` over
    `cpu.cfs_period_us`). None: no quota, or nothing to read (not Linux, no cgroup file system)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if not controllers:  # v2: one hierarchy (at the root, or beside v1 controllers in "unified")
            mounts, read = [root, root / "unified"], _v2_quota
        elif "cpu" in controllers.split(","):
            mounts, read = [root / controllers, root / "cpu"], _v1_quota
        else:
            continue
        for mount in dict.fromkeys(mounts):  # (`cpu` and the line's controllers may be one folder)
            # A container sees its own cgroup at the mount's root, whatever path the host gave it.
            level = mount / path.lstrip("/")
            while True:
                if (quota := read(level)) is not None:
                    quotas.append(quota)
                if level == mount or mount not in level.parents:
                    break
                level = level.parent
    return min(quotas, default=None)


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        quota_us, period_us = (None if quota == "max" else int(quota)), int(period)
    except (OSError, ValueError):
        return None
    return None if quota_us is None or period_us <= 0 else quota_us / period_us


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
