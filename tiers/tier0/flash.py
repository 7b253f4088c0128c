"""`tierkit kws flash`: build the firmware with PlatformIO and upload it, after checking it fits.

    resolve_target(profile, board, port)   which board, which PlatformIO env, which port
    check_port(port)                       exists, not busy, ours to open
    pio_build(env)                         `pio run -e ENV`, progress line by line
    image_size(elf) + check_image(...)     flash and RAM from the ELF's sections vs the board's budget
    pio_upload(env, port)                  `pio run -e ENV -t nobuild -t upload --upload-port PORT`

The size check runs on the built ELF before anything is uploaded: flash is
everything the image stores (code, constants, the initial values of .data),
RAM everything it occupies (.data, .bss, reserved stack and heap sections), as
`size` counts them. Every failure is a FlashError whose message is one line.
The emulated board's build (firmware.py) reads images with the same
`image_size` and keeps them in the same cache (`cache_root`).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inventory.files import atomic_path

FIRMWARE_DIR = Path(__file__).resolve().parents[2] / "firmware"


def cache_root() -> Path:
    """Where built images live (PlatformIO's and the QEMU build's): $TIERKIT_CACHE/firmware,
    else ~/.cache/tierkit/firmware; never inside the source tree."""
    base = os.environ.get("TIERKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tierkit")
    return Path(base) / "firmware"


class FlashError(Exception):
    """Why nothing was (or could be) flashed; str() is one line."""


class ImageTooLarge(FlashError):
    pass


class BuildFailed(FlashError):
    pass


# ====================================================================== boards

@dataclass(frozen=True)
class BoardTarget:
    """A board this firmware supports, and how PlatformIO names it."""

    key: str                  # what --board takes
    env: str                  # [env:...] in firmware/platformio.ini
    name: str
    mcu: str                  # as inventory/board_catalog.yaml spells it
    flash_bytes: int          # datasheet budget, used when the profile has no figure
    sram_bytes: int
    usb: tuple[str, ...]      # VID:PIDs that name the board (application and bootloader)


TARGETS: dict[str, BoardTarget] = {
    "nano33ble": BoardTarget("nano33ble", "nano33ble", "Arduino Nano 33 BLE Sense", "nRF52840", 1_048_576, 262_144,
                             ("2341:005A", "2341:805A", "2341:015A", "2341:025A")),
    "esp32s3": BoardTarget("esp32s3", "esp32s3", "ESP32-S3 DevKitC-1", "ESP32-S3", 8_388_608, 524_288,
                           ("303A:1001",)),
    "pico": BoardTarget("pico", "pico", "Raspberry Pi Pico", "RP2040", 2_097_152, 270_336,
                        ("2E8A:0005", "2E8A:000A", "2E8A:000B", "2E8A:00C0")),
}
_ALIASES = {"nano33blesense": "nano33ble", "arduinonano33blesense": "nano33ble", "arduinonano33ble": "nano33ble",
            "nano33": "nano33ble", "esp32s3devkitc": "esp32s3", "esp32s3devkitc1": "esp32s3",
            "raspberrypipico": "pico", "rp2040": "pico", "rpipico": "pico"}


def target(name: str) -> BoardTarget:
    """A --board value ("nano33ble", "esp32-s3", "pico", a reference-kit name) as a target; FlashError otherwise."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    key = _ALIASES.get(key, key)
    if key not in TARGETS:
        raise FlashError(f"unknown board {name!r}: this firmware builds for {', '.join(TARGETS)}")
    return TARGETS[key]


def target_for_spec(spec: Any) -> BoardTarget | None:
    """The target whose MCU a profile's BoardSpec names (None: not one we build for)."""
    mcu = (getattr(spec, "mcu", "") or "").lower().replace("-", "")
    name = (getattr(spec, "name", "") or "").lower()
    for t in TARGETS.values():
        if t.mcu.lower().replace("-", "") == mcu:
            if t.key == "pico" and "pico" not in name:
                continue  # other RP2040 boards (Nano RP2040 Connect) need their own pins
            return t
    return None


@dataclass(frozen=True)
class Budget:
    """What the image may use on the board."""

    name: str
    flash_bytes: int
    sram_bytes: int
    source: str               # "profile" or "datasheet"


