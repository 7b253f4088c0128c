"""The keyword-spotter firmware on the emulated Cortex-M4 (QEMU mps2-an386), driven over its
serial pty with pyserial only, against the host: the C front end built for this machine and
TFLite Micro on the same .tflite.

One tiny DS-CNN (the "xs" rung, one epoch on 20 real clips per class: seconds of training)
is exported and built once per module; one QEMU runs all the device tests. Each clip costs
about 1.3 s: QEMU's CMSDK UART takes the host's bytes one at a time (~35 us each).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED, assert_one_line_error, run_cli
from tiers.tier0 import data as D
from tiers.tier0 import features as F

REAL = SHARED / "data" / "speech_commands_v2_test"
FW = Path(__file__).resolve().parent.parent / "firmware"


def _need_tools() -> None:
    for tool, pkg in (("arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi"),
                      ("qemu-system-arm", "qemu-system-arm")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (sudo apt-get install {pkg})")


@pytest.fixture(scope="module")
def clips() -> D.ClipSet:
    if not REAL.is_dir():
        pytest.skip(f"real Speech Commands clips not found at {REAL}")
    return D.load(REAL, limit_per_class=20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, clips) -> tuple[Path, bytes]:
    """(exported model dir, .tflite) of a DS-CNN xs trained for one epoch on the real clips."""
    _need_tools()
    from models import kws
    from tiers.tier0 import export, quantize

    x = F.mfcc(clips.audio)[..., None]
    model = kws.compile_for_training(kws.build("xs", seed=0))
    model.fit(x, clips.labels, epochs=1, batch_size=32, verbose=0)
    tfl = quantize.quantize(model, x, samples=100)
    out = tmp_path_factory.mktemp("tiny-kws") / "model"
    export.export_c(tfl, out)
    return out, tfl


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fw-cache")


@pytest.fixture(scope="module")
def build(tiny, cache):
    from tiers.tier0 import firmware

    return firmware.build_qemu(tiny[0], cache_dir=cache)


@pytest.fixture(scope="module")
def device(build):
    from tiers.tier0 import firmware

    dev = firmware.QemuDevice.start(build.elf)
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> ctypes.CDLL:
    """kws_features.c and the firmware's recognizer.c built for this machine."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (sudo apt-get install gcc)")
    so = tmp_path_factory.mktemp("host") / "libkws_host.so"
    subprocess.run(["gcc", "-O2", "-std=c99", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    f"-I{FW / 'lib' / 'features'}", f"-I{FW / 'src'}", "-o", str(so),
                    str(FW / "lib" / "features" / "kws_features.c"), str(FW / "src" / "recognizer.c"), "-lm"],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(so))
    i16, f32, i8 = (np.ctypeslib.ndpointer(t, flags="C") for t in (np.int16, np.float32, np.int8))
    lib.kws_mfcc.argtypes = [i16, f32]
    lib.kws_peak.argtypes, lib.kws_peak.restype = [i16, ctypes.c_size_t], ctypes.c_float
    lib.kws_mel_frame.argtypes = [i16, ctypes.c_float, f32]
    lib.kws_mfcc_from_mel.argtypes = [f32, ctypes.c_float, f32]
    lib.kws_quantize_int8.argtypes = [f32, i8, ctypes.c_size_t, ctypes.c_float, ctypes.c_int32]
    return lib


def host_input(lib, clip: np.ndarray, scale: float, zp: int) -> tuple[np.ndarray, np.ndarray]:
    """(float features, int8 input) from the front end built for the host, as the device does it."""
    feats = np.empty(490, np.float32)
    lib.kws_mfcc(np.ascontiguousarray(clip, np.int16), feats)
    q = np.empty(490, np.int8)
    lib.kws_quantize_int8(feats, q, 490, scale, zp)
    return feats, q


def one_per_class(clips: D.ClipSet) -> np.ndarray:
    return np.array([int(np.flatnonzero(clips.labels == k)[0]) for k in range(len(D.CLASSES))])


