"""The cores thread pools are sized by: CPU affinity capped by a cgroup CPU quota (service/host/cpus.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import tritonclient.grpc as triton

from service.config import RuntimeConfig
from service.host.cpus import cgroup_cpu_quota, usable_cores
from tests.support.servers import start_server
from tests.test_instances import pixels_input

T = TypeVar("T")


def cgroup_tree(root: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup under ``root`` holding ``files`` (path: content), and a
    /proc/self/cgroup of one line."""
    for name, content in files.items():
        path = root / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    proc = root / "cgroup"
    proc.write_text(proc_line + "\n")
    return root / "sys", proc


def quota(root: Path, proc_line: str, files: dict[str, str]) -> float | None:
    mount, proc = cgroup_tree(root, proc_line, files)
    return cgroup_cpu_quota(cgroup_root=mount, proc_cgroup=proc)


def test_v2_quota_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    """A pod's limit sits on the pod's cgroup, above the container's ("max": none)."""
    files = {
        "kubepods/pod1/cpu.max": "400000 100000",
        "kubepods/pod1/ctr/cpu.max": "max 100000",
        "kubepods/cpu.max": "max 100000",
    }
    assert quota(tmp_path, "0::/kubepods/pod1/ctr", files) == 4.0


def test_v2_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    """Inside a container the path is "/" and the mount is the container's own cgroup."""
    assert quota(tmp_path, "0::/", {"cpu.max": "150000 100000"}) == 1.5


def test_v1_quota_and_its_absence(tmp_path: Path) -> None:
    line = "4:cpu,cpuacct:/docker/abc"
    limited = {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
    }
    assert quota(tmp_path / "limited", line, limited) == 2.0
    unlimited = {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}
    assert quota(tmp_path / "unlimited", line, unlimited) is None


@pytest.mark.parametrize(
    "files",
    [
        {},  # no cgroup files at all
        {"cpu.max": "garbage"},
        {"cpu.max": "0 100000"},
        {"cpu.max": "100000 0"},
        {"cpu.max": ""},
    ],
)
def test_unreadable_or_odd_quotas_are_no_quota(tmp_path: Path, files: dict[str, str]) -> None:
    assert quota(tmp_path, "0::/", files) is None


def test_no_proc_file_is_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(cgroup_root=tmp_path, proc_cgroup=tmp_path / "missing") is None


def test_a_quota_caps_the_cores_rounding_down_to_at_least_one(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    for cpu_max, expected in [("50000 100000", 1), ("150000 100000", 1), ("max 100000", affinity)]:
        mount, proc = cgroup_tree(tmp_path / cpu_max.replace(" ", "-"), "0::/", {"cpu.max": cpu_max})
        assert usable_cores(cgroup_root=mount, proc_cgroup=proc) == min(affinity, expected)


def test_affinity_caps_the_cores() -> None:
    """A process pinned to one core (taskset, a cpuset) counts one, whatever the machine has."""
    one = min(os.sched_getaffinity(0))
    script = (
        f"import os; os.sched_setaffinity(0, {{{one}}}); "
        "from service.host.cpus import usable_cores; print(usable_cores())"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "1"


def pinned(cores: set[int], start: Callable[[], T]) -> T:
    """Run ``start()`` in a thread pinned to ``cores``: a process it spawns inherits the pinning."""
    result: list[T] = []

    def run() -> None:
        os.sched_setaffinity(0, cores)
        result.append(start())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin a server to one")
def test_server_pinned_to_one_core_sizes_its_pools_by_it(tmp_path: Path, weights_dir: Path) -> None:
    """With --instances 2 on one usable core: one thread per forward pass and no lone-batch session
    (it would be the same single thread again); answers still come."""
    one = {min(os.sched_getaffinity(0))}
    args = ("--models", "alexnet", "--weights", str(weights_dir), "--device", "cpu", "--instances", "2")
    proc = pinned(one, lambda: start_server(tmp_path, *args))
    try:
        proc.wait_serving()
        log = proc.log()
        assert re.search(
            r"alexnet runs on onnxruntime \(cpu\) in float32, 2 instances each; CPU threads per forward pass: 1\n", log
        )
        with triton.InferenceServerClient(proc.target) as client:
            result = client.infer("alexnet", [pixels_input(0)])
        assert result.as_numpy("LOGITS").shape == (1, 1000)
        assert proc.alive()
    finally:
        proc.stop()
    proc.assert_no_traceback()


def test_runtime_config_counts_usable_cores() -> None:
    cores = usable_cores()
    assert RuntimeConfig().instance_threads == cores
    assert RuntimeConfig(instances=2).instance_threads == max(1, cores // 2)
    assert RuntimeConfig(instances=2).lone_threads == (cores if cores > 1 else None)
    assert RuntimeConfig(instances=2, threads=1).lone_threads is None
