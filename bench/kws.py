"""B6's keyword spotter against TensorFlow Lite Micro, in one run.

One DS-CNN (the MLPerf Tiny size, 64 channels x 4 blocks, unless --size says
otherwise) is trained, quantised to int8 with the TFLite converter, run on the
TFLite Micro interpreter (the `tflite-micro` package), compiled to C by
`tierkit kws export`, built into the firmware for the emulated Cortex-M4 (QEMU
mps2-an386) and driven over its serial port with pyserial. Printed and written
to bench/results/:

- arena: our static plan's bytes against TFLite Micro's arena for the same
  model (target <= 0.6x), also with the caller's input and output buffers
  counted on our side;
- flash: the model's constants in C (weights, biases, requantisation tables,
  parameter blocks) and the .tflite TFLite Micro would hold; the firmware
  image's flash and RAM (arm-none-eabi-size);
- instructions per inference under QEMU `-icount shift=0` (one guest
  instruction per virtual ns; SysTick counts them) divided by the model's MACs
  (target <= 2 on the Cortex-M4; instructions, not cycles: QEMU has no
  pipeline model);
- top-1 accuracy float (Keras) / int8 (TFLite converter's interpreter) /
  TFLite Micro / on the device (QEMU, scores read back over serial), and on how
  many clips the device's scores equal TFLite Micro's bit for bit.

Data: the real Speech Commands v2 test clips in ../shared/data/speech_commands_v2_test/.
All their speakers hash to "test" under the official rule, so the split here is
by speaker with a salt (`--salt`): about 60% of the speakers train, 10% validate
(unused) and 30% are held out; every accuracy is on held-out speakers only. With
`--train-on synth` the model trains on the embedded espeak-ng keywords instead and
is tested on the same held-out real speakers (no real speech seen in training).

    python bench/kws.py [--quick] [--size s] [--epochs N] [--train-samples N] [--device-clips N]
                        [--train-on real|synth] [--data DIR] [--salt S] [--out bench/results/kws.json]

--quick (a couple of minutes): 4 epochs on 6,000 examples, 24 clips on QEMU;
the accuracies are then those of an under-trained model, the sizes and the
instruction count are the real ones.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np

from inventory.files import atomic_write

ARENA_TARGET = 0.6
INSTR_PER_MAC_TARGET = 2.0
DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands_v2_test"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a couple of minutes: few epochs, few device clips")
    ap.add_argument("--size", default="s", help="DS-CNN ladder size (xs, s, m, l) [s: the MLPerf Tiny reference]")
    ap.add_argument("--epochs", type=int, default=None, help="[30; --quick 4]")
    ap.add_argument("--train-samples", type=int, default=None,
                    help="training examples per epoch, reached with augmented copies [40000; --quick 6000]")
    ap.add_argument("--device-clips", type=int, default=None,
                    help="held-out clips streamed to QEMU (~1.3 s each) [200; --quick 24]")
    ap.add_argument("--train-on", choices=("real", "synth"), default="real",
                    help="real: the salted speaker split's training speakers; synth: espeak-ng keywords")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Speech Commands-style folder of real clips")
    ap.add_argument("--salt", default="tierkit-bench-kws", help="salt of the speaker split (data.which_split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="[bench/results/kws.json; --quick bench/results/kws_quick.json]")
    args = ap.parse_args()
    args.epochs = args.epochs or (4 if args.quick else 30)
    args.train_samples = args.train_samples or (6000 if args.quick else 40_000)
    if args.device_clips is None:
        args.device_clips = 24 if args.quick else 200
    args.out = args.out or REPO / "bench" / "results" / ("kws_quick.json" if args.quick else "kws.json")
    return args


def clips(args: argparse.Namespace) -> tuple[Any, Any, list[np.ndarray], str, str]:
    """(train clips, held-out real test clips, noises, where each came from): real clips split by
    speaker with a salt, so test speakers are never trained on; or synthetic keywords to train on."""
    from tiers.tier0 import b06_kws as B
    from tiers.tier0 import data as D

    if not args.data.is_dir():
        sys.exit(f"bench/kws.py: no clips at {args.data}; pass --data (a Speech Commands-style folder)")
    real = D.load_splits(args.data, val_percent=10.0, test_percent=30.0, salt=args.salt)
    test = real["test"]
    overlap = set(real["train"].speakers) & set(test.speakers)
    assert not overlap, f"speaker split leaks {len(overlap)} speakers"
    rng = np.random.default_rng(args.seed)
    noises = [(D.generate_noise(k, 10 * D.CLIP_SAMPLES, rng) * 3000).astype(np.int16) for k in D.NOISE_KINDS]
    if args.train_on == "real":
        train = real["train"]
        train_source = (f"real clips of {len(set(train.speakers))} speakers ({args.data.name}, salted speaker split "
                        f"'{args.salt}'), augmented with shift and generated noise")
    else:
        splits, source, synth_noises = B.load_data(None)
        train, noises = splits["train"], synth_noises or noises
        train_source = f"synthetic espeak-ng keywords: {source}"
    test_source = f"{len(test)} real clips of {len(set(test.speakers))} held-out speakers ({args.data.name})"
    return train, test, noises, train_source, test_source


def main() -> None:
    args = parse_args()

    from models import kws
    from tiers.tier0 import b06_kws as B
    from tiers.tier0 import data as D
    from tiers.tier0 import features as F
    from tiers.tier0 import firmware

    t0 = time.perf_counter()
    shape = kws.shape(args.size)
    macs = kws.macs(shape)

    # 1. data
    train, test, noises, train_source, test_source = clips(args)
    log(f"train: {len(train)} clips, {train_source}")
    log(f"test:  {test_source}")
    x_train, y_train = B.training_features(train, noises, args.train_samples, args.seed)
    x_test, y_test = F.mfcc(test.audio)[..., None], test.labels
    t_data = time.perf_counter() - t0

    # 2. train, quantise, TFLite Micro, export (b06_kws's own steps)
    def progress(stage: str, done: int, total: int) -> None:
        if stage == "training":
            log(f"  training: epoch {done}/{total}, {time.perf_counter() - t0:.0f} s")

    model = B.train(x_train, y_train, channels=shape.channels, blocks=shape.blocks, epochs=args.epochs,
                    seed=args.seed, progress=progress)
    t_train = time.perf_counter() - t0 - t_data
    work = args.out.parent / f".kws-build-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        c = B.compile_model(model, x_train, x_test, y_test, work)

        # 3. the device: the firmware on the emulated Cortex-M4, over its serial pty
        pick = B.spread(len(y_test), args.device_clips)
        n = len(pick)
        build = firmware.build_qemu(work / "model")
        dev = B.run_on_qemu(work / "model", test.audio[pick])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    same_input = int(np.sum(np.all(dev.inputs == c.test_input[pick].reshape(n, -1), axis=1))) if n else 0
    instr = dev.invoke_median or float("nan")
    per_mac = instr / macs
    io = int(np.prod(x_test.shape[1:])) + len(D.CLASSES)
    ours, theirs = c.export.arena_bytes, c.tflm_arena
    doc = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "quick": args.quick, "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "model": {"size": args.size, "channels": shape.channels, "blocks": shape.blocks, "macs": macs},
        "training": {"on": train_source, "clips": len(train), "examples_per_epoch": len(y_train),
                     "epochs": args.epochs},
        "test": {"on": test_source, "clips": len(y_test), "device_clips": n, "salt": args.salt},
        "arena": {"ours_bytes": ours, "tflm_bytes": theirs, "ratio": round(ours / theirs, 3),
                  "ours_with_io_bytes": ours + io, "ratio_with_io": round((ours + io) / theirs, 3),
                  "naive_reuse_bytes": c.export.naive_arena_bytes, "target": ARENA_TARGET,
                  "pass": ours / theirs <= ARENA_TARGET},
        "flash": {"model_constants_bytes": c.export.const_bytes, "tflite_bytes": len(c.tflite),
                  "firmware_image": build.size.to_dict()},
        "instructions": {"per_inference": instr, "per_mac": round(per_mac, 3),
                         "features_per_inference": dev.feature_median or float("nan"),
                         "unit": "guest instructions (QEMU mps2-an386 Cortex-M4, -icount shift=0)",
                         "target_per_mac": INSTR_PER_MAC_TARGET, "pass": per_mac <= INSTR_PER_MAC_TARGET},
        "accuracy": {"float": c.float_acc, "int8": c.int8_acc, "tflm": c.tflm_acc,
                     "tflm_on_device_clips": float((c.tflm_scores[pick].argmax(-1) == y_test[pick]).mean()) if n else None,
                     "device": float((dev.scores.argmax(-1) == y_test[pick]).mean()) if n else None},
        "bit_exact": {"scores_equal_tflm": dev.exact(c.tflite), "inputs_equal_host": same_input, "of": n},
        "seconds": {"data_and_features": round(t_data, 1), "training": round(t_train, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }
    show(doc)
    atomic_write(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.out}")


def show(doc: dict[str, Any]) -> None:
    """The results, one line per question."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    mod, ar, fl, ins, acc, ex = (doc[k] for k in ("model", "arena", "flash", "instructions", "accuracy", "bit_exact"))
    ours, theirs, img, n = ar["ours_bytes"], ar["tflm_bytes"], fl["firmware_image"], ex["of"]
    instr, per_mac = ins["per_inference"], ins["per_inference"] / mod["macs"]
    print(f"DS-CNN {mod['channels']}x{mod['blocks']} ({mod['macs']:,} MACs), trained on {doc['training']['on']}; "
          f"tested on {doc['test']['on']}" + ("  [--quick: under-trained]" if doc["quick"] else ""))
    print(f"arena:  ours {ours:,} B vs TFLite Micro {theirs:,} B -> {ours / theirs:.2f}x "
          f"(with the caller's input/output {ar['ours_with_io_bytes'] / theirs:.2f}x; target <= {ARENA_TARGET}x: "
          f"{'PASS' if ours / theirs <= ARENA_TARGET else 'MISS'})")
    print(f"flash:  model constants in C {fl['model_constants_bytes']:,} B (.tflite for TFLite Micro "
          f"{fl['tflite_bytes']:,} B); firmware image flash {img['flash']:,} B, RAM {img['ram']:,} B")
    print(f"speed:  {instr:,.0f} instructions per inference / {mod['macs']:,} MACs = {per_mac:.2f} per MAC on the "
          f"emulated Cortex-M4 (target <= {INSTR_PER_MAC_TARGET}: "
          f"{'PASS' if per_mac <= INSTR_PER_MAC_TARGET else 'MISS'}); features {ins['features_per_inference']:,.0f}")
    print(f"top-1:  float {pct(acc['float'])}, int8 {pct(acc['int8'])}, TFLite Micro {pct(acc['tflm'])} "
          f"({doc['test']['clips']} clips); on the device {pct(acc['device'])} vs TFLite Micro "
          f"{pct(acc['tflm_on_device_clips'])} on the same {n} clips")
    print(f"exact:  device scores equal TFLite Micro's on {ex['scores_equal_tflm']}/{n} clips (same int8 input); "
          f"device front end's input equals the host's on {ex['inputs_equal_host']}/{n}")


if __name__ == "__main__":
    main()