# ====================================================================== build

def test_build_is_cached_and_fits_the_nano(tiny, cache, build):
    from tiers.tier0 import firmware

    assert build.warnings == "", build.warnings                 # -Wall -Wextra: not one warning
    again = firmware.build_qemu(tiny[0], cache_dir=cache)
    assert again.cached and again.elf == build.elf and again.seconds < 5.0   # found by hash: nothing compiled
    other = firmware.build_qemu(tiny[0], cache_dir=cache, extra_cflags=("-DKWS_CACHE_TEST=1",))
    assert not other.cached and other.key != build.key          # any change of sources or flags: a new image
    s = build.size
    print(f"QEMU image (DS-CNN xs): flash {s.flash:,} B (text {s.text:,} + data {s.data:,}), "
          f"RAM {s.ram:,} B (data + bss {s.bss:,} incl. 8 KB stack)")
    assert s.flash < 1_048_576 and s.ram < 262_144              # the Nano 33 BLE Sense's budget (link.ld too)


def test_build_error_is_one_line(tmp_path, cache):
    from tiers.tier0 import firmware

    (tmp_path / "model.h").write_text("#define KWS_MODEL_INPUT_SIZE 999\n")
    (tmp_path / "model.c").write_text("int kws_model_invoke(void) { return 0; }\n")
    with pytest.raises(firmware.FirmwareError) as e:
        firmware.build_qemu(tmp_path, cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and "failed" in msg and "49 x 10" in msg   # model_runner.c refuses other feature sizes
    with pytest.raises(firmware.FirmwareError, match="no exported model"):
        firmware.build_qemu(tmp_path / "nowhere", cache_dir=cache)


# ====================================================================== the device against the host

def test_info_matches_the_model(device, tiny):
    from tiers.tier0 import quantize

    info = device.info
    qin, _ = quantize.io_params(tiny[1])
    assert info.board == "qemu_m4" and info.counter_unit == "systick"
    assert info.labels == list(D.CLASSES)                       # the training labels' order
    assert np.float32(info.input_scale) == np.float32(qin.scale) and info.input_zero_point == qin.zero_point
    assert info.classes == 12 and info.inputs == 490


def test_features_and_scores_equal_host_and_tflite_micro(device, host, tiny, clips):
    """Every class's first clip, streamed over the pty: the device's int8 input tensor equals the
    host-built front end's, and its scores equal TFLite Micro's on the same .tflite, exactly."""
    from tiers.tier0 import verify

    info = device.info
    worst = 0.0
    for i in one_per_class(clips):
        r = device.classify_full(clips.audio[i], want_input=True, want_features=True)
        feats, q = host_input(host, clips.audio[i], info.input_scale, info.input_zero_point)
        np.testing.assert_array_equal(r.input, q)
        worst = max(worst, float(np.abs(r.features.reshape(-1) - feats).max()))
        ref = verify.run(tiny[1], q).reshape(-1)
        np.testing.assert_array_equal(r.scores, ref)
    # The same bits: the front end uses only correctly rounded float32 operations, no fused
    # multiply-add, and its own logarithm (newlib's logf and glibc's differ in the last bit).
    print(f"features: device vs host max |diff| {worst:.1e}")
    assert worst == 0.0
    print(f"per inference: features {device.instructions(r.feature_count):,} instructions, "
          f"model {device.instructions(r.invoke_count):,} instructions")


def test_instruction_counts_are_deterministic(device, clips):
    a = device.classify_full(clips.audio[3], want_input=False)
    b = device.classify_full(clips.audio[3], want_input=False)
    # Exact up to the counter's grain: one 25 MHz tick is 40 instructions, and where in a tick a
    # measurement starts depends on what ran before it.
    assert abs(a.feature_count - b.feature_count) <= 1 and abs(a.invoke_count - b.invoke_count) <= 1
    assert a.invoke_count > 0 and np.array_equal(a.scores, b.scores)


def test_systick_counts_instructions(tmp_path):
    """The conversion the host applies (40 instructions per 25 MHz tick at -icount shift=0),
    checked on a loop of a known number of instructions."""
    _need_tools()
    from tiers.tier0 import firmware

    src = tmp_path / "cal.c"
    src.write_text(r'''
#include "board.h"
#include "main_functions.h"
#include "qemu_m4.h"
void app_setup(void) { board_init(); }
void app_loop(void) {
    uint32_t t0 = board_counter(), t1, n = 1000000u;   /* 4 instructions per turn */
    __asm volatile("mov r0, %0\n1: nop\n nop\n subs r0, #1\n bne 1b" :: "r"(n) : "r0", "cc");
    t1 = board_counter();
    board_exit((int)((t1 - t0) / 1000u));               /* ticks / 1000 as the exit status */
}
''')
    elf = tmp_path / "cal.elf"
    board = FW / "boards" / "qemu_m4"
    subprocess.run(["arm-none-eabi-gcc", *firmware.CFLAGS[:5], "-std=gnu99", f"-I{FW / 'src'}", f"-I{board}",
                    str(src), *map(str, sorted(board.glob("*.c"))), "-T", str(board / "link.ld"),
                    *firmware.LDFLAGS, "-o", str(elf)], check=True, capture_output=True)
    proc = subprocess.run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial",
                           "null", "-icount", "shift=0", "-semihosting-config", "enable=on,target=native",
                           "-kernel", str(elf)], capture_output=True, timeout=60, check=False)
    ticks = proc.returncode * 1000
    assert firmware.instructions(ticks) == 4_000_000 and ticks == 100_000


