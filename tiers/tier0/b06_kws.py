"""B6: a keyword spotter on a microcontroller, from audio to a detection line on a serial port.

    1. data      Speech Commands-style clips from a folder, or keywords spoken by espeak-ng
                 (the default: works offline on a fresh machine), split by speaker
    2. features  49 x 10 MFCC per second (features.py); the firmware computes the same in C
    3. train     the DS-CNN of the planned size (models/kws.py), in Keras
    4. quantise  int8 with the TFLite converter; float vs int8 accuracy on unheard speakers
    5. verify    the int8 model on TFLite Micro, the reference for what a board computes
    6. export    C code: weights, a static memory plan, calls into our int8 kernels
    7. device    build the firmware; with a board attached: flash it and measure over serial;
                 without: run it on the emulated Cortex-M4 (QEMU), driven over its serial pty
    8. report    accuracy at every stage, confusion matrix, model / arena / flash sizes, latency

`run` below is the whole milestone in that order; each step is a function the
`tierkit kws` commands also call one by one (`train_to`, `evaluate`, at the end).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from annotated_types import Ge, Gt

from inventory.files import atomic_write
from tiers.report import md_table, pyplot, save
from tiers.tier0 import data as D
from tiers.tier0 import features as F

if TYPE_CHECKING:
    from tiers.runner import Context, Output
    from tiers.tier0.monitor import Classification


@dataclass
class Config:
    channels: Annotated[int, Gt(0)] = 64             # the DS-CNN's width and depth: the ladder's rung
    blocks: Annotated[int, Gt(0)] = 4
    epochs: Annotated[int, Gt(0)] = 30
    batch_size: Annotated[int, Gt(0)] = 64
    learning_rate: Annotated[float, Gt(0)] = 1e-3
    train_samples: Annotated[int, Gt(0)] = 85_000    # training examples per epoch, reached with augmented copies
    device_clips: Annotated[int, Ge(0)] = 120        # test clips streamed to the device (QEMU: ~1.3 s each over its UART)
    data: str | None = None                          # a Speech Commands-style folder; None: synthetic keywords (espeak-ng)
    synth_speakers: Annotated[int, Gt(0)] | None = None   # synthetic speakers to use (None: every voice x variant x ...)
    limit_per_class: Annotated[int, Gt(0)] | None = None  # cap clips per class and split (quick runs)
    seed: int = 0
    # The planner's predictions for the board (its sized config), set when it planned for one; the
    # report puts the image actually built beside them.
    sram_bytes: int | None = None
    flash_bytes: int | None = None
    arena_bytes: int | None = None
    model_bytes: int | None = None
    latency_ms: float | None = None


Progress = Callable[[str, int, int], None]   # (stage, done, total)


def _quiet(stage: str, done: int, total: int) -> None:
    pass


# ------------------------------------------------------------------ the milestone

def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    out = ctx.out_dir
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bars.setdefault(stage, ctx.progress(stage, total or None))
        bars[stage].update(completed=done)

    t0 = time.perf_counter()
    # 1-2. data and features
    splits, source, noises = load_data(cfg.data, synth_speakers=cfg.synth_speakers,
                                       limit_per_class=cfg.limit_per_class, progress=progress)
    ctx.log(f"data: {source}: train {len(splits['train'])}, test {len(splits['test'])} clips")
    x_train, y_train = training_features(splits["train"], noises, cfg.train_samples, cfg.seed)
    x_test, y_test = F.mfcc(splits["test"].audio)[..., None], splits["test"].labels
    t_data = time.perf_counter() - t0

    # 3. train
    model = train(x_train, y_train, channels=cfg.channels, blocks=cfg.blocks, epochs=cfg.epochs,
                  batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed, progress=progress)
    t_train = time.perf_counter() - t0 - t_data

    # 4-6. quantise, verify on TFLite Micro, export C
    c = compile_model(model, x_train, x_test, y_test, out)
    ctx.log(f"int8 model {len(c.tflite):,} B; float {c.float_acc:.1%}, int8 {c.int8_acc:.1%}, "
            f"TFLite Micro {c.tflm_acc:.1%}; {c.export.summary()}")

    # 7. on the device: the planned board if it is plugged in, else the emulated Cortex-M4
    pick = spread(len(y_test), cfg.device_clips)
    port = _planned_port(ctx)
    if port and os.path.exists(port):
        dev = run_on_board(ctx.profile, port, out / "model", splits["test"].audio[pick], progress)
    else:
        dev = run_on_qemu(out / "model", splits["test"].audio[pick], progress)
    ctx.log(f"device: {dev.where}: {len(pick)} clips")

    # 8. numbers, plot, report
    metrics = _metrics(cfg, source, splits, c, dev, pick, y_test, _board_spec(ctx, port))
    metrics["seconds"] = {"data_and_features": round(t_data, 1), "training": round(t_train, 1),
                          "total": round(time.perf_counter() - t0, 1)}
    n = len(pick)
    cm = confusion(y_test[pick], dev.scores.argmax(-1)) if n else confusion(y_test, c.tflm_scores.argmax(-1))
    plot_confusion(cm, out / "confusion_matrix.png",
                   f"on the device ({dev.where.split(' (')[0]}), {n} test clips" if n else "TFLite Micro")
    metrics["confusion_matrix"] = {"labels": list(D.CLASSES), "rows_true_cols_predicted": cm.tolist()}
    (out / "kws.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # The plan's memory prediction is the board's SRAM; what compares with it is the image's RAM, not
    # this host's RSS (training).
    how = f"the firmware image's RAM (data + bss + stack) as built for {dev.where}, arm-none-eabi-size"
    peak = (int(dev.image["ram"]), how) if dev.image.get("ram") else None
    return Output(metrics=metrics, summary=_summary(metrics), report=_report(metrics),
                  plots=["confusion_matrix.png: confusion matrix on the device"], device_peak=peak)


def spread(n: int, k: int) -> np.ndarray:
    """min(k, n) indices spread evenly over range(n) (the test split is sorted by class)."""
    k = min(k, n)
    return np.linspace(0, n - 1, k).round().astype(int) if k else np.zeros(0, int)


def _planned_port(ctx: Context) -> str | None:
    return ctx.device.removeprefix("board:") if ctx.device.startswith("board:") else None


def _board_spec(ctx: Context, port: str | None) -> Any:
    """The planned board's spec (its clock gives an estimated latency), if the plan names one."""
    for b in ctx.profile.boards:
        if b.port == port and b.board is not None:
            return b.board
    return None


