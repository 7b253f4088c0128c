"""Memory: total and available, from psutil (under a millisecond), within any cgroup limit.

    host  = psutil.virtual_memory()
    limit = the lowest cgroup memory limit over this process (inventory.detect.confine)
    total = min(host total, limit);  available = min(host available, limit - cgroup usage)

A container's /proc/meminfo shows the host's RAM; the limit is what the OOM
killer enforces, so the planner must see that one. The host's figure is kept beside it.
"""
from __future__ import annotations

from inventory.profile import Memory


def detect() -> Memory:
    import psutil

    from inventory.detect import confine

    vm = psutil.virtual_memory()
    try:
        swap = psutil.swap_memory().total
    except (OSError, RuntimeError):  # some containers hide swap
        swap = None
    limit = confine.memory_limit()
    if limit is None or limit[0] >= vm.total:
        return Memory(total_bytes=vm.total, available_bytes=vm.available, swap_bytes=swap)
    used = confine.memory_usage(limit[1]) or 0
    return Memory(total_bytes=limit[0], available_bytes=max(0, min(vm.available, limit[0] - used)),
                  swap_bytes=swap, host_total_bytes=vm.total, limit_source=limit[1])