def test_streaming_pipeline_equals_the_host(device, host, tiny, clips):
    """One second streamed in 4000-sample chunks through the live pipeline (ring, 20 ms mel frames,
    window peak, log/DCT per inference): its input tensor equals the same streaming arithmetic
    built for the host, and the scores equal TFLite Micro's on it."""
    from tiers.tier0 import verify

    info = device.info
    clip = clips.audio[one_per_class(clips)[0]]
    steps = [device.stream(clip[k:k + 4000], reset=k == 0, want_input=True) for k in range(0, 16000, 4000)]
    assert [s.samples for s in steps] == [4000, 8000, 12000, 16000]
    assert [s.ran for s in steps] == [False, False, False, True] and steps[-1].inferences == 1
    mel = np.empty((49, 40), np.float32)
    feats = np.empty((49, 10), np.float32)
    for f in range(49):
        host.kws_mel_frame(np.ascontiguousarray(clip[f * 320:f * 320 + 480]), 32768.0, mel[f])
        host.kws_mfcc_from_mel(mel[f], 32768.0 / host.kws_peak(clip, 16000), feats[f])
    q = np.empty(490, np.int8)
    host.kws_quantize_int8(feats.reshape(-1), q, 490, info.input_scale, info.input_zero_point)
    np.testing.assert_array_equal(steps[-1].input, q)
    np.testing.assert_array_equal(steps[-1].scores, verify.run(tiny[1], q).reshape(-1))
    batch = host_input(host, clip, info.input_scale, info.input_zero_point)[1]
    assert np.mean(batch == q) > 0.99   # the two halves of the streaming front end: float rounding apart

    # Keep going: one inference per chunk once a second is buffered; time runs in 20 ms slices.
    more = [device.stream(clips.audio[5][k:k + 4000]) for k in range(0, 16000, 4000)]
    assert [s.inferences for s in more] == [2, 3, 4, 5] and more[-1].samples == 32000
    assert all(line.startswith(("DET ", "# ")) for line in device.link.lines)


