"""inventory.detect.sbc against fake device-tree roots, and against this machine."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from inventory.detect import Found, Unavailable
from inventory.detect import sbc
from inventory.profile import SBC, Profile, dumps, loads


def make_tree(root: Path, model: bytes | None, compatible: bytes | None,
              rel: str = "proc/device-tree") -> Path:
    base = root / rel
    base.mkdir(parents=True)
    if model is not None:
        (base / "model").write_bytes(model)
    if compatible is not None:
        (base / "compatible").write_bytes(compatible)
    return root


def test_raspberry_pi_5(tmp_path: Path) -> None:
    root = make_tree(tmp_path, b"Raspberry Pi 5 Model B Rev 1.0\0",
                     b"raspberrypi,5-model-b\0brcm,bcm2712\0")
    got = sbc.detect(root)
    assert isinstance(got, SBC)
    assert got.model == "Raspberry Pi 5 Model B Rev 1.0"
    assert got.family == "raspberry-pi"
    assert got.soc == "BCM2712"
    assert got.compatible == ["raspberrypi,5-model-b", "brcm,bcm2712"]
    assert got.source == "measured"
    # It fits the profile schema and survives a YAML round trip.
    assert loads(dumps(Profile(sbc=got))).sbc == got


def test_raspberry_pi_4_via_sysfs_fallback(tmp_path: Path) -> None:
    root = make_tree(tmp_path, b"Raspberry Pi 4 Model B Rev 1.4\0",
                     b"raspberrypi,4-model-b\0brcm,bcm2711\0",
                     rel="sys/firmware/devicetree/base")
    got = sbc.detect(root)
    assert (got.family, got.soc) == ("raspberry-pi", "BCM2711")


def test_jetson_orin_nano(tmp_path: Path) -> None:
    root = make_tree(tmp_path, b"NVIDIA Jetson Orin Nano Developer Kit\0",
                     b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0")
    got = sbc.detect(root)
    assert got.family == "jetson"
    assert got.model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert got.soc == "Tegra234 (Orin)"
    assert "nvidia,tegra234" in got.compatible


def test_other_board_names_soc_from_last_compatible(tmp_path: Path) -> None:
    root = make_tree(tmp_path, b"Radxa ROCK 5B\0", b"radxa,rock-5b\0rockchip,rk3588\0")
    got = sbc.detect(root)
    assert (got.family, got.soc) == ("other", "rockchip,rk3588")


def test_model_without_compatible_or_trailing_nul(tmp_path: Path) -> None:
    got = sbc.detect(make_tree(tmp_path, b"Raspberry Pi 3 Model B Rev 1.2", None))
    assert (got.family, got.compatible, got.soc) == ("raspberry-pi", [], None)


def test_no_device_tree(tmp_path: Path) -> None:
    got = sbc.detect(tmp_path)
    assert isinstance(got, Found)
    assert got.value is None
    assert "no device tree" in got.note


def test_empty_device_tree_dir_is_no_device_tree(tmp_path: Path) -> None:
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    got = sbc.detect(tmp_path)
    assert isinstance(got, Found) and got.value is None


@pytest.mark.parametrize("what, model, compatible, words", [
    ("invalid utf-8", b"Raspberry Pi \xff\xfe 5\0", b"brcm,bcm2712\0", "not UTF-8"),
    ("empty model", b"", b"brcm,bcm2712\0", "empty"),
    ("only NULs", b"\0\0\0", None, "empty"),
    ("binary junk", b"\x01\x02\x03\x7fELF\0", None, "control characters"),
    ("two strings in model", b"Raspberry Pi 5\0Raspberry Pi 4\0", None, "2 strings"),
    ("junk in compatible", b"Raspberry Pi 5\0", b"brcm,bcm2712\0\0\x07\0", "control characters"),
    ("oversized", b"A" * 10_000, None, "longer than"),
])
def test_malformed(tmp_path: Path, what: str, model: bytes, compatible: bytes | None, words: str) -> None:
    root = make_tree(tmp_path, model, compatible)
    with pytest.raises(Unavailable) as info:
        sbc.detect(root)
    msg = str(info.value)
    assert msg.startswith("malformed device tree at ") and str(tmp_path) in msg, what
    assert words in msg, what


def test_directory_in_place_of_model(tmp_path: Path) -> None:
    root = make_tree(tmp_path, None, b"brcm,bcm2712\0")
    (root / "proc/device-tree/model").mkdir()
    with pytest.raises(Unavailable, match=r"malformed device tree at .*model: a directory"):
        sbc.detect(root)


def test_symlink_loop_is_unavailable(tmp_path: Path) -> None:
    base = tmp_path / "proc/device-tree"
    base.mkdir(parents=True)
    (base / "model").symlink_to(base / "model")
    with pytest.raises(Unavailable, match="malformed device tree at"):
        sbc.detect(tmp_path)


def test_this_machine_is_not_an_sbc() -> None:
    """This VM has no device tree; on a real Pi or Jetson this test does not apply."""
    if Path("/proc/device-tree").exists() or Path("/sys/firmware/devicetree/base").exists():
        pytest.skip("this machine has a device tree (an SBC or an ARM board)")
    got = sbc.detect()
    assert isinstance(got, Found)
    assert got.value is None
    assert got.note == "no device tree: not a single-board computer"


@settings(max_examples=200, deadline=None)
@given(model=st.binary(max_size=64), compatible=st.one_of(st.none(), st.binary(max_size=64)))
def test_any_bytes_give_an_sbc_or_unavailable(model: bytes, compatible: bytes | None) -> None:
    """Whatever the files hold, the detector answers or says why; it never raises anything else."""
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tree(Path(tmp), model, compatible)
        try:
            got = sbc.detect(root)
        except Unavailable as exc:
            assert str(exc).startswith("malformed device tree at ")
        else:
            assert isinstance(got, SBC) and got.model and got.model.isprintable()
