"""Fault injection: every detector's source missing, raising, hanging, denied, absent,
malformed. The probe still finishes, writes a valid profile, and says why a field is empty."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inventory.detect import cpu, gpu, memory, sbc
from inventory.probe import probe
from inventory.profile import load, save
from tests.conftest import REPO, assert_one_line_error, run_cli

FAST = dict(bench=False, discover=False)


def _roundtrip(p, tmp_path: Path):
    """What the probe returned must be a profile that saves and loads."""
    return load(save(p, tmp_path / "profile.yaml"))


def test_probe_this_machine(tmp_path):
    p = _roundtrip(probe(**FAST), tmp_path)
    assert p.cpu and p.cpu.threads >= 1 and p.cpu.architecture
    assert p.memory and 0 < p.memory.available_bytes <= p.memory.total_bytes
    assert set(p.probe.detectors) >= {"cpu", "memory", "gpu", "boards", "sbc", "peers"}
    assert all(s.status in ("ok", "empty") for s in p.probe.detectors.values()), p.probe.detectors


def test_cpu_source_missing(tmp_path):
    empty_root = tmp_path / "root"
    empty_root.mkdir()
    missing = functools.partial(cpu.detect, root=empty_root, lscpu=None, fallback=False)
    p = _roundtrip(probe(**FAST, detectors={"cpu": missing}), tmp_path)
    assert p.cpu is None
    s = p.probe.detectors["cpu"]
    assert s.status == "empty" and "proc/cpuinfo" in s.reason


def test_cpu_from_a_raspberry_pi_proc(tmp_path):
    """The fast path parses an ARM /proc/cpuinfo (no model name there) and sysfs topology."""
    root = tmp_path / "pi"
    (root / "proc").mkdir(parents=True)
    block = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 "
             "atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n")
    (root / "proc/cpuinfo").write_text("".join(block.format(i=i) for i in range(4))
                                        + "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    for i in range(4):
        d = root / f"sys/devices/system/cpu/cpu{i}"
        (d / "topology").mkdir(parents=True)
        (d / "topology/core_id").write_text(f"{i}\n")
        (d / "topology/physical_package_id").write_text("0\n")
        (d / "cpufreq").mkdir()
        (d / "cpufreq/cpuinfo_max_freq").write_text("2400000\n")
    c = cpu.detect(root=root, lscpu=None, fallback=False)
    assert (c.model, c.architecture, c.physical_cores, c.threads) == ("Cortex-A76", "aarch64", 4, 4)
    assert "NEON" in c.simd and c.clock_mhz == 2400
    assert c.peak_fp32_gflops.value == pytest.approx(4 * 2.4 * 16)  # 2 NEON FMA pipes x 4 lanes x 2


def test_raising_detector(tmp_path):
    def broken():
        raise OSError(5, "Input/output error")
    p = _roundtrip(probe(**FAST, detectors={"memory": broken}), tmp_path)
    s = p.probe.detectors["memory"]
    assert p.memory is None and s.status == "error" and "Input/output error" in s.reason


def test_permission_denied_detector(tmp_path):
    def denied():
        return open("/proc/self/mem", "rb").read(1)  # EIO/EACCES for an unmapped offset: a real OS refusal
    def perm():
        raise PermissionError(13, "Permission denied", "/sys/class/drm/card0/device/mem_info_vram_total")
    p = _roundtrip(probe(**FAST, detectors={"gpu": perm, "boards": denied}), tmp_path)
    assert p.probe.detectors["gpu"].status == "error" and "Permission denied" in p.probe.detectors["gpu"].reason
    assert p.probe.detectors["boards"].status == "error" and p.boards == []


def test_hanging_detector_times_out_and_probe_goes_on(tmp_path):
    def hang():
        time.sleep(60)
    t = time.perf_counter()
    p = _roundtrip(probe(**FAST, detectors={"gpu": hang}, timeouts={"gpu": 0.3}), tmp_path)
    assert time.perf_counter() - t < 5
    s = p.probe.detectors["gpu"]
    assert s.status == "timeout" and "0.3 s" in s.reason
    assert p.cpu is not None  # the others still answered


def test_detector_returning_garbage(tmp_path):
    p = _roundtrip(probe(**FAST, detectors={"cpu": lambda: {"model": 3}}), tmp_path)
    assert p.cpu is None and p.probe.detectors["cpu"].status == "error"
    assert "does not fit the profile" in p.probe.detectors["cpu"].reason


def test_nvml_library_absent_is_an_answer():
    """No NVIDIA driver here: pynvml raises LibraryNotFound, which becomes a note, not an error."""
    found = gpu.detect()
    if found.value and found.value[0].vendor == "nvidia":
        pytest.skip("this machine has an NVIDIA driver; the absent-library path is covered in a subprocess")
    assert found.value == [] and "NVML library not found" in found.note


def test_nvml_package_absent(tmp_path):
    """Without nvidia-ml-py at all (a blocked import), the GPU field says so."""
    code = ("import sys; sys.modules['pynvml'] = None\n"
            "from inventory.probe import probe\n"
            "p = probe(bench=False, discover=False)\n"
            "s = p.probe.detectors['gpu']; print(s.status, '|', s.reason)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "nvidia-ml-py not installed" in out.stdout


def test_malformed_device_tree(tmp_path):
    root = tmp_path / "dt"
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"\xff\xfe\x80Raspb\x00")
    p = _roundtrip(probe(**FAST, detectors={"sbc": functools.partial(sbc.detect, root=root)}), tmp_path)
    s = p.probe.detectors["sbc"]
    assert p.sbc is None and s.status == "empty" and "malformed" in s.reason


def test_memory_detector_is_psutil():
    m = memory.detect()
    assert 0 < m.available_bytes <= m.total_bytes and m.source == "measured"


# ---------------------------------------------------------------- the command

def test_cli_probe_json_writes_profile_and_b0(home, tmp_path):
    out = tmp_path / "p.yaml"
    proc = run_cli("probe", "--no-bench", "--no-discover", "--json", "--out", str(out), "--builds",
                   str(tmp_path / "builds"), home=home)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["schema"] == "tierkit/profile/v1" and data["cpu"]["threads"] >= 1
    assert load(out).cpu.model == data["cpu"]["model"]
    readme = (tmp_path / "builds/B00-inventory/README.md").read_text()
    assert "## What each tier can use" in readme and data["cpu"]["model"] in readme
    assert load(tmp_path / "builds/B00-inventory/profile.yaml").cpu is not None


def test_cli_probe_default_location_and_bench(home, tmp_path):
    """With benchmarks: measured FLOP/s and bandwidth land in the default profile."""
    proc = run_cli("probe", "--no-discover", home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    p = load(home / "profile.yaml")
    c = p.cpu
    assert c.matmul_gflops["fp32"].source == "measured" and c.matmul_gflops["fp32"].value > 0
    assert c.matmul_gflops["fp64"].value > 0 and c.memory_bandwidth_gbs.value > 0
    # A measured matmul cannot beat the theoretical peak (with a little slack for turbo clocks).
    assert c.matmul_gflops["fp32"].value < 1.5 * c.peak_fp32_gflops.value
    assert p.probe.detectors["bench_cpu"].status == "ok"
    assert p.probe.detectors["bench_gpu"].status in ("empty", "ok")
    assert (tmp_path / "builds/B00-inventory/README.md").exists()
    assert "what each tier can use" in proc.stdout


def test_cli_probe_unwritable_destination(home, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("probe", "--no-bench", "--no-discover", "--out", str(blocker / "p.yaml"), home=home)
    assert_one_line_error(proc, "cannot write", "--out")
    assert blocker.read_text() == "x"