# ------------------------------------------------------------------ 1. data

def load_data(folder: str | Path | None, *, synth_speakers: int | None = None, limit_per_class: int | None = None,
              progress: Progress = _quiet) -> tuple[dict[str, D.ClipSet], str, list[np.ndarray]]:
    """(train/val/test clips, where they came from, background noises).

    No folder: synthesise the default dataset once (cached under the data root).
    The test split is speaker-disjoint; a tiny synthetic run may have no test
    speakers, in which case validation speakers stand in (and the source says so).
    """
    if folder is None:
        out = D.default_synth_dir()
        speakers = None
        if synth_speakers:
            have = D.installed_voices() & set(D.DEFAULT_VOICES) if shutil.which("espeak-ng") else set()
            everyone = D.synth_speakers(voices=[v for v in D.DEFAULT_VOICES if v in have] or D.DEFAULT_VOICES)
            speakers = everyone[:: max(1, len(everyone) // synth_speakers)][:synth_speakers]
            out = out.parent / f"{out.name}-{synth_speakers}"
        D.synthesize(out, speakers=speakers, progress=lambda d, t: progress("synthesising keywords", d, t))
        folder, source = out, f"synthetic keywords (espeak-ng) in {out}"
    else:
        source = f"{folder}"
    splits = D.load_splits(folder, limit_per_class=limit_per_class)
    total = sum(len(v) for v in splits.values())
    if len(splits["test"]) < 0.05 * total:      # few speakers (a quick run): test on val's speakers too
        t, v = splits["test"], splits["val"]
        splits["test"] = D.ClipSet(np.concatenate([t.audio, v.audio]), np.concatenate([t.labels, v.labels]),
                                   np.concatenate([t.speakers, v.speakers]), [*t.paths, *v.paths])
        source += " (few speakers: validation speakers tested too)"
    if len(splits["test"]) == 0:                 # still none: hold out a third of the speakers
        splits = D.load_splits(folder, val_percent=0.0, test_percent=34.0, limit_per_class=limit_per_class)
        source += "; a third of the speakers held out"
    if len(splits["test"]) == 0 or len(splits["train"]) == 0:
        raise D.DataError(f"{folder}: too few speakers to hold some out for testing; use more clips or speakers")
    return splits, source, D.load_background(folder)


# ------------------------------------------------------------------ 2. features

def training_features(clips: D.ClipSet, noises: list[np.ndarray], samples: int, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """MFCC of the clips, plus augmented copies (shift, background noise) up to `samples` examples.

    Each copy's audio is turned into features before the next is made: 85,000 clips of
    audio would take 2.7 GB, their features 170 MB.
    """
    feats, labels = [F.mfcc(clips.audio)], [clips.labels]
    copies = max(0, -(-samples // max(1, len(clips))) - 1)
    for k in range(copies):
        for start in range(0, len(clips), 1024):   # 1024 clips at a time: 64 MB of float audio at most
            rng = np.random.default_rng([seed + 1 + k, start])
            feats.append(F.mfcc(D.augment(clips.audio[start:start + 1024], noises, seed=rng)))
        labels.append(clips.labels)
    return np.concatenate(feats)[..., None], np.concatenate(labels)


# ------------------------------------------------------------------ 3. train

def train(x: np.ndarray, y: np.ndarray, *, channels: int = 64, blocks: int = 4, epochs: int = 30,
          batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0, progress: Progress = _quiet) -> Any:
    """The DS-CNN trained on (x, y); returns the Keras model."""
    import tensorflow as tf

    from models import kws
    from models.costs import DSCNNShape

    model = kws.compile_for_training(kws.build(DSCNNShape(channels, blocks), seed=seed), learning_rate)

    class Report(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            progress("training", epoch + 1, epochs)

    model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0, callbacks=[Report()])
    return model


# ------------------------------------------------------------------ 4-6. quantise, verify, export

@dataclass
class Compiled:
    """The int8 model and what the host knows about it before any device runs it."""

    tflite: bytes
    float_acc: float
    int8_acc: float
    tflm_acc: float
    tflm_scores: np.ndarray       # int8 reference scores on the test features
    test_input: np.ndarray        # int8 input tensors of the test clips (host features)
    tflm_arena: int
    export: Any                   # export.ExportResult


def compile_model(model: Any, x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, out_dir: Path
                  ) -> Compiled:
    """Quantise, check float vs int8 vs TFLite Micro on the test split, export C into out_dir/model."""
    from tiers.tier0 import export, quantize, verify

    tfl = quantize.quantize(model, x_train)
    rep = quantize.compare_accuracy(model, tfl, x_test, y_test)
    qin, _ = quantize.io_params(tfl)
    test_input = qin.quantize(x_test)
    tflm = verify.run(tfl, test_input).reshape(len(x_test), -1)
    tflm_acc = float((tflm.argmax(-1) == y_test).mean())
    atomic_write(out_dir / "model.tflite", tfl)
    res = export.export_c(tfl, out_dir / "model", source_name="model.tflite")
    return Compiled(tfl, rep.float_acc, rep.int8_acc, tflm_acc, tflm, test_input, verify.arena(tfl).total, res)


# ------------------------------------------------------------------ 7. device

@dataclass
class DeviceRun:
    """What the firmware computed, driven over its serial port."""

    where: str                        # "QEMU mps2-an386 (Cortex-M4)" or "<board> on <port>"
    image: dict[str, int]             # text / data / bss / flash / ram
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))     # int8, (clips, classes)
    inputs: np.ndarray = field(default_factory=lambda: np.zeros(0))     # int8 input tensors it computed
    feature_count: list[int] = field(default_factory=list)
    invoke_count: list[int] = field(default_factory=list)
    unit: str = "instructions"        # of the counts: instructions (QEMU -icount) or cycles
    counter_hz: int = 0

    @property
    def invoke_median(self) -> float | None:
        """The model's count per inference (median over the clips)."""
        return float(np.median(self.invoke_count)) if self.invoke_count else None

    @property
    def feature_median(self) -> float | None:
        return float(np.median(self.feature_count)) if self.feature_count else None

    def exact(self, tflite: bytes) -> int:
        """Clips whose scores equal TFLite Micro's on the very int8 input the device computed:
        the kernels' bit-exactness, with the front end taken out of the comparison."""
        from tiers.tier0 import verify

        n = len(self.scores)
        ref = verify.run(tflite, self.inputs).reshape(n, -1) if n else np.zeros((0, 0), np.int8)
        return int(np.sum(np.all(self.scores == ref, axis=1))) if n else 0

    def classify(self, clips: np.ndarray, classify: Callable[[np.ndarray], Classification],
                 count: Callable[[int], int], stage: str, progress: Progress) -> DeviceRun:
        """Send every clip, keep the scores, the input tensor the device computed and its counts."""
        scores, inputs = [], []
        for i, clip in enumerate(clips):
            r = classify(clip)
            scores.append(r.scores)
            inputs.append(r.input)
            self.feature_count.append(count(r.feature_count))
            self.invoke_count.append(count(r.invoke_count))
            progress(stage, i + 1, len(clips))
        self.scores, self.inputs = np.array(scores), np.array(inputs)
        return self


def run_on_qemu(model_dir: Path, clips: np.ndarray, progress: Progress = _quiet) -> DeviceRun:
    """Build for the emulated Cortex-M4 and classify `clips` through its UART."""
    from tiers.tier0 import firmware

    build = firmware.build_qemu(model_dir)
    run = DeviceRun(f"QEMU {firmware.QEMU_MACHINE} (Cortex-M4, -icount shift=0)", build.size.to_dict())
    with firmware.QemuDevice.start(build.elf) as dev:
        return run.classify(clips, lambda clip: dev.classify_full(clip, want_input=True), dev.instructions,
                            "classifying on QEMU", progress)


def classify_over_serial(port: str, clips: np.ndarray, *, where: str | None = None, image: dict[str, int] | None = None,
                         progress: Progress = _quiet) -> DeviceRun:
    """Classify `clips` on the flashed board at `port` through the test-mode protocol, then resume live mode."""
    from tiers.tier0.monitor import Link, open_port

    ser = open_port(port, timeout=0.5)
    try:
        link = Link(ser, timeout=60)
        info = link.info()
        run = DeviceRun(where or f"{info.board} on {port}", image or {}, unit=info.counter_unit,
                        counter_hz=info.counter_hz)
        run.classify(clips, lambda clip: link.classify(clip, want_input=True), int, "classifying on the board",
                     progress)
        link.live()
    finally:
        ser.close()
    return run


def run_on_board(profile: Any, port: str, model_dir: Path, clips: np.ndarray,
                 progress: Progress = _quiet) -> DeviceRun:
    """Flash the attached board (size-checked first) and classify `clips` over its serial port."""
    from tiers.tier0 import flash as fl

    res = fl.flash(profile, port=port, model_dir=model_dir, on_step=lambda s: progress(s, 0, 0))
    time.sleep(2.0)  # the board resets after the upload; its USB port comes back
    return classify_over_serial(port, clips, where=f"{res.target.name} on {port}", image=res.size.to_dict(),
                                progress=progress)


# ------------------------------------------------------------------ 8. the numbers

def _metrics(cfg: Config, source: str, splits: dict[str, D.ClipSet], c: Compiled, dev: DeviceRun,
             pick: np.ndarray, y_test: np.ndarray, spec: Any) -> dict[str, Any]:
    n = len(pick)
    same_input = int(np.sum(np.all(dev.inputs == c.test_input[pick].reshape(n, -1), axis=1))) if n else 0
    invoke, feats = dev.invoke_median, dev.feature_median
    macs = _macs(cfg.channels, cfg.blocks)
    m: dict[str, Any] = {
        "data": source, "clips": {k: len(v) for k, v in splits.items()},
        "model": {"channels": cfg.channels, "blocks": cfg.blocks, "macs": macs,
                  "tflite_bytes": len(c.tflite), "const_bytes": c.export.const_bytes,
                  "arena_bytes": c.export.arena_bytes, "tflm_arena_bytes": c.tflm_arena,
                  "arena_vs_tflm": round(c.export.arena_bytes / c.tflm_arena, 3) if c.tflm_arena else None},
        "accuracy": {"float": c.float_acc, "int8": c.int8_acc, "tflm": c.tflm_acc,
                     "tflm_on_device_clips": float((c.tflm_scores[pick].argmax(-1) == y_test[pick]).mean()) if n else None,
                     "device": float((dev.scores.argmax(-1) == y_test[pick]).mean()) if n else None,
                     "device_clips": n},
        "bit_exact": {"scores_equal_tflm": dev.exact(c.tflite), "inputs_equal_host": same_input, "of": n},
        "device": {"where": dev.where, "image": dev.image, "unit": dev.unit},
        "latency": {"model": invoke, "features": feats, "unit": dev.unit,
                    "model_per_mac": round(invoke / macs, 3) if invoke and macs else None},
    }
    prediction = _prediction(cfg, c, dev)
    if prediction:
        m["prediction"] = prediction
    if spec is not None and invoke:
        hz = spec.clock_mhz * 1e6
        m["latency"]["board"] = spec.name
        m["latency"]["board_ms_at_1_per_cycle"] = round((invoke + (feats or 0)) / hz * 1e3, 1)
        m["device"]["board_budget"] = {"flash_bytes": spec.flash_bytes, "sram_bytes": spec.sram_bytes}
    if dev.unit == "cycles" and dev.counter_hz and invoke:
        m["latency"]["model_ms"] = round(invoke / dev.counter_hz * 1e3, 2)
    return m


def _prediction(cfg: Config, c: Compiled, dev: DeviceRun) -> dict[str, Any] | None:
    """The planner's board-side predictions (its sized config) against what was built: the image's real
    flash and RAM (arm-none-eabi-size, or the board build's), our arena, the instructions measured."""
    pred = {"sram_bytes": cfg.sram_bytes, "flash_bytes": cfg.flash_bytes, "arena_bytes": cfg.arena_bytes,
            "model_bytes": cfg.model_bytes, "latency_ms": cfg.latency_ms}
    if all(v is None for v in pred.values()):
        return None
    img = dev.image or {}

    def ratio(a: float | None, p: float | None) -> float | None:
        return round(a / p, 3) if a and p else None

    return {
        "predicted": pred,
        "actual": {"image_ram_bytes": img.get("ram"), "image_flash_bytes": img.get("flash"),
                   "arena_bytes": c.export.arena_bytes, "tflm_arena_bytes": c.tflm_arena,
                   "model_const_bytes": c.export.const_bytes, "tflite_bytes": len(c.tflite)},
        "ratios": {"ram": ratio(img.get("ram"), pred["sram_bytes"]),
                   "flash": ratio(img.get("flash"), pred["flash_bytes"]),
                   "arena": ratio(c.export.arena_bytes, pred["arena_bytes"]),
                   "tflm_arena": ratio(c.tflm_arena, pred["arena_bytes"]),
                   "model": ratio(c.export.const_bytes, pred["model_bytes"])},
        "image_from": dev.where,
    }


def _macs(channels: int, blocks: int) -> int:
    from models import kws
    from models.costs import DSCNNShape

    return kws.macs(DSCNNShape(channels, blocks))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int = len(D.CLASSES)) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


# ------------------------------------------------------------------ plots

def plot_confusion(m: np.ndarray, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(D.CLASSES)), D.CLASSES, rotation=60, ha="right")
    ax.set_yticks(range(len(D.CLASSES)), D.CLASSES)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save(fig, path)


# ------------------------------------------------------------------ the report

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _nb(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _summary(m: dict[str, Any]) -> str:
    a, b, lat = m["accuracy"], m["bit_exact"], m["latency"]
    per = f"{lat['model']:,.0f} {lat['unit']} per inference" if lat["model"] else "no latency measured"
    return (f"DS-CNN ({m['model']['channels']} channels, {m['model']['blocks']} blocks): top-1 float "
            f"{_pct(a['float'])}, int8 {_pct(a['int8'])}, TFLite Micro {_pct(a['tflm'])}, on the device "
            f"{_pct(a['device'])} ({a['device_clips']} clips on {m['device']['where']}); device scores equal "
            f"TFLite Micro's on {b['scores_equal_tflm']}/{b['of']} clips; {per}.")


def _report(m: dict[str, Any]) -> str:
    mod, img, lat, a = m["model"], m["device"]["image"], m["latency"], m["accuracy"]
    lines = ["## Keyword spotter", "",
             (f"Data: {m['data']} ({', '.join(f'{k} {v}' for k, v in m['clips'].items())} clips; "
              "test speakers never heard in training)."), "",
             md_table(["stage", "top-1"], [
                 ["Keras float", _pct(a["float"])], ["int8 (LiteRT)", _pct(a["int8"])],
                 ["int8 on TFLite Micro", _pct(a["tflm"])],
                 ["TFLite Micro, the device's clips", _pct(a["tflm_on_device_clips"])],
                 [f"on the device ({m['device']['where']})", _pct(a["device"])]]), "",
             md_table(["size", "bytes"], [
                 [".tflite", f"{mod['tflite_bytes']:,}"], ["model constants in C (flash)", f"{mod['const_bytes']:,}"],
                 ["our arena", f"{mod['arena_bytes']:,}"],
                 ["TFLite Micro's arena", f"{mod['tflm_arena_bytes']:,} ({mod['arena_vs_tflm']}x)"],
                 ["firmware image: flash (text + data)", f"{img['flash']:,}"],
                 ["firmware image: RAM (data + bss + stack)", f"{img['ram']:,}"]]), ""]
    if m.get("prediction"):
        lines += _prediction_report(m["prediction"])
    if lat["model"]:
        lines += [f"Latency on {m['device']['where']}: model {lat['model']:,.0f} {lat['unit']} "
                  f"({lat['model_per_mac']} per MAC, {mod['macs']:,} MACs), features {lat['features']:,.0f} "
                  f"{lat['unit']}" + (f"; about {lat['board_ms_at_1_per_cycle']} ms on {lat['board']} at one "
                                      "instruction per cycle" if lat.get("board_ms_at_1_per_cycle") else "") + "."]
    b = m["bit_exact"]
    lines += ["", (f"Bit-exactness: on {b['scores_equal_tflm']} of {b['of']} clips the device's scores equal TFLite "
                   "Micro's on the same int8 input; the device's input tensor (its C front end) equals the host's "
                   f"(numpy front end) on {b['inputs_equal_host']} of {b['of']} clips (the two agree within float "
                   "rounding, so a rare element may land one int8 step apart).")]
    return "\n".join(lines)


def _prediction_report(pr: dict[str, Any]) -> list[str]:
    p, act, r = pr["predicted"], pr["actual"], pr["ratios"]
    return ["### Board budget: predicted vs the image", "",
            ("The planner sized the model for the board from its own estimates (a TFLite Micro firmware: "
             "arena plus a fixed firmware allowance in SRAM, .tflite plus firmware in flash). Against them, "
             f"the real sizes of the image built here ({pr['image_from']}; arm-none-eabi-size). The runner's "
             "'peak memory' row above is this host's process (training), not the board."), "",
            md_table(["", "predicted", "actual", "actual / predicted"], [
                ["board SRAM (image RAM: data + bss + stack)", _nb(p["sram_bytes"]), _nb(act["image_ram_bytes"]),
                 r["ram"] or "-"],
                ["board flash (image text + data)", _nb(p["flash_bytes"]), _nb(act["image_flash_bytes"]),
                 r["flash"] or "-"],
                ["arena (ours)", _nb(p["arena_bytes"]), _nb(act["arena_bytes"]), r["arena"] or "-"],
                ["arena (TFLite Micro, same model)", _nb(p["arena_bytes"]), _nb(act["tflm_arena_bytes"]),
                 r["tflm_arena"] or "-"],
                [f"model in flash (our C constants; .tflite {act['tflite_bytes']:,})", _nb(p["model_bytes"]),
                 _nb(act["model_const_bytes"]), r["model"] or "-"]]), ""]


# ------------------------------------------------------------------ `tierkit kws train` and `eval`: the steps one by one

def planned_size(profile: Any | None) -> str:
    """The ladder size the planner picks for the profile's board ("ds-cnn-s" when there is no plan)."""
    if profile is not None:
        try:
            from tiers.fit import fit

            plan = fit(profile, "B6", check_packages=False)
        except Exception:  # noqa: BLE001 - no plan is fine: the reference size
            return "ds-cnn-s"
        if plan.size:
            return plan.size
    return "ds-cnn-s"


@dataclass
class Trained:
    out_dir: Path
    compiled: Compiled
    clips: dict[str, int]
    source: str

    def line(self) -> str:
        c = self.compiled
        return (f"{self.out_dir / 'model.tflite'}: {len(c.tflite):,} B int8; top-1 on {self.clips['test']} held-out "
                f"clips: float {c.float_acc:.1%}, int8 {c.int8_acc:.1%}, TFLite Micro {c.tflm_acc:.1%} "
                f"(arena {c.tflm_arena:,} B; ours {c.export.arena_bytes:,} B)")


def train_to(out_dir: str | Path, *, size: str = "ds-cnn-s", data: str | Path | None = None, epochs: int = 30,
             train_samples: int = 85_000, synth_speakers: int | None = None, limit_per_class: int | None = None,
             seed: int = 0, progress: Progress = _quiet) -> Trained:
    """Steps 1-6 into `out_dir`: model.keras, model.tflite, model/ (C), train.json."""
    from models import kws

    shape = kws.shape(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits, source, noises = load_data(data, synth_speakers=synth_speakers, limit_per_class=limit_per_class,
                                       progress=progress)
    x_train, y_train = training_features(splits["train"], noises, train_samples, seed)
    x_test, y_test = F.mfcc(splits["test"].audio)[..., None], splits["test"].labels
    model = train(x_train, y_train, channels=shape.channels, blocks=shape.blocks, epochs=epochs, seed=seed,
                  progress=progress)
    model.save(out / "model.keras")
    c = compile_model(model, x_train, x_test, y_test, out)
    clips = {k: len(v) for k, v in splits.items()}
    atomic_write(out / "train.json", json.dumps({
        "size": size, "data": source, "clips": clips, "epochs": epochs, "train_examples": len(y_train),
        "accuracy": {"float": c.float_acc, "int8": c.int8_acc, "tflm": c.tflm_acc},
        "tflite_bytes": len(c.tflite), "tflm_arena_bytes": c.tflm_arena, "arena_bytes": c.export.arena_bytes,
        "const_bytes": c.export.const_bytes}, indent=2) + "\n")
    return Trained(out, c, clips, source)


@dataclass
class Evaluation:
    where: str
    accuracy: float
    n: int
    confusion: np.ndarray
    exact: int | None               # clips whose scores equal TFLite Micro's on the device's input
    model_count: float | None       # median per inference
    feature_count: float | None
    unit: str

    def lines(self) -> list[str]:
        out = [f"{self.where}: top-1 {self.accuracy:.1%} on {self.n} clips"]
        if self.exact is not None:
            out.append(f"scores equal TFLite Micro's (same int8 input) on {self.exact}/{self.n} clips")
        if self.model_count:
            out.append(f"per inference: model {self.model_count:,.0f} {self.unit}, features "
                       f"{self.feature_count:,.0f} {self.unit}")
        return out


def evaluate(model_dir: str | Path, clips: np.ndarray, labels: np.ndarray, *, port: str | None = None,
             tflite: bytes | None = None, progress: Progress = _quiet) -> Evaluation:
    """Accuracy measured on the device itself: a board on `port` (already flashed), else QEMU."""
    if port is None:
        dev = run_on_qemu(Path(model_dir), clips, progress)
    else:
        dev = classify_over_serial(port, clips, progress=progress)
    exact = dev.exact(tflite) if tflite is not None and len(clips) else None
    pred = dev.scores.argmax(-1) if len(clips) else np.zeros(0, int)
    return Evaluation(dev.where, float((pred == labels).mean()) if len(clips) else 0.0, len(clips),
                      confusion(labels, pred), exact, dev.invoke_median, dev.feature_median, dev.unit)


def held_out_clips(data: str | Path | None, limit: int, *, synth_speakers: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, str]:
    """(audio, labels, source) of up to `limit` held-out clips, spread over the classes."""
    splits, source, _ = load_data(data, synth_speakers=synth_speakers)
    test = splits["test"]
    pick = spread(len(test), limit)
    return test.audio[pick], test.labels[pick], source
