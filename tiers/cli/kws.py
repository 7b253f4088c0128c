"""`tierkit kws`: the keyword spotter on a microcontroller (train, export, flash, monitor, eval)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tiers.cli.common import Fail, app, console, null, profile_arg

kws_app = typer.Typer(no_args_is_help=True, help="Keyword spotter on a microcontroller: train, export, flash, monitor, eval.")
app.add_typer(kws_app, name="kws")


def _progress():
    """(rich Progress or a null context, callback(stage, done, total)) for the kws steps."""
    err = console(stderr=True)
    if not err.is_terminal:
        return null(), lambda stage, done, total: None
    from rich import progress as rp

    bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                      rp.TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, object] = {}

    def cb(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or None)
        bar.update(tasks[stage], completed=done, total=total or None)

    return bar, cb


def _profile(arg: Optional[str]):
    """The profile for board defaults: --profile FILE|NAME, else the probed one, else None."""
    from inventory.profile import default_path

    if arg is None and not default_path().exists():
        return None
    return profile_arg(arg)[0]


def _writable_folder(out: Path, flag: str = "--out") -> None:
    """Fail with one line unless `out` can be a folder we write into; leaves nothing behind.

    Checked before any work starts: a training run of minutes must not end on
    a folder it cannot write.
    """
    import tempfile

    if out.exists() and not out.is_dir():
        raise Fail(f"{flag} {out}: is a file, not a folder; pass {flag} a new or existing folder")
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise Fail(f"{flag} {out}: cannot write there ({exc.strerror}); pass {flag} a folder you can write") from None
    finally:
        for p in made:                      # deepest first
            try:
                p.rmdir()
            except OSError:
                break


def _errors():
    from tiers.tier0.data import DataError
    from tiers.tier0.export import ExportError
    from tiers.tier0.firmware import FirmwareError
    from tiers.tier0.flash import FlashError
    from tiers.tier0.monitor import DeviceError

    return (DataError, ExportError, FirmwareError, FlashError, DeviceError)


@kws_app.command("train")
def kws_train(
    data: Optional[Path] = typer.Option(None, "--data", help="A Speech Commands-style folder [default: synthetic keywords, made with espeak-ng]."),
    size: Optional[str] = typer.Option(None, "--size", help="xs | s | m | l [default: the planner's size for your board]."),
    epochs: int = typer.Option(30, "--epochs", min=1),
    train_samples: int = typer.Option(85_000, "--train-samples", min=1, help="Training examples per epoch (augmented copies fill up)."),
    synth_speakers: Optional[int] = typer.Option(None, "--synth-speakers", min=1, help="Use only this many synthetic speakers (quick runs)."),
    limit_per_class: Optional[int] = typer.Option(None, "--limit-per-class", min=1, help="Cap clips per class and split."),
    out: Path = typer.Option(Path("kws-model"), "--out", help="Where model.keras, model.tflite and model/ go."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE or NAME whose board sizes the model."),
) -> None:
    """Train the DS-CNN, quantise it to int8, check it on TFLite Micro, export C."""
    from tiers.tier0 import b06_kws

    _writable_folder(out)
    chosen = size or b06_kws.planned_size(_profile(profile))
    bar, cb = _progress()
    try:
        with bar:
            t = b06_kws.train_to(out, size=chosen, data=data, epochs=epochs, train_samples=train_samples,
                                 synth_speakers=synth_speakers, limit_per_class=limit_per_class, progress=cb)
    except (*_errors(), ValueError) as exc:
        raise Fail(str(exc).splitlines()[0]) from None
    print(f"{chosen}: {t.line()}\ndata: {t.source}\nnext: tierkit kws export {out / 'model.tflite'}")


@kws_app.command("export")
def kws_export(
    model: Path = typer.Argument(..., help="An int8 .tflite file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for model.c / model.h [default: c/ beside the .tflite]."),
) -> None:
    """Compile an int8 .tflite into C (model.c, model.h) calling the project's int8 kernels."""
    from tiers.tier0 import export
    from tiers.tier0.flash import remember_export

    out = out or model.parent / "c"   # beside the model by default, never the source tree
    try:
        blob = model.read_bytes()
    except OSError as exc:
        raise Fail(f"cannot read {model}: {exc.strerror}") from None
    _writable_folder(out)
    try:
        r = export.export_c(blob, out, source_name=model.name)
    except export.ExportError as exc:
        raise Fail(f"{model.name}: {exc}") from None
    except OSError as exc:
        raise Fail(f"cannot write {exc.filename or out}: {exc.strerror}; pass --out a folder you can write") from None
    remember_export(out)   # `kws flash` and `kws eval` use it without --model-dir
    print(f"{r.summary()}\nwrote {r.c_path} and {r.h_path}")