@dataclass(frozen=True)
class Resolved:
    target: BoardTarget
    port: str | None
    budget: Budget


def resolve_target(profile: Any | None, board: str | None, port: str | None) -> Resolved:
    """Board, port and budget from the options, else from the profile's attached boards.

    No board anywhere is "no board"; a board we do not build for, or a port whose
    USB id names a different board than --board, is "wrong board".
    """
    attached = [b for b in (getattr(profile, "boards", None) or []) if b.port]
    if board is not None:
        t = target(board)
        if port is None:
            mine = [b for b in attached if b.board is not None and target_for_spec(b.board) == t]
            port = mine[0].port if mine else None
        found = _attached_at(attached, port)
        if found is not None and found.board is not None and target_for_spec(found.board) not in (None, t):
            raise FlashError(f"wrong board: {port} is {found.board.name}"
                             + (f" ({found.vid_pid})" if found.vid_pid else "") + f", not {t.name}; "
                             f"pass --board {target_for_spec(found.board).key} or the right --port")
        if port is not None:
            _check_usb_id(port, t)
        spec = found.board if found is not None and found.board is not None else None
        return Resolved(t, port, _budget(t, spec))
    if port is not None:
        found = _attached_at(attached, port)
        if found is None or found.board is None:
            live = _live_target(port)
            if live is None:
                raise FlashError(f"no board known at {port}: pass --board ({', '.join(TARGETS)}), "
                                 "or run `tierkit probe` with the board plugged in")
            return Resolved(live, port, _budget(live, None))
        t = target_for_spec(found.board)
        if t is None:
            raise FlashError(f"wrong board: {found.board.name} on {port} is not one this firmware builds for "
                             f"({', '.join(x.name for x in TARGETS.values())})")
        return Resolved(t, port, _budget(t, found.board))
    if not attached:
        raise FlashError("no board: the profile lists no attached board; plug one in and run `tierkit probe`, "
                         "or pass --board and --port")
    for b in attached:
        if b.board is not None and target_for_spec(b.board) is not None:
            t = target_for_spec(b.board)
            return Resolved(t, b.port, _budget(t, b.board))
    names = ", ".join(f"{b.board.name if b.board else (b.product or 'unknown device')} on {b.port}" for b in attached)
    raise FlashError(f"wrong board: {names}: none is one this firmware builds for "
                     f"({', '.join(x.name for x in TARGETS.values())}); pass --board and --port")


def _attached_at(attached: list[Any], port: str | None) -> Any | None:
    if port is None:
        return None
    return next((b for b in attached if b.port == port), None)


def _budget(t: BoardTarget, spec: Any | None) -> Budget:
    if spec is not None and getattr(spec, "flash_bytes", None) and getattr(spec, "sram_bytes", None):
        return Budget(spec.name, int(spec.flash_bytes), int(spec.sram_bytes), "profile")
    return Budget(t.name, t.flash_bytes, t.sram_bytes, "datasheet")


def _port_usb_id(port: str) -> str | None:
    try:
        from serial.tools import list_ports
    except ImportError:
        return None
    real = os.path.realpath(port)
    for p in list_ports.comports():
        if p.device in (port, real) and p.vid is not None:
            return f"{p.vid:04X}:{p.pid:04X}"
    return None


def _live_target(port: str) -> BoardTarget | None:
    usb = _port_usb_id(port)
    return next((t for t in TARGETS.values() if usb in t.usb), None) if usb else None


def _check_usb_id(port: str, t: BoardTarget) -> None:
    """A port whose VID:PID names another board we know is the wrong one for --board."""
    usb = _port_usb_id(port)
    if usb is None or usb in t.usb:
        return
    other = next((x for x in TARGETS.values() if usb in x.usb), None)
    if other is not None:
        raise FlashError(f"wrong board: {port} is a {other.name} ({usb}), not a {t.name}; "
                         f"pass --board {other.key} or the right --port")
    try:
        from inventory.detect.boards import lookup

        match, spec, _ = lookup(usb)
    except Exception:  # noqa: BLE001
        return
    if match == "board" and spec is not None:
        raise FlashError(f"wrong board: {port} is {spec.name} ({usb}), not {t.name}")


