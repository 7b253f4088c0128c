"""The milestone runner: a Plan in, a build folder and a Result out.

    run(plan, profile, out_root)
      1. refuse what cannot run: verdict `no`, unmet needs, a milestone not written yet, a setting
         out of range, a model or data set of the size's not here (with `fetch`: fetched first)
      2. call the milestone's function in a temporary folder beside the build folder,
         measuring wall time and peak memory around the call
      3. write README.md (predicted vs actual, the milestone's numbers, its plots) and metrics.json
      4. swap the temporary folder in for builds/B<nn>-<slug>/ (a failed run leaves the old one)
      5. append predicted vs actual to the profile's calibration, when the profile is the
         user's own file (a reference kit is never modified)

What "peak memory" means here. The planner's `Prediction.peak_bytes` is for the
*whole process* on the chosen device: on a CPU the interpreter, numpy, the
milestone's imports and its arrays, i.e. the RSS a user would see in `top`. So
the actual we compare it with is the *absolute* peak RSS of this process while
the milestone runs (sampled every 20 ms, and exact when the run set a new
lifetime maximum, see `MemoryMonitor`), not the increase over the baseline. The
baseline (the RSS just before the call: Python, the CLI, numpy) and the increase
are recorded too, so the planner's overhead term can be checked. On a CUDA device
the actual is the GPU memory this process held (NVML, which includes the CUDA
context and torch's cache), or torch's max reserved bytes where NVML cannot see
the process; `torch.cuda.max_memory_allocated` is recorded beside it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from inventory.files import private_folder, swap_in
from inventory.profile import Calibration, Profile, save
from inventory.units import fmt_bytes as _fmt_bytes
from tiers.plan import Plan, Result

# ---------------------------------------------------------------- the registry

def _registry() -> dict[str, str]:
    """Milestone id -> "module:function", from each milestone's `module` in tiers/milestones.yaml.

    The module is imported only when that milestone runs, so its heavy dependencies
    (matplotlib, torch, tensorflow) load only then.
    """
    from tiers import catalog

    return {m.id: f"{m.module}:run" for m in catalog.track() if m.module}


REGISTRY: dict[str, str] = _registry()


class RunError(Exception):
    """Why a milestone did not run (or did not finish); str() is one line for the user."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- what a milestone sees and returns

class _Step:
    """One progress bar; a no-op when nobody is watching."""

    def __init__(self, progress: Any, description: str, total: float | None):
        self._progress = progress
        self._task = progress.add_task(description, total=total) if progress is not None else None

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, **kw: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **kw)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.remove_task(self._task)


@dataclass
class Context:
    """What the runner hands a milestone function."""

    out_dir: Path                     # write plots and files here (a temp folder until the run succeeds)
    device: str                       # the plan's device: "cpu", "cuda:0", ...
    config: Any                       # the milestone's Config: the planned size, then --set, checked
    plan: Plan
    profile: Profile
    progress_display: Any = None      # a rich Progress, or None when quiet
    lines: list[str] = field(default_factory=list)

    def progress(self, description: str, total: float | None = None) -> _Step:
        """A progress bar: `with ctx.progress("matmul", len(sizes)) as bar: ... bar.advance()`."""
        return _Step(self.progress_display, description, total)

    def log(self, *parts: object) -> None:
        """A line for the user now, and for metrics.json's log afterwards."""
        line = " ".join(str(p) for p in parts)
        self.lines.append(line)
        if self.progress_display is not None:
            from rich.markup import escape

            self.progress_display.console.print(f"[dim]{self.plan.milestone}[/] {escape(line)}", highlight=False)


