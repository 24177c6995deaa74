"""How many threads torch uses for CPU training.

torch runs one OpenMP thread per core, and those threads spin-wait for each other between
operations. When another process holds one of the cores, every parallel operation waits for the
descheduled thread: measured on a 2-core machine with one core busy, a step of small matmuls took
164-192 ms on 2 threads against 37 ms on 1 (20 ms on 2 threads with both cores free). So, unless
told otherwise (--cpu-threads, or OMP_NUM_THREADS in the environment, which `ember launch` sets to 1
for several ranks per node), the trainer leaves out the cores that other work keeps busy when it
starts. In a container with a CPU quota (docker --cpus, a Kubernetes CPU limit) torch still sees
every core of the host; there the quota sets the count instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


def _usable_cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _cpu_times(cpus: set[int], stat_path: str) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each CPU in `cpus`, from /proc/stat."""
    times = {}
    with open(stat_path) as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            cpu = int(name[3:])
            if cpu in cpus:
                # user nice system idle iowait irq softirq steal (guest time is inside user)
                values = [int(v) for v in fields[:8]]
                idle = values[3] + values[4]
                times[cpu] = (sum(values) - idle, sum(values))
    return times


def busy_cpus(window_s: float = 0.1, stat_path: str = "/proc/stat") -> float | None:
    """How many of this process's CPUs other work keeps busy, measured over `window_s` while this
    process sleeps: 0.0 (all free) to the number of CPUs. None where /proc/stat is unavailable."""
    cpus = _usable_cpus()
    try:
        before = _cpu_times(cpus, stat_path)
        time.sleep(window_s)
        after = _cpu_times(cpus, stat_path)
    except (OSError, ValueError):
        return None
    busy = 0.0
    for cpu, (busy_after, total_after) in after.items():
        busy_before, total_before = before.get(cpu, (busy_after, total_after))
        if total_after > total_before:
            busy += (busy_after - busy_before) / (total_after - total_before)
    return busy


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 `cpu.max`, or v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), or None when there is none."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            with open(os.path.join(root, folder, "cpu.cfs_quota_us")) as f:
                quota = int(f.read())
            with open(os.path.join(root, folder, "cpu.cfs_period_us")) as f:
                period = int(f.read())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


@dataclass
class ThreadChoice:
    threads: int
    reason: str


def choose_cpu_threads(requested: int | None, current: int, busy: float | None,
                       cores: int | None = None) -> ThreadChoice:
    """`requested` (--cpu-threads) when given; else torch's current count lowered by the cores
    that other work keeps busy (`busy`, None: unknown)."""
    if requested is not None:
        return ThreadChoice(requested, "--cpu-threads")
    if busy is None:
        return ThreadChoice(current, "torch's setting")
    cores = cores or len(_usable_cpus())
    taken = min(cores, round(busy))
    free = max(1, cores - taken)
    if free >= current:
        return ThreadChoice(current, f"{cores - taken} of {cores} cores free")
    return ThreadChoice(free, f"other work keeps {taken} of {cores} cores busy (--cpu-threads overrides)")


def set_cpu_threads(requested: int | None) -> ThreadChoice:
    """Choose the thread count (see `choose_cpu_threads`) and apply it to torch."""
    import torch

    current = torch.get_num_threads()
    if requested is None and "OMP_NUM_THREADS" in os.environ:
        return ThreadChoice(current, "OMP_NUM_THREADS")
    quota = cgroup_cpu_quota() if requested is None else None
    if quota is not None and quota < current:  # the host's load is not ours to count here
        threads = max(1, int(quota))
        torch.set_num_threads(threads)
        return ThreadChoice(threads, f"a CPU quota of {quota:g} core(s); --cpu-threads overrides")
    measure = requested is None and current > 1  # one thread never waits for another
    choice = choose_cpu_threads(requested, current, busy_cpus() if measure else None)
    if choice.threads != current:
        torch.set_num_threads(choice.threads)
    return choice
