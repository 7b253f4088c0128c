"""The reference kits in profiles/: they load, they say where every figure comes from,
and their numbers are consistent with each other and with the datasheets."""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from inventory.profile import Figure, Profile, dumps, load, loads

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
FILES = sorted(PROFILES.glob("*.yaml"))

EXPECTED = {
    "laptop-8gb-cpu", "rtx4090-laptop-16gb", "apple-m2-16gb", "apple-m2-32gb",
    "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "arduino-nano-33-ble-sense",
    "esp32-s3-devkitc", "raspberry-pi-pico", "two-node-lan",
}

KB, MB = 1 << 10, 1 << 20
# REFERENCE.md, "Boards seen over USB serial": VID:PID -> MCU, core, flash range, SRAM, clock.
BOARDS = {
    "2341:805A": ("nRF52840", "Cortex-M4F", (1 * MB, 1 * MB), 256 * KB, 64, True, True),
    "303A:1001": ("ESP32-S3", "2x Xtensa LX7", (8 * MB, 16 * MB), 512 * KB, 240, True, True),
    "2E8A:000A": ("RP2040", "2x Cortex-M0+", (2 * MB, 2 * MB), 264 * KB, 133, False, False),
}

# "typical achieved: ~70% of peak 51.2 GB/s (...)"
ACHIEVED = re.compile(r"^typical achieved: ~(\d+(?:\.\d+)?)% of peak (\d+(?:\.\d+)?) (\S+) \(.+\)$", re.S)


def _profile(name: str) -> Profile:
    return load(PROFILES / f"{name}.yaml")