@dataclass
class Output:
    """What a milestone function returns."""

    metrics: dict[str, Any]                         # its numbers (JSON-able)
    summary: str = ""                               # a paragraph for the top of the README
    report: str = ""                                # markdown sections (## ...) for the README
    plots: list[str] = field(default_factory=list)  # PNG names in out_dir with a caption each: "x.png: caption"
    profile: Profile | None = None                  # a freshly probed profile to become the live one (B0)
    # (bytes, how measured) when the plan's device is not this host (a board's image RAM for B6):
    # the prediction is for that device, so this host's RSS is not what it compares with
    device_peak: tuple[int, str] | None = None
    # False when what ran is not what was planned (fallback data, a stand-in model): its time and
    # memory say nothing about the planned workload, so they must not calibrate later plans
    calibrate: bool = True
    calibrate_why: str = ""   # when `calibrate` is False: what ran instead of the planned workload
    # the settings as they ran, where the milestone derived some from its data (B12's vocabulary
    # from its tokenizer); None: the Config it was given
    config: Any = None


# ---------------------------------------------------------------- measuring

def _maxrss_bytes() -> int:
    """This process's lifetime peak RSS (KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class MemoryMonitor:
    """Peak memory of this process while a block runs.

    A thread samples RSS every `interval` seconds (children every ~0.5 s, since
    listing them costs more). Sampling can miss a spike shorter than the
    interval, so `ru_maxrss`, the kernel's exact lifetime maximum, is read too:
    if it rose during the block, the block set a new lifetime maximum and that
    figure is exact; if it did not, the peak of the block was below the earlier
    maximum and only the samples can tell it. (On Linux a child's ru_maxrss starts
    at its parent's size before exec, so in a process started by a big one the
    samples are usually what counts.)
    """

    def __init__(self, interval: float = 0.02, cuda_index: int | None = None):
        import psutil

        self.interval = interval
        self.cuda_index = cuda_index
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="tierkit-rss", daemon=True)
        self.baseline_rss = 0
        self.sampled_peak = 0
        self.samples = 0
        self.maxrss_before = 0
        self.maxrss_after = 0
        self.children_peak = 0
        self.gpu: dict[str, int] = {}
        self._nvml_peak = 0
        self._nvml_handle: Any = None

    def _rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def _children_rss(self) -> int:
        import psutil

        total = 0
        try:
            for c in self._proc.children(recursive=True):
                try:
                    total += c.memory_info().rss
                except psutil.Error:  # it exited between the listing and the read
                    continue
        except psutil.Error:
            return total
        return total

    def _nvml_used(self) -> int:
        """GPU memory NVML attributes to this process (context and cache included); 0 if unseen."""
        if self._nvml_handle is None:
            return 0
        try:
            import pynvml

            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml_handle):
                if p.pid == os.getpid() and p.usedGpuMemory:
                    return int(p.usedGpuMemory)
        except Exception:  # noqa: BLE001  (NVML errors vary by driver; the figure is optional)
            return 0
        return 0

    def _sample_loop(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            tick += 1
            rss = self._rss()
            if tick % 25 == 0:
                self.children_peak = max(self.children_peak, self._children_rss())
            if self._nvml_handle is not None and tick % 5 == 0:
                self._nvml_peak = max(self._nvml_peak, self._nvml_used())
            self.sampled_peak = max(self.sampled_peak, rss)
            self.samples += 1

    def __enter__(self) -> Self:
        if self.cuda_index is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(self.cuda_index)
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(self.cuda_index)
            except Exception:  # noqa: BLE001  (no NVML here: torch's figures are used instead)
                self._nvml_handle = None
        self.maxrss_before = _maxrss_bytes()
        self.baseline_rss = self.sampled_peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled_peak = max(self.sampled_peak, self._rss())
        self.maxrss_after = _maxrss_bytes()
        if self.cuda_index is not None:
            import torch

            torch.cuda.synchronize(self.cuda_index)
            self.gpu = {"max_allocated_bytes": int(torch.cuda.max_memory_allocated(self.cuda_index)),
                        "max_reserved_bytes": int(torch.cuda.max_memory_reserved(self.cuda_index))}
            self._nvml_peak = max(self._nvml_peak, self._nvml_used())
            if self._nvml_peak:
                self.gpu["nvml_process_peak_bytes"] = self._nvml_peak

    @property
    def rss_peak(self) -> int:
        """Absolute peak RSS during the block: sampled, or exact when it set a new lifetime maximum."""
        exact = self.maxrss_after if self.maxrss_after > self.maxrss_before else 0
        return max(self.sampled_peak, exact)

    @property
    def rss_peak_method(self) -> str:
        if self.maxrss_after > self.maxrss_before and self.maxrss_after >= self.sampled_peak:
            return "ru_maxrss (the run set the process's lifetime maximum: exact)"
        return f"psutil RSS sampled every {self.interval * 1000:.0f} ms ({self.samples} samples)"

    def device_peak(self) -> tuple[int, str]:
        """The peak to compare with the plan's prediction on its device, and how it was measured."""
        if self.cuda_index is None:
            return self.rss_peak, f"process RSS peak, absolute; {self.rss_peak_method}"
        if "nvml_process_peak_bytes" in self.gpu:
            return self.gpu["nvml_process_peak_bytes"], "GPU memory held by this process (NVML: context + torch cache)"
        return self.gpu["max_reserved_bytes"], "torch.cuda.max_memory_reserved (NVML could not see the process; CUDA context not included)"


