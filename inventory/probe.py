"""The probe: run every detector in parallel, each with its own timeout.

    profile = assemble(run every detector, each with its deadline)
    benchmark(profile)                      unless --no-bench
    keep_earlier(profile, previous file)    calibration history; with --no-bench, the measured figures

A detector that is missing its source, raises, or hangs leaves its field empty
and says why in `profile.probe.detectors`; the probe itself always finishes and
always returns a valid Profile. Detectors run in daemon threads so that one
stuck in a driver call cannot hold the process open after we give up on it.
"""
from __future__ import annotations

import datetime as dt
import functools
import platform
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from inventory import __version__
from inventory.detect import MDNS_WAIT, Found, Unavailable
from inventory.profile import DetectorStatus, Figure, Host, ProbeInfo, Profile

Detector = Callable[[], Any]

# Seconds each detector may take. GPU drivers can be slow to wake (nvidia-smi
# takes 2-30 s on a cold driver); everything else answers in milliseconds.
TIMEOUTS = {"cpu": 3.0, "memory": 2.0, "gpu": 10.0, "boards": 3.0, "sbc": 2.0, "peers": 15.0,
            "bench_cpu": 30.0, "bench_gpu": 60.0}
SECTIONS = {"cpu": "cpu", "memory": "memory", "gpu": "gpus", "boards": "boards", "sbc": "sbc", "peers": "peers"}


@dataclass
class Outcome:
    value: Any
    status: DetectorStatus


def default_detectors(peers: list[str] | tuple[str, ...] = (), mdns_wait: float = MDNS_WAIT,
                      discover: bool = True) -> dict[str, Detector]:
    from inventory.detect import boards, cpu, gpu, memory, sbc

    found: dict[str, Detector] = {"cpu": cpu.detect, "memory": memory.detect, "gpu": gpu.detect,
                                  "boards": boards.detect, "sbc": sbc.detect}
    if discover or peers:
        from inventory.detect import peers as peers_mod

        found["peers"] = functools.partial(peers_mod.detect, manual=list(peers),
                                           mdns_wait=mdns_wait if discover else 0.0)
    else:
        found["peers"] = lambda: Found([], "not looked for (--no-discover and no --peer)")
    return found


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, dict)) and not value)


def _call(fn: Detector) -> tuple[Any, str, str | None]:
    try:
        result = fn()
    except Unavailable as exc:
        return None, "empty", str(exc) or "source not available"
    except BaseException as exc:  # a detector must never take the probe down
        return None, "error", f"{type(exc).__name__}: {exc}".strip()
    if isinstance(result, Found):
        return result.value, ("empty" if _empty(result.value) else "ok"), result.note
    return result, ("empty" if _empty(result) else "ok"), None


def run_detectors(detectors: dict[str, Detector], timeouts: dict[str, float] | None = None,
                  on_done: Callable[[str, DetectorStatus], None] | None = None) -> dict[str, Outcome]:
    """Start every detector at once; wait for each until its own deadline."""
    timeouts = {**TIMEOUTS, **(timeouts or {})}
    slots: dict[str, tuple[Any, str, str | None, float]] = {}
    threads = {}
    start = time.perf_counter()
    for name, fn in detectors.items():
        def work(name: str = name, fn: Detector = fn) -> None:
            t = time.perf_counter()
            value, status, reason = _call(fn)
            slots[name] = (value, status, reason, time.perf_counter() - t)
        th = threading.Thread(target=work, name=f"tierkit-detect-{name}", daemon=True)
        th.start()
        threads[name] = th
    out: dict[str, Outcome] = {}
    for name, th in threads.items():
        limit = timeouts.get(name, 10.0)
        th.join(max(0.0, start + limit - time.perf_counter()))
        if name in slots:
            value, status, reason, sec = slots[name]
        else:
            value, status, sec = None, "timeout", limit
            reason = f"no answer within {limit:g} s (its source hung); the rest of the probe went on"
        out[name] = Outcome(value, DetectorStatus(status=status, seconds=round(sec, 4), reason=reason))
        if on_done:
            on_done(name, out[name].status)
    return out


def host() -> Host:
    return Host(hostname=socket.gethostname(), os=platform.platform(terse=True),
                kernel=platform.release(), python=platform.python_version(), tierkit=__version__)


def assemble(outcomes: dict[str, Outcome], name: str | None = None) -> Profile:
    """Build a valid Profile; a section a detector got wrong is dropped with the reason."""
    fields = {SECTIONS.get(k, k): o.value for k, o in outcomes.items()
              if SECTIONS.get(k) and not _empty(o.value)}
    statuses = {k: o.status for k, o in outcomes.items()}
    while True:
        try:
            return Profile(name=name or socket.gethostname(), host=host(), **fields,
                           probe=ProbeInfo(when=dt.datetime.now(dt.timezone.utc), seconds=0, detectors=statuses))
        except ValidationError as exc:
            bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
            bad &= set(fields)
            if not bad:
                raise
            for section in bad:
                det = next(k for k, v in SECTIONS.items() if v == section)
                fields.pop(section)
                statuses[det] = DetectorStatus(status="error", seconds=statuses[det].seconds,
                                               reason=f"returned data that does not fit the profile ({section})")