def _figures(obj, path="") -> list[tuple[str, Figure]]:
    """Every Figure anywhere in a model, with its dotted path."""
    if isinstance(obj, Figure):
        return [(path, obj)]
    out = []
    if isinstance(obj, BaseModel):
        for key in type(obj).model_fields:
            out += _figures(getattr(obj, key), f"{path}.{key}".lstrip("."))
    elif isinstance(obj, dict):
        for key, val in obj.items():
            out += _figures(val, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, val in enumerate(obj):
            out += _figures(val, f"{path}[{i}]")
    return out


def _achieved(p: Profile) -> list[tuple[str, Figure]]:
    """The measured-style throughput figures the planner divides by."""
    out = []
    if p.cpu:
        out += [(f"cpu.matmul_gflops.{k}", f) for k, f in p.cpu.matmul_gflops.items()]
        if p.cpu.memory_bandwidth_gbs:
            out.append(("cpu.memory_bandwidth_gbs", p.cpu.memory_bandwidth_gbs))
    for i, g in enumerate(p.gpus):
        out += [(f"gpus[{i}].matmul_tflops.{k}", f) for k, f in g.matmul_tflops.items()]
        if g.memory_bandwidth_gbs:
            out.append((f"gpus[{i}].memory_bandwidth_gbs", g.memory_bandwidth_gbs))
    for i, peer in enumerate(p.peers):
        if peer.bandwidth_mbps:
            out.append((f"peers[{i}].bandwidth_mbps", peer.bandwidth_mbps))
    return out


def _peak_in_method(fig: Figure) -> tuple[float, float, str]:
    m = ACHIEVED.match(fig.method or "")
    assert m, f"method does not read 'typical achieved: ~X% of peak P UNIT (basis)': {fig.method!r}"
    return float(m.group(1)), float(m.group(2)), m.group(3)


# ---------------------------------------------------------------- the set

def test_expected_kits_exist():
    assert {f.stem for f in FILES} == EXPECTED


def test_folder_is_a_package_with_the_yaml_as_data():
    kits = {p.name[:-5] for p in resources.files("profiles").iterdir() if p.name.endswith(".yaml")}
    assert kits == EXPECTED


# ---------------------------------------------------------------- every file

@pytest.fixture(params=FILES, ids=lambda f: f.stem)
def kit(request) -> tuple[Path, Profile]:
    return request.param, load(request.param)


def test_loads_and_is_named_after_its_file(kit):
    path, p = kit
    assert p.schema_ == "tierkit/profile/v1"
    assert p.name == path.stem
    assert p.description and "\n" not in p.description.strip()
    assert p.probe is None and p.host is None and p.calibration == []


def test_round_trips_through_dumps(kit):
    _, p = kit
    assert loads(dumps(p)) == p


def test_every_source_is_datasheet(kit):
    path, p = kit

    def walk(node, where):
        if isinstance(node, dict):
            if "source" in node:
                assert node["source"] == "datasheet", f"{path.name}: {where}.source = {node['source']!r}"
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(p.model_dump(mode="json", by_alias=True), "")  # defaults included: an omitted source reads "measured"
    walk(yaml.safe_load(path.read_text(encoding="utf-8")), "")


def test_every_figure_is_datasheet_with_its_basis(kit):
    _, p = kit
    figs = _figures(p)
    assert figs
    for where, f in figs:
        assert f.source == "datasheet", where
        assert f.method and f.method.startswith(("datasheet: ", "typical achieved: ~")), (where, f.method)
        assert f.value > 0, where


def test_achieved_throughput_is_below_its_peak(kit):
    _, p = kit
    for where, f in _achieved(p):
        pct, pk, unit = _peak_in_method(f)
        assert unit == f.unit, where
        assert 0 < pct <= 100, where
        assert f.value <= pk, f"{where}: {f.value} above the peak {pk}"
        assert f.value == pytest.approx(pk * pct / 100, rel=0.01), f"{where}: value is not {pct}% of {pk}"


def test_cpu_figures(kit):
    _, p = kit
    c = p.cpu
    assert c is not None
    assert c.threads >= c.physical_cores
    assert c.peak_fp32_gflops and c.peak_fp64_gflops and c.memory_bandwidth_gbs
    assert c.peak_fp64_gflops.value <= c.peak_fp32_gflops.value
    assert set(c.matmul_gflops) == {"fp32", "fp64"}
    for dtype, peak in (("fp32", c.peak_fp32_gflops), ("fp64", c.peak_fp64_gflops)):
        fig = c.matmul_gflops[dtype]
        assert fig.unit == peak.unit == "GFLOP/s"
        assert fig.value <= peak.value
        assert _peak_in_method(fig)[1] == pytest.approx(peak.value, rel=0.001), f"{dtype}: quotes another peak"
    assert c.memory_bandwidth_gbs.unit == "GB/s"


def test_memory_and_gpu_memory(kit):
    _, p = kit
    m = p.memory
    assert m is not None and m.source == "datasheet"
    assert 0 < m.available_bytes <= m.total_bytes
    assert 0.6 <= m.available_bytes / m.total_bytes <= 0.85, "free memory a learner really has"
    for g in p.gpus:
        assert g.memory_bytes and g.memory_free_bytes is not None
        assert g.memory_free_bytes <= g.memory_bytes
        assert set(g.matmul_tflops) == {"fp32", "fp16", "bf16"}
        assert g.memory_bandwidth_gbs and g.memory_bandwidth_gbs.unit == "GB/s"
        if g.unified_memory:
            assert g.memory_bytes <= m.total_bytes
            assert g.memory_free_bytes <= m.available_bytes
        if g.vendor == "nvidia":
            assert g.backend == "cuda" and g.compute_capability
        if g.vendor == "apple":
            assert g.backend == "mps" and g.unified_memory


def test_boards_match_the_reference_table(kit):
    _, p = kit
    for b in p.boards:
        assert b.vid_pid in BOARDS, b.vid_pid
        mcu, core, (fmin, fmax), sram, mhz, fpu, dsp = BOARDS[b.vid_pid]
        s = b.board
        assert b.match == "board" and s is not None and b.access == "ok" and b.port
        assert (s.mcu, s.core, s.sram_bytes, s.clock_mhz, s.fpu, s.dsp) == (mcu, core, sram, mhz, fpu, dsp)
        assert fmin <= s.flash_bytes <= fmax
        assert s.source == "datasheet"


# ---------------------------------------------------------------- kit by kit

def test_cpu_only_laptop():
    p = _profile("laptop-8gb-cpu")
    assert p.gpus == [] and p.boards == [] and p.sbc is None
    assert p.memory.total_bytes == 8 << 30
    assert {"AVX2", "AVX-512"} <= set(p.cpu.simd)


def test_rtx4090_laptop():
    p = _profile("rtx4090-laptop-16gb")
    (g,) = p.gpus
    assert (g.vendor, g.compute_capability, g.unified_memory) == ("nvidia", "8.9", False)
    assert g.memory_bytes == 16 << 30 and p.memory.total_bytes == 32 << 30
    assert _peak_in_method(g.memory_bandwidth_gbs)[1] == 576
    # tensor-core FP16/BF16 well above CUDA-core FP32
    assert g.matmul_tflops["bf16"].value > g.matmul_tflops["fp32"].value


@pytest.mark.parametrize("name, gib, bw, chip", [("apple-m2-16gb", 16, 100, "Apple M2"),
                                                  ("apple-m2-32gb", 32, 200, "Apple M2 Pro")])
def test_apple(name, gib, bw, chip):
    p = _profile(name)
    (g,) = p.gpus
    assert p.cpu.model == chip and g.model == f"{chip} GPU"
    assert (g.vendor, g.backend, g.unified_memory) == ("apple", "mps", True)
    assert g.memory_bytes == p.memory.total_bytes == gib << 30
    assert _peak_in_method(g.memory_bandwidth_gbs)[1] == bw


def test_raspberry_pi_5():
    p = _profile("raspberry-pi-5-8gb")
    assert p.sbc.model == "Raspberry Pi 5 Model B Rev 1.0"
    assert (p.sbc.family, p.sbc.soc) == ("raspberry-pi", "BCM2712")
    assert (p.cpu.model, p.cpu.physical_cores, p.cpu.clock_mhz) == ("Cortex-A76", 4, 2400)
    assert "NEON" in p.cpu.simd and p.gpus == []
    assert p.memory.total_bytes == 8 << 30


def test_jetson_orin_nano():
    p = _profile("jetson-orin-nano-8gb")
    assert p.sbc.family == "jetson" and "nvidia,tegra234" in p.sbc.compatible
    (g,) = p.gpus
    assert (g.vendor, g.backend, g.compute_capability, g.unified_memory) == ("nvidia", "cuda", "8.7", True)
    assert g.memory_bytes == p.memory.total_bytes == 8 << 30
    assert p.cpu.physical_cores == 6
    assert _peak_in_method(g.memory_bandwidth_gbs)[1] == 68


@pytest.mark.parametrize("name, vid_pid", [("arduino-nano-33-ble-sense", "2341:805A"),
                                           ("esp32-s3-devkitc", "303A:1001"),
                                           ("raspberry-pi-pico", "2E8A:000A")])
def test_board_kits_have_one_board_and_a_host(name, vid_pid):
    p = _profile(name)
    (b,) = p.boards
    assert b.vid_pid == vid_pid and b.port == "/dev/ttyACM0"
    assert p.cpu is not None and p.memory.total_bytes == 8 << 30  # the laptop that trains and flashes


def test_two_node_lan():
    p = _profile("two-node-lan")
    assert p.memory.total_bytes == 16 << 30
    (peer,) = p.peers
    assert (peer.address, peer.port, peer.found_by) == ("192.168.1.20", 8477, "manual")
    s = peer.summary
    assert {"name", "cpu", "threads", "memory_total_bytes", "memory_available_bytes", "gpus"} <= set(s)
    assert s["memory_total_bytes"] == 16 << 30 and s["memory_available_bytes"] <= s["memory_total_bytes"]
    assert peer.rtt_ms.unit == "ms" and 0 < peer.rtt_ms.value < 1
    assert peer.bandwidth_mbps.unit == "Mbit/s" and peer.bandwidth_mbps.value <= 1000
