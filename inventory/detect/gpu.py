"""GPUs: NVIDIA through NVML, Apple Silicon, AMD through sysfs / rocm-smi.

No GPU is an answer, not an error: the result is an empty list and a note that
says what was looked for. Nothing here creates a CUDA context (that alone costs
300-500 MB of VRAM and a second); the benchmarks do that, later, if asked.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

from inventory.detect import Found, read_text
from inventory.profile import GPU


def _s(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


def _nvml_loadable() -> bool:
    """Can the NVML library load? (~0.1 ms; importing pynvml to find out costs ~35 ms)."""
    import ctypes
    import sys

    if sys.platform != "linux":
        return True  # let pynvml search its platform's paths
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


def _have_pynvml() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("pynvml") is not None
    except (ImportError, ValueError):  # a blocked or broken module
        return False


def nvidia() -> tuple[list[GPU], str]:
    if not _have_pynvml():
        return [], "nvidia-ml-py not installed"
    if not _nvml_loadable():
        return [], "no NVIDIA driver (NVML library not found)"
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return [], "no NVIDIA driver (NVML library not found)"
    except pynvml.NVMLError as exc:
        return [], f"NVML failed to start: {exc}"
    try:
        driver = _s(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                cc = "%d.%d" % pynvml.nvmlDeviceGetCudaComputeCapability(h)
            except pynvml.NVMLError:
                cc = None
            clocks = {}
            for key, kind in (("sm_max", pynvml.NVML_CLOCK_SM), ("memory_max", pynvml.NVML_CLOCK_MEM)):
                try:
                    clocks[key] = float(pynvml.nvmlDeviceGetMaxClockInfo(h, kind))
                except pynvml.NVMLError:
                    pass
            gpus.append(GPU(vendor="nvidia", model=_s(pynvml.nvmlDeviceGetName(h)), backend="cuda",
                            memory_bytes=int(mem.total), memory_free_bytes=int(mem.free), driver=driver,
                            compute_capability=cc, clocks_mhz=clocks, index=i))
        return gpus, f"NVML: {len(gpus)} NVIDIA GPU(s), driver {driver}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def apple() -> tuple[list[GPU], str]:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return [], "not Apple Silicon"
    try:
        out = subprocess.run(["sysctl", "-n", "hw.memsize", "machdep.cpu.brand_string"],
                             capture_output=True, text=True, timeout=2).stdout.split("\n")
        mem, chip = int(out[0]), out[1].strip()
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return [], f"Apple Silicon, but sysctl failed: {exc}"
    # The GPU shares the unified memory; MPS is there on macOS 12.3+ (torch says for sure).
    return [GPU(vendor="apple", model=f"{chip} GPU", backend="mps", memory_bytes=mem,
                unified_memory=True)], f"Apple Silicon {chip}, unified memory"


def amd(root: Path = Path("/"), rocm_smi: str = "rocm-smi", timeout: float = 3.0) -> tuple[list[GPU], str]:
    gpus = []
    for card in sorted((root / "sys/class/drm").glob("card[0-9]")):
        dev = card / "device"
        if (read_text(dev / "vendor") or "").strip() != "0x1002":
            continue
        vram = read_text(dev / "mem_info_vram_total")
        gpus.append(GPU(vendor="amd", model=(read_text(dev / "product_name") or "AMD GPU").strip(),
                        backend="rocm", index=len(gpus),
                        memory_bytes=int(vram) if vram and vram.strip().isdigit() else None))
    if not gpus:
        return [], "no AMD GPU in sysfs"
    exe = shutil.which(rocm_smi)
    if exe:  # names are better from rocm-smi, which can hang on a bad driver: timeout
        try:
            out = subprocess.run([exe, "--showproductname", "--json"], capture_output=True,
                                 text=True, timeout=timeout).stdout
            names = [v.get("Card series") or v.get("Card SKU") for v in json.loads(out).values()]
            for g, n in zip(gpus, names):
                if n:
                    g.model = n
        except (OSError, subprocess.SubprocessError, ValueError, AttributeError):
            pass
    return gpus, f"{len(gpus)} AMD GPU(s) in sysfs"


def detect() -> Found:
    gpus, notes = [], []
    for finder in (nvidia, apple, amd):
        found, note = finder()
        gpus += found
        notes.append(note)
    return Found(gpus, "; ".join(notes) if not gpus else "; ".join(n for n in notes if "GPU" in n))