def check_port(port: str) -> None:
    """The port exists, this user may open it, and nobody else has it open; FlashError otherwise."""
    from tiers.tier0.monitor import PortError, open_port

    try:
        open_port(port, exclusive=True).close()
    except PortError as exc:
        raise FlashError(str(exc)) from None


# ====================================================================== image size

@dataclass(frozen=True)
class ImageSize:
    """Berkeley `size` of an ELF: text (code + constants), data, bss (+ reserved RAM sections)."""

    text: int
    data: int
    bss: int

    @property
    def flash(self) -> int:
        return self.text + self.data      # .data's initial values are stored in flash

    @property
    def ram(self) -> int:
        return self.data + self.bss

    def to_dict(self) -> dict[str, int]:
        return {"text": self.text, "data": self.data, "bss": self.bss, "flash": self.flash, "ram": self.ram}


_SHF_WRITE, _SHF_ALLOC = 0x1, 0x2
_SHT_NOBITS = 8


def image_size(elf: str | Path) -> ImageSize:
    """Sizes from the ELF's section headers, as binutils' `size` computes them (any architecture)."""
    path = Path(elf)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise FlashError(f"cannot read the image {path}: {exc.strerror}") from None
    if blob[:4] != b"\x7fELF":
        raise FlashError(f"{path} is not an ELF file")
    bits64, end = blob[4] == 2, "<" if blob[5] == 1 else ">"
    if bits64:
        shoff, = struct.unpack_from(end + "Q", blob, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", blob, 0x3A)
        fmt = end + "IIQQQQ"
    else:
        shoff, = struct.unpack_from(end + "I", blob, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", blob, 0x2E)
        fmt = end + "IIIIII"
    text = data = bss = 0
    for i in range(shnum):
        _, kind, flags, _, _, size = struct.unpack_from(fmt, blob, shoff + i * shentsize)
        if not flags & _SHF_ALLOC:
            continue
        if kind == _SHT_NOBITS:
            bss += size
        elif flags & _SHF_WRITE:
            data += size
        else:
            text += size
    return ImageSize(text, data, bss)


def check_image(size: ImageSize, budget: Budget) -> None:
    """ImageTooLarge (one line, both numbers) if the image overflows the board's flash or RAM."""
    over = []
    if size.flash > budget.flash_bytes:
        over.append(f"flash {size.flash:,} B > {budget.flash_bytes:,} B")
    if size.ram > budget.sram_bytes:
        over.append(f"RAM {size.ram:,} B > {budget.sram_bytes:,} B")
    if over:
        raise ImageTooLarge(f"image too large for {budget.name}: {' and '.join(over)} ({budget.source} budget); "
                            "nothing was uploaded: pick a smaller model size (--size) or a bigger board")


# ====================================================================== PlatformIO

def pio_command() -> list[str]:
    """How to run PlatformIO here, or FlashError("PlatformIO is not installed ...")."""
    for cand in (shutil.which("pio"), shutil.which("platformio"), str(Path(sys.executable).parent / "pio")):
        if cand and os.access(cand, os.X_OK):
            return [cand]
    try:
        import platformio  # noqa: F401
    except ImportError:
        raise FlashError("PlatformIO is not installed: pip install platformio "
                         "(or pip install 'tierkit[tier0]')") from None
    return [sys.executable, "-m", "platformio"]


def pio_env() -> dict[str, str]:
    """PlatformIO's build folder outside the source tree (the cache), so builds never dirty the repo."""
    return {**os.environ, "PLATFORMIO_WORKSPACE_DIR": str(cache_root() / "pio"), "PLATFORMIO_NO_ANSI": "1"}


def _run_pio(args: list[str], what: str, on_line: Callable[[str], None] | None, timeout: float) -> list[str]:
    """Run PlatformIO, streaming its lines; BuildFailed with the last lines if it fails."""
    cmd = [*pio_command(), *args]
    last: deque[str] = deque(maxlen=4)   # the lines worth quoting: no rules, no first-run banner
    lines: list[str] = []
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=project_dir(), env=pio_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
    except OSError as exc:
        raise FlashError(f"cannot run PlatformIO ({cmd[0]}): {exc.strerror}") from None
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            lines.append(line)
            if line.startswith("Processing "):   # PlatformIO starts the env's work here: drop its banner
                last.clear()
            if not re.fullmatch(r"[-*=\s]+", line) and not line.startswith("- "):
                last.append(line.strip())
            if on_line:
                on_line(line)
            if time.monotonic() - t0 > timeout:
                proc.kill()
                raise BuildFailed(f"{what} took over {timeout:g} s and was stopped; last lines: " + " | ".join(last))
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        raise BuildFailed(f"{what} failed (exit {code}); last lines: " + " | ".join(last))
    return lines


def require_model() -> None:
    """The PlatformIO build takes its model from the work project's lib/model; FlashError if nothing is there."""
    lib = project_dir() / "lib" / "model"
    if not (lib / "model.c").is_file() or not (lib / "model.h").is_file():
        raise FlashError(f"no exported model in {lib}: run `tierkit kws export MODEL.tflite` first")


def project_dir() -> Path:
    """The PlatformIO project that is built: a copy of firmware/ in the cache, never the source tree."""
    return cache_root() / "project"


def prepare_project(model_dir: str | Path) -> Path:
    """Copy firmware/ (sources, boards, platformio.ini) into project_dir(), then the exported model into its lib/model.

    copy2 keeps modification times, so PlatformIO rebuilds only what changed.
    """
    src = Path(model_dir)
    for name in ("model.c", "model.h"):
        if not (src / name).is_file():
            raise FlashError(f"no {name} in {src}: export the model there first (`tierkit kws export MODEL.tflite "
                             f"--out {src}`)")
    dst = project_dir()
    try:
        shutil.copytree(FIRMWARE_DIR, dst, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n in (".pio", "__pycache__")
                                                 or (Path(d) == FIRMWARE_DIR / "lib" and n == "model")])
        (dst / "lib" / "model").mkdir(parents=True, exist_ok=True)
        for name in ("model.h", "model.c"):
            with atomic_path(dst / "lib" / "model" / name) as tmp:
                shutil.copy2(src / name, tmp)
    except OSError as exc:
        raise FlashError(f"cannot write the build folder {dst}: {exc.strerror}; set TIERKIT_CACHE to a writable "
                         "folder") from None
    return dst


# where a `kws export` is remembered, so flash and eval find it without --model-dir
LAST_EXPORT = "kws-last-export.txt"


def _state_file() -> Path:
    from inventory.profile import default_path

    return default_path().parent / LAST_EXPORT


def remember_export(folder: str | Path) -> None:
    """Record `folder` as the last exported model (next to the profile: $TIERKIT_HOME or ~/.config/tierkit)."""
    from inventory.files import atomic_write

    with contextlib.suppress(OSError):     # remembering is a convenience; the export itself succeeded
        _state_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write(_state_file(), str(Path(folder).resolve()) + "\n")


def last_export() -> Path:
    """The folder of the last `kws export`; FlashError (one line) when there is none."""
    try:
        folder = Path(_state_file().read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        raise FlashError("no exported model: run `tierkit kws export MODEL.tflite` first, or pass --model-dir FOLDER")
    if not (folder / "model.c").is_file():
        raise FlashError(f"the last export, {folder}, has no model.c any more: export again "
                         "(`tierkit kws export MODEL.tflite`) or pass --model-dir FOLDER")
    return folder


def platform_of(env: str) -> str:
    """The PlatformIO platform an environment of firmware/platformio.ini builds with (nordicnrf52, ...)."""
    import configparser

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(FIRMWARE_DIR / "platformio.ini")
    return ini.get(f"env:{env}", "platform", fallback="?")


def platform_installed(platform: str) -> bool:
    core = Path(os.environ.get("PLATFORMIO_CORE_DIR") or Path.home() / ".platformio")
    return (core / "platforms" / platform).is_dir()


def online(host: str = "api.registry.platformio.org", timeout: float = 3.0) -> bool:
    """Can PlatformIO's registry be reached? (a name lookup and a TCP connect, within `timeout`)"""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_line(env: str) -> str:
    p = platform_of(env)
    return (f"PlatformIO must fetch the {p} platform and its toolchain for {env} from the internet (once), and "
            "there is no network here: connect once and re-run; `--no-upload` checks the size offline")


def pio_build(env: str, on_line: Callable[[str], None] | None = None, timeout: float = 1800) -> Path:
    """`pio run -e ENV`; the firmware.elf it wrote."""
    _run_pio(["run", "-e", env], f"PlatformIO build of {env}", on_line, timeout)
    elf = Path(pio_env()["PLATFORMIO_WORKSPACE_DIR"]) / "build" / env / "firmware.elf"
    if not elf.is_file():
        raise BuildFailed(f"PlatformIO reported success but wrote no {elf}")
    return elf


def pio_upload(env: str, port: str | None, on_line: Callable[[str], None] | None = None,
               timeout: float = 600) -> None:
    """Upload what pio_build built (no rebuild)."""
    args = ["run", "-e", env, "-t", "nobuild", "-t", "upload"] + (["--upload-port", port] if port else [])
    _run_pio(args, f"upload to {port or 'the board'}", on_line, timeout)


# ====================================================================== the whole step

@dataclass
class FlashResult:
    target: BoardTarget
    port: str | None
    budget: Budget
    size: ImageSize
    elf: Path
    uploaded: bool
    seconds: float
    note: str = ""          # how the size was found, when not by PlatformIO

    def line(self) -> str:
        return (f"{self.target.name} on {self.port or '?'}: flash {self.size.flash:,} / {self.budget.flash_bytes:,} B "
                f"({self.size.flash / self.budget.flash_bytes:.0%}), RAM {self.size.ram:,} / "
                f"{self.budget.sram_bytes:,} B ({self.size.ram / self.budget.sram_bytes:.0%})"
                + ("; uploaded" if self.uploaded else "; not uploaded") + (f" ({self.note})" if self.note else ""))


def flash(profile: Any | None, board: str | None = None, port: str | None = None, *,
          model_dir: str | Path | None = None, upload: bool = True,
          on_line: Callable[[str], None] | None = None, on_step: Callable[[str], None] | None = None,
          builder: Callable[..., Path] = pio_build, uploader: Callable[..., None] = pio_upload,
          offline_builder: Callable[..., Path] | None = None) -> FlashResult:
    """Resolve the board, check the port, build, check the image against the budget, then upload.

    `builder(env, on_line)` returns the ELF and `uploader(env, port, on_line)`
    uploads it; tests pass their own to check that an oversized image is never
    uploaded. Nothing is uploaded unless every check before it passed. Offline, before PlatformIO
    has fetched the board's platform, `offline_builder(env, on_line)` (firmware.local_build: the
    local arm-none-eabi-gcc) builds for the size check of --no-upload; without one, FlashError.
    """
    t0 = time.perf_counter()
    step = on_step or (lambda s: None)
    r = resolve_target(profile, board, port)
    if builder is pio_build or (upload and uploader is pio_upload):
        pio_command()
    if upload:
        if r.port is None:
            raise FlashError(f"no board: no port for {r.target.name}; plug it in and pass --port "
                             "(or run `tierkit probe`)")
        step(f"checking {r.port}")
        check_port(r.port)
    if builder is pio_build or model_dir is not None:
        prepare_project(model_dir if model_dir is not None else last_export())
    if builder is pio_build:
        require_model()
        if not platform_installed(platform_of(r.target.env)) and not online():
            if upload or offline_builder is None:
                raise FlashError(offline_line(r.target.env))
            builder = offline_builder
    local = builder is offline_builder
    step(f"building for {r.target.name}'s Cortex-M with the local arm-none-eabi-gcc (PlatformIO offline)" if local
         else f"building for {r.target.name} (PlatformIO env {r.target.env})")
    elf = builder(r.target.env, on_line)
    size = image_size(elf)
    step(f"checking the image: flash {size.flash:,} B, RAM {size.ram:,} B")
    check_image(size, r.budget)
    if upload:
        step(f"uploading to {r.port}")
        uploader(r.target.env, r.port, on_line)
    note = "sizes from the local Cortex-M4 build, without the board's framework: PlatformIO is not fetched yet" \
        if local else ""
    return FlashResult(r.target, r.port, r.budget, size, Path(elf), upload, time.perf_counter() - t0, note)
