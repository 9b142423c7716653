"""How many CPUs this process may use: what a Generator replica's torch threads and a batch
job's per-actor threads are sized from."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a
    container's ``--cpus``) where one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):       # not Linux
        cpus = os.cpu_count() or 1
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),                       # cgroup v2
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = open(quota_file).read().split()
            quota, period = fields[0], fields[1] if period_file is None else open(period_file).read().strip()
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1") and float(period) > 0:
            cpus = min(cpus, -int(-float(quota) // float(period)))
        break
    return max(1, cpus)
