"""The keyword-spotter firmware on an emulated Cortex-M4: build it, run it, talk to it.

    build_qemu(model_dir)   arm-none-eabi-gcc -> fw.elf, cached by the sources' hash
    QemuDevice.start(elf)   qemu-system-arm -M mps2-an386, its UART on a pseudo-terminal
    dev.classify(clip)      -> the 12 int8 scores, over that pty with pyserial only
    dev.close()             the firmware exits through semihosting; QEMU is killed if it lingers

This is what tests and CI run where no board is attached: the same application
(firmware/src/) and libraries (features, kernels, the exported model) as on a
board, with board support in firmware/boards/qemu_m4/. The emulator runs under
`-icount shift=0`, so each guest instruction advances virtual time by exactly
1 ns and SysTick (25 MHz) ticks every 40 instructions: the firmware's latency
counts become instruction counts that do not depend on how busy the host is.
They are instructions, not cycles: QEMU does not model the M4's pipeline.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from inventory.files import atomic_path, atomic_write
from tiers.tier0.flash import FIRMWARE_DIR, BuildFailed, ImageSize, cache_root, image_size, offline_line, project_dir
from tiers.tier0.monitor import Classification, DeviceError, DeviceInfo, Link, StreamStep

QEMU_MACHINE = "mps2-an386"
GCC = "arm-none-eabi-gcc"
QEMU = "qemu-system-arm"
APT_HINT = "sudo apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"

# -std=c99 and -ffp-contract=off: no fused multiply-adds, so the float front end gives
# the same bits as the same C built for the host (kws_features.h).
CFLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-O2", "-std=c99",
          "-ffp-contract=off", "-Wall", "-Wextra", "-ffunction-sections", "-fdata-sections", "-g")
LDFLAGS = ("-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections")
SYSTICK_HZ = 25_000_000   # QEMU's mps2 CPU clock, which SysTick counts with CLKSOURCE=1


class FirmwareError(Exception):
    """Building or running the emulated firmware failed; str() is one line."""


class ToolMissing(FirmwareError):
    """arm-none-eabi-gcc or qemu-system-arm is not installed."""


def tool(name: str) -> str:
    """The path of a cross tool, or ToolMissing naming the Debian packages to install."""
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} is not installed: {APT_HINT}")
    return path


# ====================================================================== build

def sources(model_dir: Path) -> tuple[list[Path], list[Path]]:
    """(C files, include dirs) of the QEMU image: application, board support, libraries, model."""
    model_dir = Path(model_dir)
    if not (model_dir / "model.c").is_file() or not (model_dir / "model.h").is_file():
        raise FirmwareError(f"no exported model in {model_dir} (model.c, model.h): run "
                            f"`tierkit kws export MODEL.tflite --out {model_dir}` first")
    board = FIRMWARE_DIR / "boards" / "qemu_m4"
    libs = [FIRMWARE_DIR / "lib" / "features", FIRMWARE_DIR / "lib" / "kernels"]
    c = [*sorted((FIRMWARE_DIR / "src").glob("*.c")), *sorted(board.glob("*.c")),
         *[p for d in libs for p in sorted(d.glob("*.c"))], *sorted(model_dir.glob("*.c"))]
    return c, [FIRMWARE_DIR / "src", board, *libs, model_dir]


def build_key(model_dir: Path, extra_cflags: tuple[str, ...] = ()) -> str:
    """sha256 over every source and header, the flags, and the compiler's version."""
    c_files, inc = sources(model_dir)
    h = hashlib.sha256()
    files = {*c_files, *(p for d in inc for p in d.glob("*.h")), FIRMWARE_DIR / "boards" / "qemu_m4" / "link.ld"}
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(" ".join((*CFLAGS, *extra_cflags, *LDFLAGS)).encode())
    h.update(_gcc_version().encode())
    return h.hexdigest()