# ---------------------------------------------------------------- checks

def _cuda_index(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    _, _, idx = device.partition(":")
    return int(idx) if idx.isdigit() else 0


def check_needs(plan: Plan) -> None:
    """Everything that must hold before a milestone starts; RunError (one line) otherwise."""
    from tiers import catalog

    mid = plan.milestone
    if plan.verdict == "no":
        why = "; ".join(plan.reasons) or "the planner found no size that fits"
        raise RunError(f"{mid} does not fit this profile ({plan.profile or 'unnamed'}): {why}")
    if mid not in REGISTRY:
        raise RunError(f"{mid} is not implemented yet; runnable now: "
                       + ", ".join(sorted(REGISTRY, key=lambda m: int(m[1:]))))
    try:
        missing = catalog.get(mid).missing(gpu=plan.device.startswith(("cuda", "mps", "rocm")))
    except catalog.CatalogError:
        missing = []
    if missing:
        hints = [h for h in catalog.load().install_hints(missing).split("; ") if "tierkit[" in h]
        raise RunError(f"{mid} needs {', '.join(missing)}, not installed here: "
                       + ("; ".join(hints) or f"pip install 'tierkit[tier{plan.tier}]'"))
    idx = _cuda_index(plan.device)
    if idx is not None:
        if importlib.util.find_spec("torch") is None:
            raise RunError(f"{mid} is planned on {plan.device} but torch is not installed: "
                           "pip install 'tierkit[tier2]' (with the CUDA build of torch)")
        import torch

        if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
            raise RunError(f"{mid} is planned on {plan.device} but torch sees no such CUDA device here; "
                           "run with --tier 1 for the CPU, or probe this machine again")


# Config fields through which a run is handed a local file in place of a registry model or data set:
# a GGUF (B16, B17), an SFT reference (B14), a data file or folder (B9, B13); `init` when it names
# a checkpoint file (B7, B13, B14: a path, or a name ending .pt). Given one, the artifact it stands
# in for is not needed. So is one replaced by another `model` or `dataset` setting.
LOCAL_MODEL = ("gguf", "reference")
LOCAL_DATA = ("data_file", "data_path")


def _local_model(config: Any) -> bool:
    init = getattr(config, "init", None)
    return any(getattr(config, k, None) for k in LOCAL_MODEL) or (
        isinstance(init, str) and ("/" in init or init.endswith(".pt")))


def _local_data(config: Any) -> bool:
    return any(getattr(config, k, None) for k in LOCAL_DATA)


def check_artifacts(plan: Plan, config: Any, out_root: Path, fetch: Callable[[str], Any] | None = None) -> None:
    """Everything the planned size needs is here: the learner's own B12 / B13 model, and each registry
    artifact (or it is fetched now, with `fetch`); RunError (one line) before anything is written.
    A Config field naming a local file instead (LOCAL_MODEL, LOCAL_DATA) stands in for the artifact."""
    from tiers import catalog
    from tiers.fit import artifacts

    try:
        rung = catalog.get(plan.milestone).rung(plan.size or "")
    except catalog.CatalogError:
        return  # a plan not sized from the catalog names no artifacts
    # `--set model=...` / `--set dataset=...` replace the rung's: the milestone resolves those itself.
    local_model = _local_model(config) or getattr(config, "model", rung.model) != rung.model
    local_data = _local_data(config) or getattr(config, "dataset", rung.dataset) != rung.dataset
    try:
        if rung.own_model and not local_model:
            artifacts.check_own_model(plan.milestone, rung, out_root)
        skip = {rung.model if local_model else None, rung.dataset if local_data else None}
        plan.artifacts = artifacts.ensure(plan.milestone, rung, skip, fetch)
    except artifacts.Missing as exc:
        raise RunError(str(exc)) from None


# Seconds each milestone module took to import (torch or TensorFlow at its top), the first time: part
# of the run's wall time, as the prediction's startup is.
IMPORT_SECONDS: dict[str, float] = {}


def resolve(milestone: str) -> tuple[Callable[[Context], Output], type]:
    """The milestone's `run` function and its `Config` class (a dataclass in the same module)."""
    target = REGISTRY[milestone]
    module, _, func = target.partition(":")
    try:
        t0 = time.perf_counter()
        mod = importlib.import_module(module)
        IMPORT_SECONDS.setdefault(module, time.perf_counter() - t0)
    except ImportError as exc:
        raise RunError(f"{milestone} cannot load ({exc.name or exc}); pip install 'tierkit[all]'") from None
    config = getattr(mod, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise RunError(f"{milestone}: {module} declares no Config dataclass; a milestone file must")
    return getattr(mod, func), config


def settings(plan: Plan, config_cls: type, overrides: dict[str, Any] | None = None) -> Any:
    """The milestone's Config from the planned size plus `overrides` (--set); RunError (one line) if invalid."""
    from tiers.config import ConfigError, build

    try:
        return build(config_cls, plan.config, overrides, where=plan.milestone)
    except ConfigError as exc:
        raise RunError(str(exc)) from None


# ---------------------------------------------------------------- the run

def prepare(plan: Plan, out_root: Path, overrides: dict[str, Any] | None = None,
            fetch: Callable[[str], Any] | None = None) -> tuple[Callable[[Context], Output], Any]:
    """Every check before a run, in order, writing nothing (but what `fetch` downloads): the plan fits
    and its packages are here; its Config builds; its models and data sets are here (or fetched now).
    Returns the milestone's run function and its Config; RunError (one line) on the first problem."""
    check_needs(plan)
    fn, config_cls = resolve(plan.milestone)
    config = settings(plan, config_cls, overrides)
    check_artifacts(plan, config, Path(out_root), fetch)
    return fn, config


def run(plan: Plan, profile: Profile, out_root: Path, progress: Any = None, *,
        profile_path: Path | None = None, calibrate: bool = True, overrides: dict[str, Any] | None = None,
        fetch: Callable[[str], Any] | None = None) -> Result:
    """Run a planned milestone; write its build folder; record predicted vs actual.

    `progress` is a rich Progress to draw on (None: quiet). `profile_path` is
    where the profile came from when it is the user's own file: the calibration
    record is saved there; None (a reference kit) leaves every profile file alone.
    `overrides` are `--set` values: checked against the milestone's Config before
    anything runs; a run with any records no calibration (it is not the planned workload).
    `fetch(name)` brings a missing registry artifact (`run --fetch`); None: a missing one stops the run.
    """
    fn, config = prepare(plan, out_root, overrides, fetch)
    out_root = Path(out_root)
    final = out_root / plan.folder
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        tmp = private_folder(out_root, plan.folder)
    except OSError as exc:
        raise RunError(f"cannot write under {out_root}: {exc.strerror}; pass --out to a writable folder") from None

    ctx = Context(out_dir=tmp, device=plan.device, config=config, plan=plan, profile=profile,
                  progress_display=progress)
    try:
        monitor = MemoryMonitor(cuda_index=_cuda_index(plan.device))
        started = dt.datetime.now(dt.UTC)
        with monitor:
            t0 = time.perf_counter()
            out = fn(ctx)
            seconds = time.perf_counter() - t0 + IMPORT_SECONDS.get(REGISTRY[plan.milestone].partition(":")[0], 0.0)
        peak, peak_method = out.device_peak or monitor.device_peak()
        actual = {
            "peak_bytes": peak,
            "peak_method": peak_method,
            "seconds": round(seconds, 4),
            "rss_peak_bytes": monitor.rss_peak,
            "rss_baseline_bytes": monitor.baseline_rss,
            "rss_increase_bytes": monitor.rss_peak - monitor.baseline_rss,
            "children_rss_peak_bytes": monitor.children_peak,
            **({"gpu": monitor.gpu} if monitor.gpu else {}),
            "started": started.isoformat(timespec="seconds"),
        }
        plots = _plots(tmp, out)
        result = Result(plan=plan, out_dir=final, actual_peak_bytes=float(peak), actual_seconds=seconds,
                        metrics=out.metrics, plots=[final / p for p, _ in plots], summary=out.summary,
                        config=dataclasses.asdict(out.config if out.config is not None else config))
        live = out.profile or profile
        result.not_calibrated = calibration_refusal(plan, out, profile_path, calibrate, overrides)
        # Plain writes: the whole folder is swapped in at once below, so nobody sees it half-written.
        (tmp / "metrics.json").write_text(json.dumps(_metrics_doc(result, actual, live, ctx.lines), indent=2,
                                                     default=_json_default) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(result, actual, live, out, plots),
                                       encoding="utf-8")
        swap_in(tmp, final, private=("profile",))
    except RunError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or os.environ.get("TIERKIT_DEBUG"):
            raise
        kept = "; the previous build folder is unchanged" if final.exists() else ""
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RunError(f"{plan.milestone} failed: {type(exc).__name__}" + (f": {msg}" if msg else "") + kept
                       + " (set TIERKIT_DEBUG=1 for the traceback)", code=2) from exc

    if profile_path is not None and result.not_calibrated is None:  # B0's fresh profile replaces the live one, keeping its calibration history
        record_calibration(live, plan, result, profile_path, history=profile.calibration if out.profile else None)
        result.calibrated_in = profile_path
    return result


def calibration_refusal(plan: Plan, out: Output, profile_path: Path | None, calibrate: bool,
                        overrides: dict[str, Any] | None) -> str | None:
    """Why this run must not calibrate later plans, or None: only the planned workload, exactly, records."""
    from tiers.fit.calibration import mismatch

    if profile_path is None:
        return "the profile is a reference kit (or not read from your file), so it was not modified"
    if overrides:
        return ("--set changed the workload (" + ", ".join(f"{k}={v}" for k, v in overrides.items())
                + "), so it is not the one the plan priced")
    if (why := mismatch(plan.config, out.metrics)) is not None:
        return why
    if not out.calibrate:
        return out.calibrate_why or "a stand-in ran instead of the planned model or data"
    if not calibrate:
        return "calibration was turned off for this run"
    return None


def _plots(out_dir: Path, out: Output) -> list[tuple[str, str]]:
    """(file name, caption) for the milestone's plots: those it named, then any other PNG it wrote."""
    named: dict[str, str] = {}
    for entry in out.plots:
        name, _, caption = entry.partition(":")
        named[name.strip()] = caption.strip()
    for png in sorted(out_dir.glob("*.png")):
        named.setdefault(png.name, "")
    return [(n, c or Path(n).stem.replace("_", " ")) for n, c in named.items() if (out_dir / n).is_file()]


def record_calibration(profile: Profile, plan: Plan, result: Result, path: Path,
                       history: list[Calibration] | None = None) -> Calibration:
    """Append predicted vs actual to the profile and save it atomically to `path`."""
    rec = Calibration(
        workload=workload(plan), milestone=plan.milestone, size=plan.size, device=plan.device,
        predicted_peak_bytes=plan.prediction.peak_bytes if plan.prediction else None,
        actual_peak_bytes=result.actual_peak_bytes,
        predicted_seconds=plan.prediction.seconds if plan.prediction else None,
        actual_seconds=round(result.actual_seconds, 4),
        when=dt.datetime.now(dt.UTC))
    if history is not None:  # a fresh probe (B0) keeps the earlier runs' records
        profile.calibration = [*history, *profile.calibration]
    profile.calibration.append(rec)
    try:
        save(profile, path)
    except OSError as exc:
        raise RunError(f"the build is written, but the profile {path} could not be updated: {exc.strerror}") from None
    return rec


def workload(plan: Plan) -> str:
    """The calibration key: the cost model the planner used, else the milestone's folder name."""
    for key in ("workload", "cost_model"):
        if isinstance(plan.config.get(key), str):
            return plan.config[key]
    return plan.folder


# ---------------------------------------------------------------- README and metrics.json

def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (dt.datetime, dt.date)):
        return o.isoformat()
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _hardware(p: Profile) -> dict[str, Any]:
    return {"profile": p.name, "host": p.host.hostname if p.host else platform.node(),
            "cpu": p.cpu.model if p.cpu else None,
            "cores": p.cpu.physical_cores if p.cpu else None,
            "memory_bytes": p.memory.total_bytes if p.memory else None,
            "gpus": [g.model for g in p.gpus]}


def _ratio(actual: float | None, predicted: float | None) -> float | None:
    if not actual or not predicted:
        return None
    return round(actual / predicted, 3)


def _metrics_doc(result: Result, actual: dict[str, Any], profile: Profile, lines: list[str]) -> dict[str, Any]:
    plan, pred = result.plan, result.plan.prediction
    return {
        "schema": "tierkit/metrics/v1",
        "milestone": plan.milestone,
        "plan": plan.to_dict(),
        "config": result.config,
        "hardware": _hardware(profile),
        "prediction": None if pred is None else {"peak_bytes": pred.peak_bytes, "seconds": pred.seconds,
                                                 "bound": pred.bound, "basis": pred.basis},
        "actual": actual,
        "ratios": {"memory": _ratio(result.actual_peak_bytes, pred.peak_bytes if pred else None),
                   "time": _ratio(result.actual_seconds, pred.seconds if pred else None)},
        "metrics": result.metrics,
        "plots": [p.name for p in result.plots],
        "log": lines,
    }


def _mem(n: float | None) -> str:
    return _fmt_bytes(n, binary=True)


def secs(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min"


def _verdict_mark(ratio: float | None, lo: float, hi: float) -> str:
    if ratio is None or not math.isfinite(ratio):
        return ""
    return "within target" if lo <= ratio <= hi else "outside target"


def _artifact_lines(plan: Plan) -> list[str]:
    """The registry models and data sets the run read, and where they are on this machine."""
    from tiers import data

    out = []
    for a in plan.artifacts:
        where = data.locate(a.name) if a.here else None
        out.append(f"- {a.kind}: {a.name} ({_fmt_bytes(a.size) if a.size else 'size unknown'}), "
                   + (f"`{where}`" if where else "part of it here" if a.here else "not here"))
    own = plan.config.get("model")
    if own in ("b12", "b13"):
        out.append(f"- model: your {own.upper()} model (the {own.upper()} build beside this folder)")
    return out


def _unpriced(plan: Plan, ran: dict[str, Any]) -> str:
    """The priced settings (the rung's numbers) that the run changed without the planner seeing it, as
    "vocab_size 65 (this run: 50,304)"; "" when none."""
    moved = [f"{k} {v:,} (this run: {ran[k]:,})" for k, v in plan.config.items()
             if isinstance(v, int) and not isinstance(v, bool) and isinstance(ran.get(k), int) and ran[k] != v]
    return ", ".join(moved)


def readme(result: Result, actual: dict[str, Any], profile: Profile, out: Output,
           plots: list[tuple[str, str]]) -> str:
    plan, pred = result.plan, result.plan.prediction
    hw = _hardware(profile)
    when = actual["started"].replace("T", " ").replace("+00:00", " UTC")
    lines = [f"# {plan.milestone}: {plan.title}", ""]
    if out.summary:
        lines += [out.summary.strip(), ""]
    lines += ["## What ran", "",
              (f"- milestone: {plan.milestone} ({plan.slug}), tier {plan.tier}, device `{plan.device}`, "
               f"size `{plan.size}` (planner's verdict: {plan.verdict})"),
              f"- when: {when}, {secs(result.actual_seconds)} wall time",
              f"- profile: {hw['profile'] or '?'} (host {hw['host']})",
              f"- CPU: {hw['cpu'] or '?'}" + (f", {hw['cores']} cores" if hw['cores'] else "")
              + (f"; memory {hw['memory_bytes'] / 2**30:.1f} GiB" if hw['memory_bytes'] else ""),
              f"- GPU: {', '.join(hw['gpus']) or 'none'}",
              f"- config: `{json.dumps(result.config, default=_json_default)}`", *_artifact_lines(plan)]
    lines += ["", "## Predicted vs actual", ""]
    if pred is None:
        lines.append("The planner made no prediction for this run.")
    else:
        rm = _ratio(result.actual_peak_bytes, pred.peak_bytes)
        rt = _ratio(result.actual_seconds, pred.seconds)
        lines += ["| | predicted | actual | actual / predicted | target |", "|---|---|---|---|---|",
                  (f"| peak memory | {_mem(pred.peak_bytes)} | {_mem(result.actual_peak_bytes)} | "
                   f"{rm if rm is not None else '?'} | 0.75-1.25: {_verdict_mark(rm, 0.75, 1.25)} |"),
                  (f"| wall time | {secs(pred.seconds)} | {secs(result.actual_seconds)} | "
                   f"{rt if rt is not None else '?'} | 0.5-2: {_verdict_mark(rt, 0.5, 2.0)} |"), ""]
        if out.device_peak:
            lines += [(f"The prediction is for the device {plan.device}, not this host: the actual is "
                       f"{actual['peak_method']}."), ""]
        else:
            lines += ["The prediction is for the whole process on the device "
                    + ("(the interpreter, its imports and the milestone's arrays), so the actual is the absolute "
                       "peak RSS of the process during the run, not its increase."
                       if _cuda_index(plan.device) is None else
                       "(CUDA context, torch's cache, the tensors), so the actual is the GPU memory the process held.")
                    + f" Measured: {actual['peak_method']}. RSS before the milestone started: "
                    f"{_mem(actual['rss_baseline_bytes'])}; increase during it: {_mem(actual['rss_increase_bytes'])}.", ""]
        if moved := _unpriced(plan, result.config):
            lines += [f"The prediction is for the planned {moved}: it compares with a run of those settings.", ""]
        if pred.basis:
            lines += ["Basis of the prediction:", ""] + [f"- {b}" for b in pred.basis] + [""]
        if result.not_calibrated is None:
            lines.append("This run was appended to the profile's calibration; later plans are corrected by it.")
        else:
            lines.append(f"This run was not recorded in any calibration: {result.not_calibrated}.")
    if plan.reasons:
        lines += ["", "Planner's notes: " + "; ".join(plan.reasons)]
    if out.report:
        lines += ["", out.report.strip()]
    if plots:
        lines += ["", "## Plots", ""]
        for name, caption in plots:
            lines += [f"![{caption}]({name})", ""]
    lines += ["", "---", f"Numbers: `metrics.json` beside this file. Written by `tierkit run {plan.milestone}`."]
    return "\n".join(lines).rstrip() + "\n"