def test_malformed_frames_get_an_error_and_the_firmware_stays_up(device):
    from tiers.tier0.monitor import DeviceReplyError, encode_frame

    link = device.link
    good = encode_frame("I")
    link.send_raw(good[:-1] + bytes([good[-1] ^ 0xFF]))                    # bad CRC
    r = link.read_reply()
    assert r.type == "e" and r.payload[0] == 1
    assert device.link.info().board == "qemu_m4"
    link.send_raw(b"garbage\x00\xff" + encode_frame("Z"))                  # noise, then an unknown type
    r = link.read_reply()
    assert r.type == "e" and r.payload[0] == 4
    link.send_raw(b"\xa5\x5a" + bytes([ord("C"), 0]) + (0xFFFFFFFF).to_bytes(4, "little"))  # absurd length
    r = link.read_reply()
    assert r.type == "e" and r.payload[0] == 2
    with pytest.raises(DeviceReplyError, match="bad length"):
        link.request("C", b"\x00" * 100, expect="s")                       # a clip must be 16000 samples
    link.send_raw(encode_frame("I")[:5])                                   # half a header, then a whole frame:
    with pytest.raises(DeviceReplyError) as e:                             # its first bytes finish the header
        link.request("I", expect="i", timeout=10)
    assert e.value.code == 2
    assert device.link.info().board == "qemu_m4"                           # still up


def test_close_leaves_no_emulator_behind(build):
    from tiers.tier0 import firmware

    dev = firmware.QemuDevice.start(build.elf)
    pid = dev.proc.pid
    assert dev.close() == 0                                                # exited through semihosting
    assert dev.proc.poll() is not None
    dropped = firmware.QemuDevice.start(build.elf)
    pid2 = dropped.proc.pid
    del dropped                                                            # the finaliser kills it
    time.sleep(0.2)
    for p in (pid, pid2):
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)


# ====================================================================== the recognizer, on the host

class _Cfg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("average_window_ms", "threshold", "suppression_ms", "minimum_count",
                                              "silence_index")]


class _Res(ctypes.Structure):
    _fields_ = [("found", ctypes.c_int), ("score", ctypes.c_int32), ("is_new", ctypes.c_int)]


def test_recognizer_smooths_thresholds_and_suppresses(host):
    """micro_speech's RecognizeCommands: an average over ~1 s, a threshold, no repeat within 1.5 s."""
    cfg = _Cfg()
    host.recognizer_default_config(ctypes.byref(cfg))
    assert (cfg.average_window_ms, cfg.threshold, cfg.suppression_ms, cfg.minimum_count) == (1000, 200, 1500, 3)
    cfg.silence_index = 10
    host.recognizer_init(ctypes.byref(cfg), 12)

    def feed(label: int, p: float, t: int) -> tuple[int, int, int]:
        s = np.full(12, -128, np.int8)
        s[label] = int(round(p * 256)) - 128
        r = _Res()
        assert host.recognizer_process(s.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)), t, ctypes.byref(r)) == 0
        return r.found, r.score, r.is_new

    events = [(t, *feed(0, 0.95, t)) for t in range(0, 3000, 100)]       # "yes" for 3 s, every 100 ms
    new = [(t, f) for t, f, _, n in events if n]
    assert new[0] == (300, 0)                # needs 3 results spanning >= 250 ms
    assert [t for t, _ in new] == [300, 1900]  # then quiet for 1.5 s, then again
    assert feed(1, 0.5, 3000)[2] == 0        # a weak "no": the average stays on "yes"
    r = _Res()
    s = np.zeros(12, np.int8)
    assert host.recognizer_process(s.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)), 10, ctypes.byref(r)) == -1


# ====================================================================== the MLPerf Tiny-size model

