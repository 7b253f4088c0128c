"""The hardware profile: one versioned YAML document, validated on load.

Every figure a reader might trust or doubt is a `Figure`: a value, its unit, and
where it came from (`measured` on this machine, a `datasheet`, or the `user`).
Loading never raises anything but `ProfileError`, whose message is one line that
names the bad field and what to do about it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA = "tierkit/profile/v1"
Source = Literal["measured", "datasheet", "user"]


class ProfileError(Exception):
    """A profile that cannot be read; str() is one line with the fix."""


class _Model(BaseModel):
    # Unknown keys are refused so that a typo ("thread: 8") is caught, not ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Figure(_Model):
    value: float
    unit: str
    source: Source
    method: str | None = Field(None, description="how it was obtained: benchmark, formula, datasheet name")
    when: _dt.datetime | None = Field(None, description="when it was measured, for a figure kept from an earlier probe")


class Host(_Model):
    hostname: str
    os: str
    kernel: str | None = None
    python: str | None = None
    tierkit: str | None = None


class Caches(_Model):
    l1d: int | None = Field(None, description="bytes per core")
    l1i: int | None = None
    l2: int | None = Field(None, description="bytes per core (or per cluster)")
    l3: int | None = Field(None, description="bytes, total")


class CPU(_Model):
    model: str
    vendor: str | None = None
    architecture: str
    physical_cores: int = Field(ge=1)
    threads: int = Field(ge=1)
    sockets: int = Field(1, ge=1)
    simd: list[str] = Field(default_factory=list, description="AVX2, AVX-512, AMX, NEON, SVE, ...")
    caches: Caches = Field(default_factory=Caches)
    clock_mhz: float | None = Field(None, gt=0)
    peak_fp32_gflops: Figure | None = None
    peak_fp64_gflops: Figure | None = None
    matmul_gflops: dict[str, Figure] = Field(default_factory=dict, description="measured, by dtype")
    memory_bandwidth_gbs: Figure | None = None
    usable_cpus: int | None = Field(None, ge=1, description="CPUs this process may use (affinity mask, cgroup quota)")
    usable_source: str | None = Field(None, description="what limits usable_cpus")


class Memory(_Model):
    total_bytes: int = Field(ge=0, description="what this process may use: the host's RAM or a lower cgroup limit")
    available_bytes: int = Field(ge=0)
    swap_bytes: int | None = Field(None, ge=0)
    source: Source = "measured"
    host_total_bytes: int | None = Field(None, ge=0, description="the host's RAM, when a cgroup limit is lower")
    limit_source: str | None = Field(None, description="the cgroup file that sets total_bytes")


class GPU(_Model):
    vendor: Literal["nvidia", "apple", "amd", "intel", "other"]
    model: str
    backend: Literal["cuda", "mps", "rocm", "vulkan", "none"] = "none"
    memory_bytes: int | None = Field(None, ge=0)
    memory_free_bytes: int | None = Field(None, ge=0)
    unified_memory: bool = False
    driver: str | None = None
    compute_capability: str | None = None
    clocks_mhz: dict[str, float] = Field(default_factory=dict)
    index: int | None = None
    matmul_tflops: dict[str, Figure] = Field(default_factory=dict, description="by dtype")
    memory_bandwidth_gbs: Figure | None = None
    source: Source = "measured"


class BoardSpec(_Model):
    name: str
    mcu: str
    core: str
    clock_mhz: float
    flash_bytes: int
    sram_bytes: int
    fpu: bool = False
    dsp: bool = False
    source: Source = "datasheet"


class Board(_Model):
    port: str | None = None
    vid_pid: str | None = Field(None, pattern=r"^[0-9A-F]{4}:[0-9A-F]{4}$")
    product: str | None = None
    serial_number: str | None = None
    match: Literal["board", "bridge", "unknown", "user"] = "unknown"
    board: BoardSpec | None = Field(None, description="the board, when the VID:PID names it")
    candidates: list[BoardSpec] = Field(default_factory=list, description="when a bridge chip could be any of several")
    access: Literal["ok", "denied", "busy", "unknown"] = "unknown"
    problem: str | None = Field(None, description="what is wrong with the port and the fix")


class SBC(_Model):
    model: str
    family: Literal["raspberry-pi", "jetson", "other"]
    compatible: list[str] = Field(default_factory=list)
    soc: str | None = None
    source: Source = "measured"


class Peer(_Model):
    name: str | None = None
    address: str
    port: int = Field(ge=1, le=65535)
    found_by: Literal["mdns", "manual"]
    summary: dict[str, Any] = Field(default_factory=dict, description="what its agent reports")
    rtt_ms: Figure | None = None
    bandwidth_mbps: Figure | None = None
    problem: str | None = None


class Calibration(_Model):
    workload: str
    milestone: str | None = None
    size: str | None = None
    device: str | None = None
    predicted_peak_bytes: float | None = None
    actual_peak_bytes: float | None = None
    predicted_seconds: float | None = None
    actual_seconds: float | None = None
    when: _dt.datetime


class DetectorStatus(_Model):
    status: Literal["ok", "empty", "error", "timeout", "skipped"]
    seconds: float = Field(ge=0)
    reason: str | None = Field(None, description="why the field is empty or partial")


class ProbeInfo(_Model):
    when: _dt.datetime
    seconds: float = Field(ge=0)
    detectors: dict[str, DetectorStatus] = Field(default_factory=dict)


class Profile(_Model):
    schema_: Literal["tierkit/profile/v1"] = Field(SCHEMA, alias="schema")
    name: str | None = Field(None, description="a label: the host name, or the reference kit's name")
    description: str | None = None
    host: Host | None = None
    cpu: CPU | None = None
    memory: Memory | None = None
    gpus: list[GPU] = Field(default_factory=list)
    boards: list[Board] = Field(default_factory=list)
    sbc: SBC | None = None
    peers: list[Peer] = Field(default_factory=list)
    calibration: list[Calibration] = Field(default_factory=list)
    probe: ProbeInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------- IO

def default_path() -> Path:
    """Where `tierkit probe` writes and every later command reads by default."""
    home = os.environ.get("TIERKIT_HOME")
    if home:
        return Path(home) / "profile.yaml"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tierkit" / "profile.yaml"


def where(loc: tuple[Any, ...]) -> str:
    """('boards', 0, 'vid_pid') -> 'boards[0].vid_pid'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def one_line(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    """The first validation error as 'field.path: what is wrong (and N more)'."""
    err = exc.errors(include_url=False)[0]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (misspelt?)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where(prefix + tuple(err['loc']))}: {msg}{more}"