def benchmark(profile: Profile, timeouts: dict[str, float] | None = None,
              on_done: Callable[[str, DetectorStatus], None] | None = None) -> None:
    """Measure achieved FLOP/s and bandwidth, in place; one benchmark at a time (they compete)."""
    from inventory import bench

    def cpu_bench() -> Found:
        if profile.cpu is None:
            raise Unavailable("no CPU section to attach figures to")
        c = profile.cpu
        c.matmul_gflops["fp32"] = bench.cpu_matmul("float32")
        c.matmul_gflops["fp64"] = bench.cpu_matmul("float64")
        size = bench.bandwidth_array_bytes(c.caches.l3, profile.memory.available_bytes if profile.memory else None)
        c.memory_bandwidth_gbs = bench.cpu_bandwidth(size, threads=c.physical_cores)
        ratio = c.matmul_gflops["fp32"].value / c.peak_fp32_gflops.value if c.peak_fp32_gflops else None
        return Found(True, f"fp32 matmul at {ratio:.0%} of theoretical peak" if ratio else None)

    def gpu_bench() -> Found:
        usable = [g for g in profile.gpus if g.backend in ("cuda", "mps")]
        if not usable:
            raise Unavailable("no CUDA or MPS GPU to measure")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise Unavailable("torch not installed: `pip install 'tierkit[tier2]'` to measure the GPU") from None
        for g in usable:
            bench.gpu(g)
        return Found(True, f"measured {len(usable)} GPU(s) with torch")

    jobs = {"bench_cpu": cpu_bench, "bench_gpu": gpu_bench}
    for name, fn in jobs.items():  # sequential: two benchmarks at once would skew both
        outcome = run_detectors({name: fn}, timeouts, on_done)[name]
        assert profile.probe is not None
        profile.probe.detectors[name] = outcome.status


def probe(*, bench: bool = True, peers: list[str] | tuple[str, ...] = (), mdns_wait: float = MDNS_WAIT,
          discover: bool = True, detectors: dict[str, Detector] | None = None,
          timeouts: dict[str, float] | None = None, name: str | None = None,
          on_done: Callable[[str, DetectorStatus], None] | None = None) -> Profile:
    t = time.perf_counter()
    found = default_detectors(peers, mdns_wait, discover)
    found.update(detectors or {})
    profile = assemble(run_detectors(found, timeouts, on_done), name)
    if bench:
        benchmark(profile, timeouts, on_done)
    assert profile.probe is not None
    profile.probe.seconds = round(time.perf_counter() - t, 3)
    return profile


def keep_earlier(profile: Profile, previous: Path, measured: bool) -> Profile:
    """Carry over what a new probe cannot know from the profile it replaces, in place.

    The calibration records are what this machine's runs taught the planner: a
    re-probe (after attaching a board, say) keeps them. A probe without benchmarks
    (`measured=False`) keeps the earlier measured figures too, each marked with when
    it was measured. An unreadable earlier file is simply replaced.
    """
    from inventory.profile import ProfileError, load

    try:
        old = load(previous) if Path(previous).is_file() else None
    except ProfileError:
        old = None
    if old is None:
        return profile
    profile.calibration = [*old.calibration, *profile.calibration]
    if measured:
        return profile
    when = old.probe.when if old.probe else None

    def kept(fig: Figure | None) -> Figure | None:
        if fig is None or fig.source != "measured":
            return None
        return fig.model_copy(update={"when": fig.when or when})

    # the same CPU with the same number usable: figures measured under another affinity mask or quota do not carry
    if profile.cpu and old.cpu and (profile.cpu.model, profile.cpu.usable_cpus) == (old.cpu.model, old.cpu.usable_cpus):
        for dtype, fig in old.cpu.matmul_gflops.items():
            if dtype not in profile.cpu.matmul_gflops and (k := kept(fig)):
                profile.cpu.matmul_gflops[dtype] = k
        profile.cpu.memory_bandwidth_gbs = profile.cpu.memory_bandwidth_gbs or kept(old.cpu.memory_bandwidth_gbs)
    for g in profile.gpus:
        twin = next((o for o in old.gpus if o.model == g.model and o.index == g.index), None)
        if twin is None:
            continue
        for dtype, fig in twin.matmul_tflops.items():
            if dtype not in g.matmul_tflops and (k := kept(fig)):
                g.matmul_tflops[dtype] = k
        g.memory_bandwidth_gbs = g.memory_bandwidth_gbs or kept(twin.memory_bandwidth_gbs)
    return profile