def _gcc_version() -> str:
    out = subprocess.run([tool(GCC), "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "?"


@dataclass
class Build:
    """A built QEMU image."""

    elf: Path
    key: str
    cached: bool            # found in the cache, not compiled now
    size: ImageSize
    seconds: float
    warnings: str = ""      # the compiler's stderr, when it said anything


def build_qemu(model_dir: str | Path, *, cache_dir: str | Path | None = None,
               extra_cflags: tuple[str, ...] = (), force: bool = False) -> Build:
    """Build the firmware for QEMU mps2-an386, or find it built: the cache is keyed by the sources' hash.

    The linker writes the image under a temporary name that is renamed into
    place once it is whole (inventory.files.atomic_path), so an interrupted
    build never leaves a half-written fw.elf, and two parallel builds of the
    same key each rename a complete one.
    """
    t0 = time.perf_counter()
    gcc = tool(GCC)
    model_dir = Path(model_dir)
    key = build_key(model_dir, tuple(extra_cflags))
    final = (Path(cache_dir) if cache_dir is not None else cache_root()) / f"qemu-{key[:20]}"
    elf, warnings = final / "fw.elf", final / "warnings.txt"
    if elf.is_file() and not force:
        warn = warnings.read_text() if warnings.is_file() else ""
        return Build(elf, key, True, image_size(elf), time.perf_counter() - t0, warn)
    c_files, inc = sources(model_dir)
    with atomic_path(final / "fw.map") as fw_map, atomic_path(elf) as tmp_elf:
        cmd = [gcc, *CFLAGS, *extra_cflags, *(f"-I{d}" for d in inc), *map(str, c_files),
               "-T", str(FIRMWARE_DIR / "boards" / "qemu_m4" / "link.ld"), *LDFLAGS,
               f"-Wl,-Map={fw_map}", "-lm", "-o", str(tmp_elf)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise FirmwareError(f"firmware build for QEMU failed (exit {proc.returncode}): {_first_errors(proc.stderr)}")
        atomic_write(warnings, proc.stderr)
        atomic_write(final / "command.txt", " ".join(cmd) + "\n")
    return Build(elf, key, False, image_size(elf), time.perf_counter() - t0, proc.stderr)


def local_build(env: str, on_line: Callable[[str], None] | None = None) -> Path:
    """Offline, for `kws flash --no-upload`: the work project's firmware and model built for a Cortex-M4 here.

    Its size is the model, kernels and front end without the board's framework: the part the
    model decides, checked against the board before PlatformIO has fetched its platform."""
    try:
        return Path(build_qemu(project_dir() / "lib" / "model").elf)
    except FirmwareError as exc:
        raise BuildFailed(f"{offline_line(env)}; the local build failed too: {exc}") from None


def _first_errors(stderr: str, most: int = 3) -> str:
    """The compiler's first error lines (later ones are mostly consequences), on one line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r": (fatal )?error:|undefined reference|^collect2", ln)] or lines[-most:]
    return " | ".join(errors[:most]) or "no output"


# ====================================================================== run

def instructions(ticks: int, shift: int = 0) -> int:
    """SysTick ticks under `-icount shift=N` as guest instructions: 1e9 / 2^N / 25 MHz per tick."""
    return round(ticks * 1e9 / (2 ** shift) / SYSTICK_HZ)


class QemuDevice:
    """A running emulated board: `classify(clip)` returns the int8 scores the firmware computed.

    Use as a context manager, or call close(): QEMU is asked to exit through the
    firmware (semihosting), then terminated, then killed; a finaliser does the
    same if the object is dropped, so no emulator outlives its owner.
    """

    def __init__(self, proc: subprocess.Popen, pty: str, link: Link, serial_port, shift: int | None,
                 output: deque[str]):
        self.proc = proc
        self.pty = pty
        self.link = link
        self._serial = serial_port
        self.icount_shift = shift
        self._output = output
        self._finalizer = weakref.finalize(self, _kill, proc, serial_port)
        self.info: DeviceInfo = link.info()

    @classmethod
    def start(cls, elf: str | Path, *, icount_shift: int | None = 0, timeout: float = 120.0,
              boot_timeout: float = 60.0) -> QemuDevice:
        """Launch QEMU on `elf` with `-serial pty`, find the pty, open it with pyserial, ask for info."""
        import serial

        qemu = tool(QEMU)
        cmd = [qemu, "-M", QEMU_MACHINE, "-nographic", "-monitor", "none", "-serial", "pty",
               "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]
        if icount_shift is not None:
            cmd[1:1] = ["-icount", f"shift={icount_shift}"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output: deque[str] = deque(maxlen=50)
        found = threading.Event()
        where: list[str] = []

        def drain() -> None:  # QEMU's stdout: the pty's name first, then semihosting text (faults)
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                output.append(line)
                m = re.search(r"char device redirected to (\S+)", line)
                if m and not where:
                    where.append(m.group(1))
                    found.set()
            found.set()

        threading.Thread(target=drain, name="qemu-stdout", daemon=True).start()
        if not found.wait(boot_timeout) or not where:
            _kill(proc, None)
            raise FirmwareError(f"QEMU did not open its serial pty within {boot_timeout:g} s: "
                                + (" | ".join(output) or f"exit {proc.poll()}"))
        try:
            port = serial.Serial(where[0], 115200, timeout=0.2, write_timeout=timeout, exclusive=True)
        except (serial.SerialException, OSError) as exc:
            _kill(proc, None)
            raise FirmwareError(f"cannot open QEMU's pty {where[0]}: {exc}") from None
        try:
            return cls(proc, where[0], Link(port, timeout=timeout), port, icount_shift, output)
        except DeviceError as exc:
            _kill(proc, port)
            raise FirmwareError(f"the firmware under QEMU does not answer: {exc}; QEMU said: "
                                + (" | ".join(output) or "nothing")) from None

    # -------------------------------------------------------------- requests

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except DeviceError as exc:
            code = self.proc.poll()
            if code is not None:
                raise FirmwareError(f"QEMU exited with status {code} during the request: "
                                    + (" | ".join(self._output) or "no output")) from None
            raise FirmwareError(str(exc)) from None

    def classify(self, clip: np.ndarray) -> np.ndarray:
        """The firmware's 12 int8 scores for one 1 s int16 clip."""
        return self._call(self.link.classify, clip).scores

    def classify_full(self, clip: np.ndarray, *, want_input: bool = True, want_features: bool = False
                      ) -> Classification:
        """Scores, the int8 input tensor, optionally the float features, and the counts."""
        return self._call(self.link.classify, clip, want_input=want_input, want_features=want_features)

    def stream(self, pcm: np.ndarray, *, reset: bool = False, want_input: bool = False) -> StreamStep:
        return self._call(self.link.stream, pcm, reset=reset, want_input=want_input)

    def instructions(self, ticks: int) -> int:
        """Convert a count from a reply to guest instructions (needs -icount)."""
        if self.icount_shift is None:
            raise FirmwareError("QEMU was started without -icount: counts are host time, not instructions")
        return instructions(ticks, self.icount_shift)

    @property
    def output(self) -> list[str]:
        """What QEMU printed (the pty line, semihosting messages)."""
        return list(self._output)

    # -------------------------------------------------------------- shutdown

    def close(self, timeout: float = 5.0) -> int | None:
        """Stop the emulator; returns its exit status (0 after a clean quit)."""
        if self.proc.poll() is None:
            # termios.error: the pty went away under pyserial's flush (QEMU exiting at that moment)
            gone = (DeviceError, OSError, subprocess.TimeoutExpired, ValueError, *_termios_error())
            with contextlib.suppress(gone):
                self.link.quit(0)
                self.proc.wait(timeout)
        self._finalizer()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _termios_error() -> tuple[type[BaseException], ...]:
    try:
        import termios
    except ImportError:   # not a POSIX system
        return ()
    return (termios.error,)


def _kill(proc: subprocess.Popen, port) -> None:
    if port is not None:
        with contextlib.suppress(Exception):
            port.close()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)
    if proc.stdout is not None:
        with contextlib.suppress(Exception):
            proc.stdout.close()
