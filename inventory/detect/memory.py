"""Memory: total and available, from psutil (under a millisecond)."""
from __future__ import annotations

from inventory.profile import Memory


def detect() -> Memory:
    import psutil

    vm = psutil.virtual_memory()
    try:
        swap = psutil.swap_memory().total
    except (OSError, RuntimeError):  # some containers hide swap
        swap = None
    return Memory(total_bytes=vm.total, available_bytes=vm.available, swap_bytes=swap)
