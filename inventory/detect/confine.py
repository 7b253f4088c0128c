"""What this process may use, as opposed to what the host has.

    usable CPUs  = min(len(sched_getaffinity(0)), ceil(cgroup quota / period))
    memory limit = the lowest cgroup limit on the way from this process's cgroup to the root
                   (v1 memory.limit_in_bytes, v2 memory.max), when below the host's RAM

A container or `taskset` confines a process without changing /proc/meminfo or
/proc/cpuinfo, so a plan made from the host's figures can be OOM-killed. The
cgroup paths come from /proc/self/cgroup and the mounts from
/proc/self/mountinfo, so hybrid (v1 + v2) hosts and containers are read right.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

_NO_LIMIT = 2**62  # v1 writes "no limit" as a huge page-rounded number


@dataclass
class Cgroup:
    version: int
    controllers: set[str]
    mount: Path
    path: str   # this process's cgroup, relative to the mount

    def dirs(self) -> list[Path]:
        """This cgroup's folder and its ancestors up to the mount, innermost first."""
        parts = [p for p in self.path.strip("/").split("/") if p]
        return [self.mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroups(proc: Path = Path("/proc/self")) -> list[Cgroup]:
    """The cgroup hierarchies this process is in, with where each is mounted."""
    try:
        membership = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    where: dict[tuple[int, frozenset[str]], tuple[Path, str]] = {}
    for line in mounts:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        version = 2 if tail[0] == "cgroup2" else 1
        ctrls = frozenset() if version == 2 else frozenset(
            o for o in tail[2].split(",") if o not in ("rw", "ro") and "=" not in o)
        where.setdefault((version, ctrls), (Path(fields[4]), fields[3]))
    found = []
    for line in membership:
        _hid, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        version = 2 if not names else 1
        ctrls = frozenset() if version == 2 else frozenset(n for n in names.split(",") if "=" not in n)
        if not ctrls and version == 1:
            continue
        hit = where.get((version, ctrls))
        if hit is None:
            continue
        mount, root = hit
        rel = path[len(root):] if root != "/" and path.startswith(root) else path
        found.append(Cgroup(version, set(ctrls), mount, rel))
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def memory_limit(groups: list[Cgroup] | None = None) -> tuple[int, str] | None:
    """(bytes, where) for the lowest cgroup memory limit over this process, or None."""
    best: tuple[int, str] | None = None
    for g in cgroups() if groups is None else groups:
        if g.version == 1 and "memory" not in g.controllers:
            continue
        name = "memory.max" if g.version == 2 else "memory.limit_in_bytes"
        for d in g.dirs():
            limit = _read_int(d / name)
            if limit is not None and 0 < limit < _NO_LIMIT and (best is None or limit < best[0]):
                best = (limit, f"cgroup v{g.version} {d / name}")
    return best


def memory_usage(where: str) -> int | None:
    """Bytes charged to the cgroup whose limit file is named in `where` (from memory_limit)."""
    path = Path(where.split(" ", 2)[-1])
    name = "memory.current" if path.name == "memory.max" else "memory.usage_in_bytes"
    return _read_int(path.with_name(name))


def cpu_quota(groups: list[Cgroup] | None = None) -> tuple[float, str] | None:
    """(CPUs' worth of time, where) for the tightest cgroup CPU quota, or None."""
    best: tuple[float, str] | None = None
    for g in cgroups() if groups is None else groups:
        if g.version == 1 and "cpu" not in g.controllers:
            continue
        for d in g.dirs():
            if g.version == 2:
                try:
                    words = (d / "cpu.max").read_text().split()
                except OSError:
                    continue
                quota = int(words[0]) if words and words[0].isdigit() else None
                period = int(words[1]) if len(words) > 1 and words[1].isdigit() else 100000
                name = d / "cpu.max"
            else:
                quota, period = _read_int(d / "cpu.cfs_quota_us"), _read_int(d / "cpu.cfs_period_us")
                name = d / "cpu.cfs_quota_us"
            if quota is not None and quota > 0 and period:
                cpus = quota / period
                if best is None or cpus < best[0]:
                    best = (cpus, f"cgroup v{g.version} {name}")
    return best


def usable_cpus(host_threads: int) -> tuple[int, str]:
    """(CPUs this process can keep busy, why): the affinity mask and any cgroup quota."""
    n, why = host_threads, "all of the host's CPUs"
    try:
        mask = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mask = None
    if mask is not None and mask < n:
        n, why = mask, f"CPU affinity mask ({mask} of {host_threads})"
    quota = cpu_quota()
    if quota is not None and math.ceil(quota[0]) < n:
        n, why = max(1, math.ceil(quota[0])), f"{quota[1]} ({quota[0]:g} CPUs of time)"
    return n, why
