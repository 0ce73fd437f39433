"""How many CPU cores this process may use: the one count every thread pool is sized by.

``os.cpu_count()`` is the machine's cores. A container limited to 4 CPUs on a 64-core node sees 64,
and a pool of 64 busy threads there is throttled by the kernel every scheduling period (and a
forward pass waits for its slowest thread). So the count is the process's CPU affinity (``taskset``,
cpusets), capped by its cgroup's CPU quota: cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``, at the process's own cgroup and every cgroup above it (Kubernetes'
``limits.cpu`` is such a quota). A fractional quota rounds down (busy threads beyond it would be
throttled), to at least one core.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@functools.lru_cache(maxsize=8)
def usable_cores(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPU cores this process may run on at once: its affinity, capped by a cgroup CPU quota; at least 1.

    Read once (a few files, about 0.2 ms) and kept: pools are sized from it at start-up, and the
    decode window asks on every request; a count that changed later would disagree with the pools."""
    cores = _affinity()
    quota = cgroup_cpu_quota(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_cpu_quota(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time per period the process's cgroups allow (the smallest quota along its
    path, v2 or v1), or None where none is set or none can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            quotas += _quotas_along(cgroup_root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's hierarchy
            mount = _v1_cpu_mount(cgroup_root, controllers)
            if mount is not None:
                quotas += _quotas_along(mount, path, _v1_quota)
    return min(quotas) if quotas else None


def _v1_cpu_mount(cgroup_root: Path, controllers: str) -> Path | None:
    for name in (controllers, "cpu,cpuacct", "cpu"):
        if (cgroup_root / name).is_dir():
            return cgroup_root / name
    return None


def _quotas_along(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas set at ``path`` (a cgroup path as /proc/self/cgroup gives it) and above, under ``mount``.

    Inside a container the namespaced path is "/" and the mount is the container's own cgroup."""
    quotas = []
    relative = PurePosixPath(path or "/").relative_to("/")
    for parts in range(len(relative.parts), -1, -1):
        directory = mount.joinpath(*relative.parts[:parts])
        quota = read(directory)
        if quota is not None:
            quotas.append(quota)
    return quotas


def _v2_quota(directory: Path) -> float | None:
    """``cpu.max``: "<quota> <period>" in microseconds, quota "max" for none."""
    fields = _read(directory / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``."""
    return _ratio(_read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us"))


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def use_torch_threads(threads: int) -> None:
    """Run the calling thread's torch operators on ``threads`` intra-op threads (its own OpenMP team).

    torch keeps one process-wide count, which a thread reads once, at its first parallel operator,
    and ``torch.set_num_threads`` sets that count as well as the calling thread's own: a decode
    thread that asks for one left every thread started after it on one (a model loaded or a
    fine-tuned head started later ran torch's forward passes on a single core). So every thread
    that computes in torch says what it wants when it starts, and none relies on the count.
    """
    import torch  # here: protocol front ends size their pools by this module and never load torch

    torch.set_num_threads(threads)
