"""CPU: model, topology, SIMD, caches, clock and the theoretical peak.

Fast path: /proc/cpuinfo and sysfs (microseconds), `lscpu -J` for what they
lack (a few ms; ARM model names live there). py-cpuinfo is only a fallback: it
sleeps a second to estimate the clock, so it stays off the fast path.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

from inventory.detect import Unavailable, confine, read_text
from inventory.profile import CPU, Caches, Figure

# x86 /proc/cpuinfo flags and ARM "Features" words -> the names people use.
_SIMD = {
    "sse4_2": "SSE4.2", "avx": "AVX", "avx2": "AVX2", "fma": "FMA",
    "avx512f": "AVX-512", "avx512_bf16": "AVX-512-BF16", "avx512_fp16": "AVX-512-FP16",
    "avx512_vnni": "AVX-512-VNNI", "avx_vnni": "AVX-VNNI",
    "amx_tile": "AMX", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8",
    "asimd": "NEON", "neon": "NEON", "asimddp": "NEON-DOTPROD", "i8mm": "I8MM", "bf16": "BF16",
    "sve": "SVE", "sve2": "SVE2", "sme": "SME",
}


# ARM /proc/cpuinfo gives "CPU implementer" and "CPU part", not a model name.
_ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd05"): "Cortex-A55", ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x41", "0xd46"): "Cortex-A510", ("0x41", "0xd47"): "Cortex-A710", ("0x61", "0x022"): "Apple M1",
}


def _parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per processor block."""
    blocks, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, _, val = line.partition(":")
        cur[key.strip().lower()] = val.strip()
    if cur:
        blocks.append(cur)
    return blocks


def _size(text: str | None) -> int | None:
    """'48K' / '2048K' / '32 MiB (1 instance)' -> bytes."""
    if not text:
        return None
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)(i?B)?", text)
    if not m:
        return None
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
    return int(float(m.group(1)) * mult)


def _caches(cpu0: Path) -> Caches:
    out: dict[str, int] = {}
    l3_total = 0
    for idx in sorted(cpu0.glob("cache/index*")):
        level, kind = read_text(idx / "level"), read_text(idx / "type")
        size = _size(read_text(idx / "size"))
        if not (level and kind and size):
            continue
        key = {("1", "Data"): "l1d", ("1", "Instruction"): "l1i"}.get((level.strip(), kind.strip()),
                                                                      f"l{level.strip()}")
        out[key] = size
        if key == "l3":
            l3_total = size
    # L3 is shared: count each distinct L3 once across the machine.
    if l3_total:
        seen = {read_text(p) for p in cpu0.parent.glob("cpu[0-9]*/cache/index3/shared_cpu_list")}
        out["l3"] = l3_total * max(1, len(seen - {None}))
    return Caches(**{k: v for k, v in out.items() if k in Caches.model_fields})


def _topology(cpu_dir: Path, blocks: list[dict[str, str]]) -> tuple[int, int, int]:
    """(physical cores, threads, sockets), sysfs first, cpuinfo second."""
    pairs, sockets = set(), set()
    cpus = list(cpu_dir.glob("cpu[0-9]*"))
    for c in cpus:
        core, pkg = read_text(c / "topology/core_id"), read_text(c / "topology/physical_package_id")
        if core is not None and pkg is not None:
            pairs.add((pkg.strip(), core.strip()))
            sockets.add(pkg.strip())
    numbered = [b for b in blocks if b.get("processor", "").isdigit()]
    threads = len(numbered) or len(blocks) or len(cpus)
    if pairs:
        return len(pairs), max(threads, len(pairs)), len(sockets)
    phys = {(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b}
    if phys:
        return len(phys), threads, len({p for p, _ in phys}) or 1
    return threads, threads, 1


def _lscpu(lscpu: str | None) -> dict[str, str]:
    exe = shutil.which(lscpu) if lscpu else None
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "-J"], capture_output=True, text=True, timeout=2).stdout
        return {d["field"].rstrip(":"): d.get("data") or "" for d in json.loads(out)["lscpu"]}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return {}


def flops_per_cycle(simd: list[str], model: str) -> tuple[int, str]:
    """FP32 FLOPs per core per cycle, and the assumption behind it.

    FMA counts as two FLOPs. Units per core are an assumption (noted in the
    profile): many client parts have one 512-bit FMA port, not two.
    """
    if "AVX-512" in simd and "xeon" in model.lower():
        return 64, "AVX-512: 2 FMA units x 16 lanes x 2 (server core)"
    if "AVX-512" in simd:
        return 32, "AVX-512: 1 FMA unit x 16 lanes x 2 (client core; Zen 4 double-pumps 256-bit)"
    if "AVX2" in simd and "FMA" in simd:
        return 32, "AVX2+FMA: 2 FMA units x 8 lanes x 2"
    if "AVX" in simd:
        return 16, "AVX: 8-lane add + 8-lane mul"
    if "NEON" in simd:
        if model.lower().startswith("apple"):
            return 32, "Apple core: 4 NEON FMA pipes x 4 lanes x 2"
        return 16, "NEON: 2 FMA pipes x 4 lanes x 2"
    return 8, "SSE: 4-lane add + 4-lane mul"