def parse(data: Any, origin: str = "profile") -> Profile:
    """Validate already-parsed data; ProfileError with one line on failure."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ProfileError(f"{origin}: expected a YAML mapping with 'schema: {SCHEMA}', got {kind}; "
                           "re-run `tierkit probe` or fix the file")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ProfileError(f"{origin}: schema: expected '{SCHEMA}', got {schema!r}; "
                           "re-run `tierkit probe` to write a current profile")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{origin}: {one_line(exc)}; fix that field or re-run `tierkit probe`") from None
    except (RecursionError, ValueError, TypeError) as exc:  # pathological input
        raise ProfileError(f"{origin}: cannot be read as a profile ({type(exc).__name__}); "
                           "re-run `tierkit probe`") from None


def yaml_problem(exc: BaseException) -> str:
    """A YAML parse failure as 'not valid YAML at line L, column C: what' (one line)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark:
        mark = exc.problem_mark
        problem = (exc.problem or "syntax error").replace("\n", " ")
        return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"not valid YAML ({type(exc).__name__})"


def loads(text: str, origin: str = "profile") -> Profile:
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise ProfileError(f"{origin}: {yaml_problem(exc)}; fix the file or re-run `tierkit probe`") from None
    return parse(data, origin)


def load(path: str | os.PathLike) -> Profile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such profile; run `tierkit probe` to write one, "
                           "or give a reference kit's name instead of a file") from None
    except IsADirectoryError:
        raise ProfileError(f"{p}: is a directory, not a profile file") from None
    except PermissionError:
        raise ProfileError(f"{p}: permission denied; check the file's owner and mode") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{p}: not a text file (not UTF-8); pass a YAML profile") from None
    return loads(text, str(p))


def dumps(profile: Profile) -> str:
    return yaml.safe_dump(profile.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def save(profile: Profile, path: str | os.PathLike) -> Path:
    from inventory.files import atomic_write

    return atomic_write(path, dumps(profile))


def json_schema() -> str:
    return json.dumps(Profile.model_json_schema(by_alias=True), indent=2)
