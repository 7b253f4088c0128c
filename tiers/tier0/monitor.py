"""Talking to the keyword-spotter firmware over a serial port: detection lines and test mode.

The firmware writes two kinds of output on one serial line (firmware/README.md):

    DET yes 0.91 12340        a detection: label, smoothed probability, ms of audio
    # tierkit kws firmware... anything else, for people
    A5 5A <frame>             a binary reply to the host's test-mode request

Text never contains the byte 0xA5, so `Link` takes the two apart as they come.
`Link` speaks the framed test-mode protocol (firmware/src/test_mode.h): info,
classify a 1 s clip (scores, input tensor, features, cycle counts), stream audio
through the live pipeline. `monitor()` just reads lines, and survives the board
resetting: a native-USB board's port disappears and comes back, often under
the same name, sometimes under another (found again by its USB serial number).

Only pyserial: this is also what runs against the emulated Cortex-M4's pty.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"\xa5\x5a"
CLIP_SAMPLES = 16_000
STREAM_MAX_SAMPLES = 4096
ERROR_CODES = {1: "bad CRC", 2: "frame too long", 3: "bad length", 4: "unknown type", 5: "timeout inside a frame",
               6: "unsupported", 7: "model failed"}
DET_RE = re.compile(r"^DET (\S+) ([0-9.]+) (\d+)$")


class DeviceError(Exception):
    """The device did not answer as the protocol says; str() is one line."""


class PortError(DeviceError):
    """The serial port cannot be used: missing, busy, or no permission. One line with the fix."""


class DeviceReplyError(DeviceError):
    """The device answered with an error frame ('e')."""

    def __init__(self, code: int, message: str):
        super().__init__(f"device error {code} ({ERROR_CODES.get(code, '?')}): {message}")
        self.code = code


@dataclass(frozen=True)
class Detection:
    """One `DET` line: a keyword heard."""

    label: str
    score: float       # average probability over the smoothing window, 0..1
    time_ms: int       # ms of audio since the stream started

    @classmethod
    def parse(cls, line: str) -> Detection | None:
        m = DET_RE.match(line.strip())
        return cls(m.group(1), float(m.group(2)), int(m.group(3))) if m else None


@dataclass(frozen=True)
class Reply:
    type: str
    flags: int
    payload: bytes


@dataclass
class DeviceInfo:
    """The 'i' reply: what the firmware runs and how to read its numbers."""

    board: str
    counter_hz: int
    counter_unit: str          # "cycles", "us", or "systick" (QEMU: ticks of the 25 MHz clock)
    classes: int
    inputs: int
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    arena_bytes: int
    const_bytes: int
    labels: list[str]
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DeviceInfo:
        kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

        def f32(key: str) -> float:
            return float(np.array([int(kv[key], 16)], np.uint32).view(np.float32)[0])

        try:
            return cls(board=kv["board"], counter_hz=int(kv["counter_hz"]), counter_unit=kv["counter_unit"],
                       classes=int(kv["classes"]), inputs=int(kv["inputs"]), input_scale=f32("input_scale_bits"),
                       input_zero_point=int(kv["input_zero_point"]), output_scale=f32("output_scale_bits"),
                       output_zero_point=int(kv["output_zero_point"]), arena_bytes=int(kv["arena_bytes"]),
                       const_bytes=int(kv["const_bytes"]), labels=kv["labels"].split(","), raw=kv)
        except (KeyError, ValueError) as exc:
            raise DeviceError(f"the device's info reply lacks or garbles {exc}: is this tierkit's firmware?") from None


@dataclass
class Classification:
    """The 's' reply to one clip."""

    scores: np.ndarray                 # int8, one per class
    feature_count: int                 # counter ticks spent on the features
    invoke_count: int                  # ... on the model
    input: np.ndarray | None = None    # int8 input tensor (490), when asked for
    features: np.ndarray | None = None  # float32 MFCC (49, 10), when asked for


@dataclass
class StreamStep:
    """The 'a' reply to one chunk of streamed audio."""

    samples: int          # since the stream started
    inferences: int
    detections: int
    ran: bool             # the model ran on this chunk
    invoke_count: int
    scores: np.ndarray    # int8: this chunk's inference, else the last one
    input: np.ndarray | None = None


def encode_frame(kind: str, payload: bytes = b"", flags: int = 0) -> bytes:
    """A test-mode frame: A5 5A, type, flags, u32 length, payload, zlib CRC-32 of all but the magic."""
    head = bytes([ord(kind), flags]) + struct.pack("<I", len(payload))
    return MAGIC + head + payload + struct.pack("<I", zlib.crc32(head + payload))


def _pcm_bytes(audio: np.ndarray, what: str, most: int, exact: bool) -> bytes:
    a = np.asarray(audio)
    if a.ndim != 1 or (exact and len(a) != most) or len(a) > most:
        need = f"exactly {most}" if exact else f"at most {most}"
        raise ValueError(f"{what} takes {need} int16 samples, got shape {a.shape}")
    if a.dtype != np.int16:
        if np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{what} takes int16 PCM (as the microphone gives); got {a.dtype}")
        a = a.astype(np.int16)
    return a.astype("<i2").tobytes()


class Link:
    """The test-mode protocol over an open pyserial port (or anything with read/write/in_waiting).

    Text lines that arrive between replies go to `on_line` and are kept in
    `lines`; `DET` lines are parsed into `detections`.
    """

    def __init__(self, port: Any, *, timeout: float = 30.0, on_line: Callable[[str], None] | None = None):
        self.port = port
        self.timeout = timeout
        self.on_line = on_line
        self.lines: list[str] = []
        self.detections: list[Detection] = []
        self._buf = bytearray()
        self._text = bytearray()
        self._info: DeviceInfo | None = None

    # -------------------------------------------------------------- bytes in, frames and lines out

    def _fill(self, deadline: float) -> None:
        waiting = getattr(self.port, "in_waiting", 0) or 0
        chunk = self.port.read(max(1, min(waiting, 65536)))
        if not chunk and time.monotonic() > deadline:
            raise DeviceError(f"no reply from the device within {self.timeout:g} s")
        self._buf += chunk

    def _take_text(self) -> None:
        """Move bytes before the next A5 into text lines."""
        cut = self._buf.find(MAGIC[:1])
        text = self._buf if cut < 0 else self._buf[:cut]
        self._text += text
        del self._buf[:len(text)]
        while b"\n" in self._text:
            line, _, rest = bytes(self._text).partition(b"\n")
            self._text = bytearray(rest)
            self._line(line.decode("utf-8", "replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        self.lines.append(line)
        det = Detection.parse(line)
        if det:
            self.detections.append(det)
        if self.on_line:
            self.on_line(line)

    def read_reply(self, timeout: float | None = None) -> Reply:
        """The next frame from the device (text before it goes to the lines)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._take_text()
            if len(self._buf) >= 2 and self._buf[1] != MAGIC[1]:
                self._text += self._buf[:1]          # a stray 0xA5 (line noise): not a frame
                del self._buf[:1]
                continue
            if len(self._buf) >= 8:
                n = struct.unpack_from("<I", self._buf, 4)[0]
                if n > 1 << 20:
                    del self._buf[:2]
                    raise DeviceError(f"garbled frame header (length {n}); is the baud rate right?")
                if len(self._buf) >= 12 + n:
                    body = bytes(self._buf[2:8 + n])
                    (crc,) = struct.unpack_from("<I", self._buf, 8 + n)
                    del self._buf[:12 + n]
                    if zlib.crc32(body) != crc:
                        raise DeviceError("reply with a bad CRC: the serial line is corrupting data")
                    return Reply(chr(body[0]), body[1], body[6:])
            self._fill(deadline)

    def request(self, kind: str, payload: bytes = b"", flags: int = 0, *, expect: str,
                timeout: float | None = None) -> Reply:
        self.port.write(encode_frame(kind, payload, flags))
        if hasattr(self.port, "flush"):
            self.port.flush()
        reply = self.read_reply(timeout)
        if reply.type == "e":
            raise DeviceReplyError(reply.payload[0] if reply.payload else 0,
                                   reply.payload[1:].decode("utf-8", "replace"))
        if reply.type != expect:
            raise DeviceError(f"expected a {expect!r} reply to {kind!r}, got {reply.type!r}")
        return reply

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are: for testing how the firmware takes malformed frames."""
        self.port.write(data)
        if hasattr(self.port, "flush"):
            self.port.flush()

    # -------------------------------------------------------------- the requests

    def info(self) -> DeviceInfo:
        self._info = DeviceInfo.parse(self.request("I", expect="i").payload.decode("utf-8", "replace"))
        return self._info

    @property
    def device(self) -> DeviceInfo:
        return self._info or self.info()

    def classify(self, clip: np.ndarray, *, want_input: bool = False, want_features: bool = False) -> Classification:
        """Scores (and optionally the int8 input and the float features) for one 1 s int16 clip."""
        flags = (1 if want_input else 0) | (2 if want_features else 0)
        r = self.request("C", _pcm_bytes(clip, "classify", CLIP_SAMPLES, True), flags, expect="s")
        p = r.payload
        n_out, rflags, n_in = p[0], p[1], struct.unpack_from("<H", p, 2)[0]
        scores = np.frombuffer(p, np.int8, n_out, 4).copy()
        fc, ic, _status = struct.unpack_from("<IIi", p, 4 + n_out)
        at = 16 + n_out
        inp = feats = None
        if rflags & 1:
            inp, at = np.frombuffer(p, np.int8, n_in, at).copy(), at + n_in
        if rflags & 2:
            feats = np.frombuffer(p, "<f4", n_in, at).astype(np.float32).reshape(-1, 10)
        return Classification(scores, fc, ic, inp, feats)

    def stream(self, pcm: np.ndarray, *, reset: bool = False, want_input: bool = False) -> StreamStep:
        """Push up to 4096 samples through the live pipeline; at most one inference runs."""
        flags = (4 if reset else 0) | (1 if want_input else 0)
        p = self.request("A", _pcm_bytes(pcm, "stream", STREAM_MAX_SAMPLES, False), flags, expect="a").payload
        samples, inferences, detections, invoke = struct.unpack_from("<IIII", p, 0)
        ran, n_out = p[16], p[17]
        scores = np.frombuffer(p, np.int8, n_out, 18).copy()
        inp = np.frombuffer(p, np.int8, len(p) - 18 - n_out, 18 + n_out).copy() if len(p) > 18 + n_out else None
        return StreamStep(samples, inferences, detections, bool(ran), invoke, scores, inp)

    def live(self) -> bool:
        """Back to the microphone; False if the board has none."""
        return self.request("L", expect="l").payload[:1] == b"\x00"

    def quit(self, code: int = 0) -> None:
        """Ask the firmware to stop: QEMU exits with `code`, a board resets."""
        self.request("Q", bytes([code & 0xFF]), expect="q", timeout=5.0)


# ====================================================================== ports

def open_port(port: str, baud: int = 115200, *, timeout: float = 0.2, exclusive: bool = True) -> Any:
    """Open a serial port with pyserial, or raise PortError with one line that says what to do."""
    try:
        import serial
    except ImportError:
        raise PortError("pyserial is not installed: pip install pyserial") from None
    if not os.path.exists(port) and not port.upper().startswith("COM"):
        raise PortError(f"no such port {port}: is the board plugged in? (`tierkit probe` lists the ports)")
    try:
        return serial.Serial(port, baud, timeout=timeout, write_timeout=30, exclusive=exclusive)
    except serial.SerialException as exc:
        raise PortError(_port_problem(port, exc)) from None
    except OSError as exc:
        raise PortError(_port_problem(port, exc)) from None


def _port_problem(port: str, exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.EACCES or "Permission denied" in text:
        with contextlib.suppress(Exception):   # the generic advice below is enough
            from inventory.detect.boards import check_access

            access, fix = check_access(port)
            if access == "denied" and fix:
                return fix
        return f"{port}: permission denied; add yourself to the port's group (`sudo usermod -aG dialout $USER`) and log in again"
    if code in (errno.EBUSY, errno.EAGAIN) or "Resource temporarily unavailable" in text or "busy" in text.lower():
        return (f"{port} is busy: another program has it open (a serial monitor, the Arduino IDE, "
                "ModemManager); close it and try again")
    if code == errno.ENOENT or "No such file" in text:
        return f"no such port {port}: is the board plugged in? (`tierkit probe` lists the ports)"
    return f"{port}: cannot open ({text.splitlines()[0] if text else type(exc).__name__})"


def _usb_identity(port: str) -> tuple[str | None, str | None]:
    """(VID:PID, serial number) of a USB port, to find it again under another name after a reset."""
    try:
        from serial.tools import list_ports

        real = os.path.realpath(port)
        for p in list_ports.comports():
            if p.device in (port, real) and p.vid is not None:
                return f"{p.vid:04X}:{p.pid:04X}", p.serial_number
    except Exception:  # noqa: BLE001 - identity is a nicety
        return None, None
    return None, None


def _find_again(port: str, identity: tuple[str | None, str | None]) -> str | None:
    """The port to reopen: the same path if it is back, else the one with the same USB serial number."""
    if os.path.exists(port):
        return port
    vid_pid, serial_number = identity
    if vid_pid is None or serial_number is None:
        return None
    try:
        from serial.tools import list_ports

        for p in list_ports.comports():
            if p.vid is not None and p.serial_number == serial_number:
                return p.device
    except Exception:  # noqa: BLE001 - no way to look: the caller waits for the same path
        return None
    return None


@dataclass
class MonitorStats:
    lines: int = 0
    detections: int = 0
    reconnects: int = 0


def monitor(port: str, *, baud: int = 115200, on_line: Callable[[str], None] = print,
            on_detection: Callable[[Detection], None] | None = None,
            on_status: Callable[[str], None] | None = None, stop: Callable[[], bool] = lambda: False,
            reconnect: bool = True, reconnect_timeout: float | None = None, poll: float = 0.1) -> MonitorStats:
    """Read the firmware's lines until `stop()` says so; reopen the port when the board resets.

    Every line goes to `on_line`; `DET` lines also to `on_detection`. When the
    port vanishes (reset, replug) `on_status` hears about it and the port is
    reopened as soon as it is back (or the same USB device shows up under another
    name), for up to `reconnect_timeout` seconds (None: forever). The first open
    raises PortError at once: a wrong port should not look like a board resetting.
    """
    stats = MonitorStats()
    say = on_status or (lambda s: None)
    ser = open_port(port, baud, timeout=poll)
    identity = _usb_identity(port)
    pending = bytearray()
    try:
        while not stop():
            try:
                chunk = ser.read(max(1, ser.in_waiting or 0))
            except Exception as exc:  # noqa: BLE001 - pyserial raises SerialException or OSError on a vanished port
                if not reconnect:
                    raise PortError(f"{port} went away ({str(exc).splitlines()[0] if str(exc) else 'closed'})") from None
                with contextlib.suppress(Exception):
                    ser.close()
                say(f"{port} went away (board reset or unplugged); waiting for it to come back")
                ser, port = _reopen(port, identity, baud, poll, stop, reconnect_timeout)
                if ser is None:
                    break
                stats.reconnects += 1
                pending.clear()
                say(f"reconnected to {port}")
                continue
            pending += chunk
            while b"\n" in pending:
                raw, _, rest = bytes(pending).partition(b"\n")
                pending = bytearray(rest)
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if MAGIC[:1].decode("latin-1") in raw.decode("latin-1"):
                    continue  # a test-mode frame someone else asked for: not ours to print
                stats.lines += 1
                on_line(line)
                det = Detection.parse(line)
                if det:
                    stats.detections += 1
                    if on_detection:
                        on_detection(det)
    finally:
        if ser is not None:
            with contextlib.suppress(Exception):
                ser.close()
    return stats


def _reopen(port: str, identity: tuple[str | None, str | None], baud: int, poll: float,
            stop: Callable[[], bool], timeout: float | None) -> tuple[Any, str]:
    """Wait for the port (or its USB twin) and open it; (None, port) if stopped or timed out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stop() and (deadline is None or time.monotonic() < deadline):
        found = _find_again(port, identity)
        if found:
            try:
                return open_port(found, baud, timeout=poll), found
            except PortError:
                pass  # the node exists but is not ready yet (udev still setting permissions)
        time.sleep(poll)
    if stop():
        return None, port
    raise PortError(f"{port} did not come back within {timeout:g} s; reconnect the board and run the monitor again")
