"""The plain data that flows probe -> fit -> run (DESIGN.md, "Data flow").

`fit(Profile, Milestone) -> Plan`; a runner takes a Plan and returns a Result.
Kept here, apart from the planner and the runner, so both (and the CLI, and
tests) share one definition and neither imports the other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Verdict = Literal["fits", "tight", "no"]


@dataclass
class Prediction:
    peak_bytes: float                 # predicted peak memory on the chosen device
    seconds: float                    # predicted wall time at the chosen size
    basis: list[str] = field(default_factory=list)  # each step of the arithmetic, for --explain
    bound: Literal["compute", "memory", "io", "fixed"] = "compute"


@dataclass
class Artifact:
    """A registry model or data set a plan needs (tiers.data): what `tierkit data fetch NAME` brings."""

    name: str                         # the registry's name: "gpt2", "tinyshakespeare"
    kind: str                         # "model" | "gguf" | "data"
    size: int | None                  # bytes `tierkit data fetch` downloads (None: not published)
    here: bool                        # on this machine now (what the planned size reads of it)


@dataclass
class Plan:
    milestone: str                    # "B5"
    slug: str                         # "roofline" -> builds/B05-roofline/
    title: str
    tier: int                         # 0 MCU, 1 CPU, 2 GPU, 3 several machines
    device: str                       # "cpu", "cuda:0", "mps", "board:/dev/ttyACM0", "cluster:2"
    size: str | None                  # the label on the size ladder, None when nothing fits
    config: dict[str, Any]            # the sized configuration the runner uses
    prediction: Prediction | None
    verdict: Verdict
    reasons: list[str] = field(default_factory=list)   # why not / why tight / what would fit
    profile: str | None = None        # the profile's name
    artifacts: list[Artifact] = field(default_factory=list)   # what the planned size needs from the registry

    @property
    def folder(self) -> str:
        return f"B{int(self.milestone[1:]):02d}-{self.slug}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Result:
    plan: Plan
    out_dir: Path
    actual_peak_bytes: float          # peak RSS (CPU) or max allocated (GPU) during the run
    actual_seconds: float             # wall time of the milestone function
    metrics: dict[str, Any] = field(default_factory=dict)  # what the milestone measured
    plots: list[Path] = field(default_factory=list)
    summary: str = ""                 # a paragraph for the build README
    config: dict[str, Any] = field(default_factory=dict)  # the milestone's Config as it ran (size + --set)
    calibrated_in: Path | None = None  # the profile that recorded this run's predicted vs actual
    not_calibrated: str | None = None  # else why this run recorded nothing ("--set changed the workload", ...)