def _clock_mhz(cpu0: Path, blocks: list[dict[str, str]], ls: dict[str, str], model: str) -> tuple[float | None, str]:
    """The highest clock we can learn, and where it came from (a VM often shows only the nominal one)."""
    khz = read_text(cpu0 / "cpufreq/cpuinfo_max_freq")
    if khz and khz.strip().isdigit():
        return int(khz) / 1000, "max clock from cpufreq"
    if ls.get("CPU max MHz"):
        try:
            return float(ls["CPU max MHz"]), "max clock from lscpu"
        except ValueError:
            pass
    m = re.search(r"@\s*([\d.]+)\s*GHz", model)
    if m:
        return float(m.group(1)) * 1000, "nominal clock from the model name; turbo can beat this peak"
    for b in blocks:
        if b.get("cpu mhz"):
            try:
                return float(b["cpu mhz"]), "current/nominal clock from /proc/cpuinfo (no cpufreq); turbo can beat this peak"
            except ValueError:
                pass
    return None, ""


def _from_cpuinfo_pkg() -> dict[str, str]:
    """py-cpuinfo, the slow portable fallback (macOS, Windows, odd kernels)."""
    import cpuinfo  # noqa: PLC0415  (off the fast path on purpose)

    info = cpuinfo.get_cpu_info()
    return {"model name": info.get("brand_raw", ""), "flags": " ".join(info.get("flags", [])),
            "vendor_id": info.get("vendor_id_raw", ""),
            "cpu mhz": str((info.get("hz_advertised") or [0])[0] / 1e6 or "")}


def _arch(first: dict[str, str]) -> str | None:
    if "cpu implementer" in first:
        return "aarch64" if first.get("cpu architecture") == "8" else "arm"
    if "flags" in first and " lm " in f" {first['flags']} ":
        return "x86_64"
    return None


def detect(root: Path = Path("/"), lscpu: str | None = "lscpu", fallback: bool = True) -> CPU:
    proc = read_text(root / "proc/cpuinfo")
    cpu_dir = root / "sys/devices/system/cpu"
    blocks = _parse_cpuinfo(proc) if proc else []
    ls = _lscpu(lscpu) if root == Path("/") else {}
    if not blocks and not ls:
        if not fallback:
            raise Unavailable(f"no {root / 'proc/cpuinfo'} and no lscpu")
        try:
            blocks = [_from_cpuinfo_pkg()]
        except Exception as exc:  # py-cpuinfo raises many kinds on odd systems
            raise Unavailable(f"no /proc/cpuinfo, no lscpu, and py-cpuinfo failed: {exc}") from None
    first = blocks[0] if blocks else {}
    arm = _ARM_PARTS.get((first.get("cpu implementer", ""), first.get("cpu part", "")))
    model = (first.get("model name") or ls.get("Model name") or arm or first.get("hardware")
             or platform.processor() or "unknown CPU").strip()
    words = set((first.get("flags") or first.get("features") or ls.get("Flags") or "").split())
    simd = sorted({name for flag, name in _SIMD.items() if flag in words})
    cores, threads, sockets = _topology(cpu_dir, blocks)
    if ls.get("CPU(s)", "").isdigit():
        threads = max(threads, int(ls["CPU(s)"]))
    clock, clock_src = _clock_mhz(cpu_dir / "cpu0", blocks, ls, model)
    fpc, why = flops_per_cycle(simd, model)
    peak32 = peak64 = None
    usable, usable_why = confine.usable_cpus(threads) if root == Path("/") else (None, None)
    if clock:
        n = min(cores, usable or cores)  # a process confined to fewer CPUs can only reach their peak
        g = n * clock / 1000 * fpc
        basis = (f"formula: {n} cores x {clock / 1000:.2f} GHz x {fpc} FLOP/cycle ({why}; {clock_src}"
                 + (f"; limited by {usable_why})" if n < cores else ")"))
        peak32 = Figure(value=round(g, 1), unit="GFLOP/s", source="datasheet", method=basis)
        peak64 = Figure(value=round(g / 2, 1), unit="GFLOP/s", source="datasheet", method=basis + ", FP64 = half")
    return CPU(model=model, vendor=first.get("vendor_id") or ls.get("Vendor ID") or None,
               architecture=ls.get("Architecture") or _arch(first) or platform.machine() or "unknown",
               physical_cores=cores, threads=threads, sockets=sockets, simd=simd,
               caches=_caches(cpu_dir / "cpu0"), clock_mhz=clock,
               peak_fp32_gflops=peak32, peak_fp64_gflops=peak64,
               usable_cpus=usable, usable_source=usable_why)