def test_mlperf_size_dscnn_on_the_device(tmp_path, cache, clips):
    """The reference DS-CNN's shape (64 channels, 4 blocks, random int8 weights: no training)
    on the emulated M4: scores equal TFLite Micro's, and what one inference costs."""
    _need_tools()
    from models import kws
    from tests.test_kws_export import dscnn_model
    from tiers.tier0 import export, firmware, verify

    tfl = dscnn_model(0, channels=64, blocks=4)
    export.export_c(tfl, tmp_path / "model")
    b = firmware.build_qemu(tmp_path / "model", cache_dir=cache)
    with firmware.QemuDevice.start(b.elf) as dev:
        r = dev.classify_full(clips.audio[7], want_input=True)
        np.testing.assert_array_equal(r.scores, verify.run(tfl, r.input).reshape(-1))
        n, macs = dev.instructions(r.invoke_count), kws.macs("s")
    print(f"DS-CNN 64x4: {n:,} instructions per inference for {macs:,} MACs = {n / macs:.2f} per MAC; "
          f"features {dev.instructions(r.feature_count):,}; image flash {b.size.flash:,} B, RAM {b.size.ram:,} B")
    # the kernels' target on the M4 (instructions are deterministic under -icount: no flakiness)
    assert n / macs <= 2.0


# ====================================================================== B6 and the kws commands

def test_b6_through_the_runner_on_qemu(tmp_path, monkeypatch):
    """`tierkit run B6` for the Nano reference kit with no board attached: tiny synthetic data,
    two epochs, four clips on the emulated Cortex-M4; the build folder has every number."""
    _need_tools()
    from tiers import runner
    from tiers.fit import fit, reference_profile

    monkeypatch.setenv("TIERKIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TIERKIT_CACHE", str(tmp_path / "cache"))
    prof = reference_profile("arduino-nano-33-ble-sense")
    plan = fit(prof, "B6", size="ds-cnn-xs")
    plan.config.update({"epochs": 2, "train_samples": 300, "synth_speakers": 8, "device_clips": 4})
    res = runner.run(plan, prof, tmp_path / "builds")
    folder = tmp_path / "builds" / "B06-keyword-spotter"
    assert {"README.md", "metrics.json", "confusion_matrix.png", "model.tflite", "model"} <= {p.name for p in folder.iterdir()}
    m = json.loads((folder / "metrics.json").read_text())["metrics"]
    assert m["bit_exact"]["scores_equal_tflm"] == m["bit_exact"]["of"] == 4
    assert m["device"]["where"].startswith("QEMU") and m["device"]["image"]["flash"] < m["device"]["board_budget"]["flash_bytes"]
    assert m["model"]["arena_bytes"] > 0 and m["model"]["tflm_arena_bytes"] > 0 and m["latency"]["model"] > 0
    assert set(m["accuracy"]) >= {"float", "int8", "tflm", "device"}
    readme = (folder / "README.md").read_text()
    for needle in ("## Keyword spotter", "| on the device (QEMU", "TFLite Micro's arena", "confusion_matrix.png"):
        assert needle in readme
    assert "equal TFLite Micro" in res.summary


def test_kws_train_export_eval_commands(home, tmp_path):
    """On a fresh machine, with no dataset given: train, export, then measure on the emulated board."""
    _need_tools()
    env = {"TIERKIT_DATA": str(tmp_path / "data"), "TIERKIT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "kws-model"
    proc = run_cli("kws", "train", "--size", "xs", "--epochs", "1", "--train-samples", "200", "--synth-speakers", "8",
                   "--out", str(out), home=home, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.tflite").is_file() and "TFLite Micro" in proc.stdout
    proc = run_cli("kws", "export", str(out / "model.tflite"), "--out", str(tmp_path / "c"), home=home, env=env)
    assert proc.returncode == 0 and (tmp_path / "c" / "model.c").is_file(), proc.stderr
    proc = run_cli("kws", "eval", "--model-dir", str(tmp_path / "c"), "--tflite", str(out / "model.tflite"),
                   "--synth-speakers", "8", "--limit", "3", "--json", home=home, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["clips"] == 3 and doc["scores_equal_tflm"] == 3 and doc["where"].startswith("QEMU")
    assert_one_line_error(run_cli("kws", "export", str(tmp_path / "nope.tflite"), home=home), "cannot read")