@kws_app.command("flash")
def kws_flash(
    board: Optional[str] = typer.Option(None, "--board", help="nano33ble | esp32s3 | pico [default: from the profile]."),
    port: Optional[str] = typer.Option(None, "--port", help="Serial port [default: the board's, from the profile]."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Exported model (model.c/.h) [default: the last `kws export`]."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE or NAME [default: the probed one]."),
    upload: bool = typer.Option(True, "--upload/--no-upload", help="--no-upload: build and check the size only."),
    verbose: bool = typer.Option(False, "--verbose", help="Show every PlatformIO line."),
) -> None:
    """Build with PlatformIO, check flash and RAM against the board, then upload."""
    from rich.markup import escape

    from tiers.tier0 import flash as fl

    err = console(stderr=True)
    now = {"step": "flash"}

    try:
        with err.status("flash", spinner="dots") if err.is_terminal else null() as status:
            live = hasattr(status, "update")

            def on_line(line: str) -> None:  # PlatformIO's progress, under the current step
                if verbose:
                    err.print(f"[dim]{escape(line)}[/]", highlight=False)
                if live:
                    status.update(f"{escape(now['step'])} [dim]{escape(line[:70])}[/]")

            def on_step(text: str) -> None:
                now["step"] = text
                if live:
                    status.update(escape(text))
                else:
                    print(text, flush=True)

            from tiers.tier0.firmware import local_build

            r = fl.flash(_profile(profile), board, port, model_dir=model_dir, upload=upload,
                         on_line=on_line, on_step=on_step, offline_builder=local_build)
    except (*_errors(),) as exc:
        raise Fail(str(exc)) from None
    print(r.line())


@kws_app.command("monitor")
def kws_monitor(
    port: Optional[str] = typer.Option(None, "--port", help="Serial port [default: the board's, from the profile]."),
    baud: int = typer.Option(115200, "--baud"),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile FILE or NAME [default: the probed one]."),
    seconds: Optional[float] = typer.Option(None, "--seconds", min=0.0, help="Stop after this long [default: until Ctrl-C]."),
    reconnect: bool = typer.Option(True, "--reconnect/--no-reconnect", help="Wait for the board to come back after a reset."),
) -> None:
    """Print the firmware's detections (DET <label> <score> <ms>) and notes; survives board resets."""
    import time as _time

    from tiers.tier0 import flash as fl
    from tiers.tier0 import monitor as mon

    try:
        if port is None:
            port = fl.resolve_target(_profile(profile), None, None).port
        if port is None:
            raise Fail("no board: pass --port, or plug the board in and run `tierkit probe`")
        end = None if seconds is None else _time.monotonic() + seconds
        err = console(stderr=True)
        stats = mon.monitor(port, baud=baud, on_line=lambda s: print(s, flush=True),
                            on_status=lambda s: err.print(f"[yellow]{s}[/]", highlight=False),
                            stop=lambda: end is not None and _time.monotonic() > end, reconnect=reconnect)
    except (*_errors(),) as exc:
        raise Fail(str(exc)) from None
    console(stderr=True).print(f"{stats.lines} lines, {stats.detections} detections, {stats.reconnects} reconnects",
                                highlight=False)


@kws_app.command("eval")
def kws_eval(
    port: Optional[str] = typer.Option(None, "--port", help="A flashed board's serial port [default: the emulated Cortex-M4 under QEMU]."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Exported model for the QEMU build [default: the last `kws export`]."),
    tflite: Optional[Path] = typer.Option(None, "--tflite", help="The .tflite it came from: scores are compared with TFLite Micro's."),
    data: Optional[Path] = typer.Option(None, "--data", help="Speech Commands-style folder [default: the synthetic keywords]."),
    limit: int = typer.Option(100, "--limit", min=1, help="Held-out clips to stream to the device."),
    synth_speakers: Optional[int] = typer.Option(None, "--synth-speakers", min=1, help="As given to `kws train` (synthetic data only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Accuracy measured on the device itself: held-out clips streamed over serial, scores read back."""
    from tiers.tier0 import b06_kws
    from tiers.tier0.flash import last_export

    try:
        ref = tflite.read_bytes() if tflite else None
    except OSError as exc:
        raise Fail(f"cannot read {tflite}: {exc.strerror}") from None
    bar, cb = _progress()
    try:
        audio, labels, source = b06_kws.held_out_clips(data, limit, synth_speakers=synth_speakers)
        with bar:
            ev = b06_kws.evaluate(model_dir or last_export(), audio, labels, port=port, tflite=ref, progress=cb)
    except (*_errors(),) as exc:
        raise Fail(str(exc)) from None
    if as_json:
        print(json.dumps({"where": ev.where, "data": source, "clips": ev.n, "accuracy": ev.accuracy,
                          "scores_equal_tflm": ev.exact, "model_per_inference": ev.model_count,
                          "features_per_inference": ev.feature_count, "unit": ev.unit,
                          "confusion_matrix": ev.confusion.tolist()}, indent=2))
        return
    print("\n".join([f"data: {source}", *ev.lines()]))
