"""Keyword-spotting audio: the 12 classes, a Speech Commands loader split by speaker,
augmentation, and an offline default dataset spoken by espeak-ng.

Everything here is 16 kHz mono int16, one second per clip, in the Speech Commands
folder layout::

    root/yes/<speaker>_nohash_<n>.wav     one folder per class (or per word:
    root/bed/<speaker>_nohash_<n>.wav     words outside the ten keywords are _unknown_)
    root/_silence_/...                    optional, clips of no speech
    root/_background_noise_/*.wav         optional, long noise recordings for augmentation

Why split by speaker: a model that heard a speaker's "yes" in training recognises
their "no" more easily too, so a clip-level split overstates accuracy on new
voices. The split hashes the speaker id (as Speech Commands' own
`which_set` does), so it is stable as folders grow and the same on every machine.

Why synthesise: `tierkit kws train` must work on a fresh machine with no download.
espeak-ng across voices, variants, speeds and pitches gives hundreds of synthetic
"speakers"; a model trained on them is a start, real clips make it good.

Errors are `DataError`, whose message is one line naming the file or the missing
tool and what to do.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import wave
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from inventory.files import atomic_path

# ------------------------------------------------------------------ the task

KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE = "_silence_"
UNKNOWN = "_unknown_"
CLASSES: tuple[str, ...] = (*KEYWORDS, SILENCE, UNKNOWN)
"""Label i is CLASSES[i]; the model's 12 outputs are in this order."""

SAMPLE_RATE = 16_000
CLIP_SAMPLES = 16_000  # one second
BACKGROUND_DIR = "_background_noise_"

# Speech Commands' auxiliary words: what "_unknown_" means there.
UNKNOWN_WORDS: tuple[str, ...] = (
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "backward", "forward", "follow", "learn", "visual",
)

Split = Literal["train", "val", "test"]
INSTALL_HINT = "install it with `sudo apt-get install espeak-ng sox`"


class DataError(Exception):
    """Audio data that cannot be used; str() is one line naming the file or tool and the fix."""


# ------------------------------------------------------------------ wav files

def read_wav(path: str | os.PathLike) -> np.ndarray:
    """The samples of a 16 kHz mono 16-bit PCM wav as int16.

    Anything else (another rate, stereo, 8/24-bit, float, a truncated file) is refused
    rather than converted: a silent resample would hide a dataset that is not what
    its user thinks it is.
    """
    p = Path(path)
    want = f"expected {SAMPLE_RATE} Hz mono 16-bit PCM"
    try:
        with wave.open(str(p), "rb") as w:
            rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(frames)
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except (wave.Error, EOFError, OSError) as e:
        raise DataError(f"{p}: not a readable PCM wav ({e}); {want}") from None
    if rate != SAMPLE_RATE:
        raise DataError(f"{p}: sample rate {rate} Hz; {want} (convert with `sox IN -r 16000 -c 1 -b 16 OUT`)")
    if channels != 1:
        raise DataError(f"{p}: {channels} channels; {want} (convert with `sox IN -r 16000 -c 1 -b 16 OUT`)")
    if width != 2:
        raise DataError(f"{p}: {8 * width}-bit samples; {want} (convert with `sox IN -r 16000 -c 1 -b 16 OUT`)")
    if len(raw) != frames * 2:
        raise DataError(f"{p}: truncated: header says {frames} samples, file holds {len(raw) // 2}")
    if frames == 0:
        raise DataError(f"{p}: no samples")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


def write_wav(path: str | os.PathLike, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Write int16 mono audio atomically (a temporary name in the same folder, then rename),
    so an interrupted run never leaves a half-written clip that a later run would skip."""
    data = np.asarray(audio)
    if data.dtype != np.int16 or data.ndim != 1:
        raise ValueError(f"write_wav wants 1-D int16 audio, got {data.dtype} {data.shape}")
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.astype("<i2").tobytes())


def fit_clip(audio: np.ndarray, n: int = CLIP_SAMPLES, align: Literal["end", "centre"] = "end") -> np.ndarray:
    """Exactly `n` samples.

    align="end": a short clip is zero-padded at the end, as MLPerf Tiny's reference
    pipeline pads before its MFCC (so our features match it). align="centre": padded
    equally on both sides (what synthesis wants: the word in the middle of the second).
    A long clip keeps its middle `n` samples either way.
    """
    a = np.asarray(audio)
    if len(a) > n:
        start = (len(a) - n) // 2
        return a[start:start + n].copy()
    pad = n - len(a)
    before = pad // 2 if align == "centre" else 0
    return np.pad(a, (before, pad - before))


# ------------------------------------------------------------------ layout and the speaker split

@dataclass(frozen=True)
class ClipRef:
    """One clip on disk, before its audio is read."""
    path: Path
    label: int
    speaker: str


def speaker_of(path: str | os.PathLike) -> str:
    """The speaker id in a Speech Commands name.

    `<speaker>_nohash_<n>.wav` -> speaker. The v2 test archive's _unknown_ folder
    prefixes the word (`backward_0c540988_nohash_0.wav.wav`), so the id is the last
    `_`-separated token before `_nohash_`. A name without `_nohash_` (the archive's
    `_silence_/1037.wav`) is its own speaker.
    """
    name = Path(path).name
    stem = name.split(".", 1)[0]
    head = stem.split("_nohash_", 1)[0]
    return head.rsplit("_", 1)[-1]


_MAX_CLIPS_PER_CLASS = 2**27 - 1  # Speech Commands' constant: keeps its split stable as data grows


def which_split(speaker: str, val_percent: float = 10.0, test_percent: float = 10.0, salt: str = "") -> Split:
    """The split a speaker belongs to, from a hash of the id alone.

    The same arithmetic as Speech Commands' `which_set` (SHA-1 of the id, mod 2^27,
    as a percentage), so with no salt our split is the official one: every speaker of
    the official v2 test archive hashes to "test". To cut a train/val/test split out
    of that archive alone (or any folder whose speakers the official rule puts on
    one side), pass a `salt`: the split stays by speaker, only the draw changes.
    """
    digest = int(hashlib.sha1((salt + speaker).encode("utf-8")).hexdigest(), 16)
    percent = (digest % (_MAX_CLIPS_PER_CLASS + 1)) * (100.0 / _MAX_CLIPS_PER_CLASS)
    if percent < val_percent:
        return "val"
    if percent < val_percent + test_percent:
        return "test"
    return "train"


def _label_of_folder(name: str) -> int | None:
    """Class index for a folder name; None for folders that hold no labelled clips."""
    if name in CLASSES:
        return CLASSES.index(name)
    if name.startswith(("_", ".")):
        return None  # _background_noise_ and other bookkeeping
    return CLASSES.index(UNKNOWN)  # any other word: Speech Commands' full layout has one folder per word


def scan(root: str | os.PathLike) -> list[ClipRef]:
    """Every clip under `root`, sorted by path, without reading audio."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: no such folder; give a Speech Commands-style folder (class folders of wavs)")
    refs: list[ClipRef] = []
    for folder in sorted(p for p in r.iterdir() if p.is_dir()):
        label = _label_of_folder(folder.name)
        if label is None:
            continue
        for wav in sorted(folder.glob("*.wav")):
            if not wav.name.startswith("."):
                refs.append(ClipRef(wav, label, speaker_of(wav)))
    if not refs:
        raise DataError(f"{r}: no clips found; expected class folders such as {r}/yes/<speaker>_nohash_0.wav")
    return refs


@dataclass
class ClipSet:
    """Clips in memory: audio (N, 16000), labels (N,) indexing CLASSES, speakers (N,)."""
    audio: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray
    paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """Clips per class name, for reports and balance checks."""
        n = np.bincount(self.labels, minlength=len(CLASSES))
        return {c: int(k) for c, k in zip(CLASSES, n)}


def _stable_order(ref: ClipRef) -> str:
    return hashlib.sha1(str(ref.path.name).encode()).hexdigest()


def _limit(refs: list[ClipRef], per_class: int | None) -> list[ClipRef]:
    """At most `per_class` clips per label, chosen by a hash of the name (stable, not the first N)."""
    if per_class is None:
        return refs
    kept: list[ClipRef] = []
    for label in range(len(CLASSES)):
        mine = sorted((r for r in refs if r.label == label), key=_stable_order)
        kept.extend(mine[:per_class])
    return sorted(kept, key=lambda r: r.path)


def _to_clipset(refs: Sequence[ClipRef], dtype: Literal["int16", "float32"]) -> ClipSet:
    audio = np.zeros((len(refs), CLIP_SAMPLES), dtype=np.int16)
    for i, ref in enumerate(refs):
        audio[i] = fit_clip(read_wav(ref.path))
    if dtype == "float32":
        audio = audio.astype(np.float32) / 32768.0
    return ClipSet(audio=audio, labels=np.array([r.label for r in refs], dtype=np.int64),
                   speakers=np.array([r.speaker for r in refs]), paths=[r.path for r in refs])


def load_splits(root: str | os.PathLike, *, dtype: Literal["int16", "float32"] = "int16",
                val_percent: float = 10.0, test_percent: float = 10.0, salt: str = "",
                limit_per_class: int | None = None) -> dict[Split, ClipSet]:
    """All three speaker-disjoint splits of a Speech Commands-style folder.

    dtype "int16" keeps what the microphone gives (and what the device's features
    take); "float32" is int16 / 32768. `val_percent`, `test_percent`, `salt`: see
    `which_split`. `limit_per_class` caps each class (per split) with a stable choice,
    for quick runs and to keep _unknown_ from swamping the rest.
    """
    refs = scan(root)
    out: dict[Split, ClipSet] = {}
    for split in ("train", "val", "test"):
        mine = [r for r in refs if which_split(r.speaker, val_percent, test_percent, salt) == split]
        out[split] = _to_clipset(_limit(mine, limit_per_class), dtype)
    return out


def load(root: str | os.PathLike, split: Split | None = None, *, dtype: Literal["int16", "float32"] = "int16",
         val_percent: float = 10.0, test_percent: float = 10.0, salt: str = "",
         limit_per_class: int | None = None) -> ClipSet:
    """One split (or, with split=None, every clip) of a Speech Commands-style folder."""
    refs = scan(root)
    if split is not None:
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown split {split!r}; use train, val or test")
        refs = [r for r in refs if which_split(r.speaker, val_percent, test_percent, salt) == split]
    return _to_clipset(_limit(refs, limit_per_class), dtype)


def load_background(root: str | os.PathLike) -> list[np.ndarray]:
    """The long noise recordings in `root/_background_noise_/` as int16 arrays ([] if none).

    A recording shorter than one clip is refused: it could not fill a clip.
    """
    folder = Path(root) / BACKGROUND_DIR
    if not folder.is_dir():
        return []
    out = []
    for wav in sorted(folder.glob("*.wav")):
        a = read_wav(wav)
        if len(a) < CLIP_SAMPLES:
            raise DataError(f"{wav}: {len(a)} samples; background noise needs at least {CLIP_SAMPLES} (1 s)")
        out.append(a)
    return out


# ------------------------------------------------------------------ augmentation

def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def time_shift(clip: np.ndarray, shift: int) -> np.ndarray:
    """Move the clip by `shift` samples (positive: later), filling with zeros.

    Why: speakers do not start at the same instant; the model must not rely on where
    in the second the word sits.
    """
    out = np.zeros_like(clip)
    if shift >= 0:
        out[shift:] = clip[:len(clip) - shift]
    else:
        out[:shift] = clip[-shift:]
    return out


def noise_segment(noises: Sequence[np.ndarray], rng: np.random.Generator, n: int = CLIP_SAMPLES) -> np.ndarray:
    """A random `n`-sample stretch of a random background recording, as float32 in [-1, 1)."""
    src = noises[int(rng.integers(len(noises)))]
    start = int(rng.integers(0, len(src) - n + 1))
    seg = np.asarray(src[start:start + n], dtype=np.float32)
    return seg / 32768.0 if np.asarray(src).dtype == np.int16 else seg


def mix_at_snr(clip: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """clip + noise scaled so that 10 log10(P_clip / P_noise) = snr_db (float32 in, float32 out).

    A clip with no energy (digital silence) has no SNR to speak of: the noise then
    gets an RMS of 10^(-snr_db/20) of full scale, so louder SNRs still mean quieter noise.
    """
    p_clip = float(np.mean(clip.astype(np.float64) ** 2))
    p_noise = float(np.mean(noise.astype(np.float64) ** 2))
    if p_noise <= 0.0:
        return clip.astype(np.float32)
    target = p_clip / 10 ** (snr_db / 10) if p_clip > 1e-12 else 10 ** (-snr_db / 10)
    return (clip + noise * np.float32(np.sqrt(target / p_noise))).astype(np.float32)


def augment(audio: np.ndarray, noises: Sequence[np.ndarray] = (), seed: int | np.random.Generator = 0, *,
            max_shift_ms: float = 100.0, snr_db: tuple[float, float] = (5.0, 20.0),
            background_prob: float = 0.8) -> np.ndarray:
    """Training-time distortions of a batch (N, 16000) or one clip (16000,), seeded.

    Each clip is shifted by a uniform random amount within ±`max_shift_ms`, then, with
    probability `background_prob` and if there is any noise, mixed with a random stretch
    of a background recording at a uniform random SNR in `snr_db`. Below ~5 dB short
    words ("up", "off") drown in babble even for a listener, hence the default floor.

    Same seed, same output. Returns the input's dtype: int16 stays int16 (clipped to
    its range, as a microphone would), floats stay float32 in [-1, 1].
    """
    a = np.asarray(audio)
    single = a.ndim == 1
    batch = a[None] if single else a
    if batch.ndim != 2:
        raise ValueError(f"augment wants (N, samples) or (samples,), got shape {a.shape}")
    is_int = batch.dtype == np.int16
    x = batch.astype(np.float32) / (32768.0 if is_int else 1.0)
    rng = _rng(seed)
    max_shift = round(max_shift_ms * SAMPLE_RATE / 1000)
    out = np.empty_like(x)
    for i in range(len(x)):
        clip = time_shift(x[i], int(rng.integers(-max_shift, max_shift + 1)))
        if noises and rng.random() < background_prob:
            snr = float(rng.uniform(*snr_db))
            clip = mix_at_snr(clip, noise_segment(noises, rng, len(clip)), snr)
        out[i] = clip
    out = np.clip(out, -1.0, 1.0)
    if is_int:
        out = np.clip(np.round(out * 32768.0), -32768, 32767).astype(np.int16)
    return out[0] if single else out


def silence_clips(noises: Sequence[np.ndarray], n: int, seed: int | np.random.Generator = 0, *,
                  level_dbfs: tuple[float, float] = (-60.0, -20.0)) -> np.ndarray:
    """`n` int16 clips of background noise alone, at a random RMS level in `level_dbfs`.

    For a folder without a _silence_ class (the full Speech Commands has none: its
    _silence_ is cut from _background_noise_, as here).
    """
    if not noises:
        raise DataError("no background noise to cut _silence_ clips from; add a _background_noise_ folder")
    rng = _rng(seed)
    out = np.empty((n, CLIP_SAMPLES), dtype=np.int16)
    for i in range(n):
        seg = noise_segment(noises, rng)
        out[i] = _to_int16(_at_level(seg, float(rng.uniform(*level_dbfs))))
    return out


def _at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    return x * (10 ** (dbfs / 20) / rms) if rms > 0 else x


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


# ------------------------------------------------------------------ generated noise

NOISE_KINDS: tuple[str, ...] = ("white", "pink", "brown", "hum50", "hum60", "fan")


def generate_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of a kind of noise, float32 with unit peak.

    Coloured noise is white noise shaped in the frequency domain (pink: power ∝ 1/f,
    brown: 1/f²); hum is mains harmonics over a faint hiss; fan is band-limited
    rumble. Enough variety that _silence_ is not "one kind of hiss".
    """
    white = rng.standard_normal(n)
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    if kind == "white":
        x = white
    elif kind in ("pink", "brown", "fan"):
        spec = np.fft.rfft(white)
        shape = np.zeros_like(f)
        nz = f > 0
        if kind == "fan":
            shape[nz] = np.exp(-0.5 * ((f[nz] - 180.0) / 120.0) ** 2) + 0.05 / np.sqrt(f[nz] / 100 + 1)
        else:
            shape[nz] = f[nz] ** (-0.5 if kind == "pink" else -1.0)
        x = np.fft.irfft(spec * shape, n)
    elif kind in ("hum50", "hum60"):
        base = 50.0 if kind == "hum50" else 60.0
        t = np.arange(n) / SAMPLE_RATE
        x = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * base * h * t + rng.uniform(0, 2 * np.pi))
                for h in range(1, 8)) + 0.05 * white
    else:
        raise ValueError(f"unknown noise kind {kind!r}; one of {', '.join(NOISE_KINDS)}")
    x = x - np.mean(x)
    return (x / np.max(np.abs(x))).astype(np.float32)


# ------------------------------------------------------------------ synthesis with espeak-ng

# espeak-ng's own English voices (the mbrola ones need extra packages).
DEFAULT_VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                                   "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
DEFAULT_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
DEFAULT_SPEEDS: tuple[int, ...] = (130, 170, 210)  # words per minute
DEFAULT_PITCHES: tuple[int, ...] = (35, 65)        # espeak-ng's 0-99 scale


@dataclass(frozen=True)
class SynthSpeaker:
    """One synthetic "speaker": a voice, a variant, a speed and a pitch."""
    voice: str
    variant: str
    speed: int
    pitch: int

    @property
    def id(self) -> str:
        """Speaker id for file names; no '_' so that `speaker_of` gives it back whole."""
        return f"espeak-{self.voice}-{self.variant}-s{self.speed}-p{self.pitch}".replace("_", "-")

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}" if self.variant else self.voice


@dataclass(frozen=True)
class _Job:
    """One file to write: a spoken word, a silence clip or a background recording."""
    path: Path
    kind: Literal["word", "silence", "background"]
    text: str = ""
    speaker: SynthSpeaker | None = None
    noise: str = ""
    seconds: float = 1.0


@dataclass
class SynthReport:
    """What `synthesize` did."""
    out_dir: Path
    total: int
    written: int
    skipped: int
    speakers: int


def espeak_binary() -> str:
    """Path of espeak-ng, or a DataError naming the package to install."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError(f"espeak-ng not found: synthetic keywords need it; {INSTALL_HINT}")
    return exe


def installed_voices(exe: str | None = None) -> set[str]:
    """Language names of the voices this espeak-ng has (`espeak-ng --voices`, column 2)."""
    proc = subprocess.run([exe or espeak_binary(), "--voices"], capture_output=True, text=True, timeout=30,
                          check=False)
    return {cols[1] for cols in (line.split() for line in proc.stdout.splitlines()[1:]) if len(cols) > 1}


def speak(text: str, speaker: SynthSpeaker, exe: str | None = None) -> tuple[np.ndarray, int]:
    """espeak-ng's rendering of `text` as (float32 samples in [-1, 1), sample rate)."""
    cmd = [exe or espeak_binary(), "-v", speaker.espeak_voice, "-s", str(speaker.speed),
           "-p", str(speaker.pitch), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        why = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no audio"])[-1]
        raise DataError(f"espeak-ng failed for voice {speaker.espeak_voice!r} saying {text!r}: {why}")
    return _parse_stream_wav(proc.stdout, f"espeak-ng -v {speaker.espeak_voice}")


def _parse_stream_wav(blob: bytes, what: str) -> tuple[np.ndarray, int]:
    """Samples of a wav written to a pipe. espeak-ng's --stdout header carries placeholder
    sizes (it cannot seek back), so the data chunk runs to the end of the stream."""
    if blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise DataError(f"{what}: output is not a wav")
    pos, rate, bits, channels = 12, 0, 0, 0
    while pos + 8 <= len(blob):
        cid, size = blob[pos:pos + 4], int.from_bytes(blob[pos + 4:pos + 8], "little")
        if cid == b"fmt ":
            channels = int.from_bytes(blob[pos + 10:pos + 12], "little")
            rate = int.from_bytes(blob[pos + 12:pos + 16], "little")
            bits = int.from_bytes(blob[pos + 22:pos + 24], "little")
        elif cid == b"data":
            if bits != 16 or channels != 1:
                raise DataError(f"{what}: {bits}-bit {channels}-channel output; expected 16-bit mono")
            data = blob[pos + 8:]
            data = data[:len(data) // 2 * 2]
            return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, rate
        pos += 8 + size + (size & 1)
    raise DataError(f"{what}: wav without a data chunk")


def resample(x: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by truncating (or zero-extending) the spectrum.

    Exact for a periodic signal; a spoken word with silence at both ends is close
    enough to one. Why not sox: one fewer process per clip, and no dependency.
    """
    if rate_in == rate_out:
        return x.astype(np.float32)
    n_out = round(len(x) * rate_out / rate_in)
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out_spec = np.zeros(n_out // 2 + 1, dtype=complex)
    out_spec[:keep] = spec[:keep]
    return (np.fft.irfft(out_spec, n_out) * (n_out / len(x))).astype(np.float32)


def trim_silence(x: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """The part of `x` between the first and last sample above `threshold` x peak."""
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if peak == 0.0:
        return x
    loud = np.nonzero(np.abs(x) > threshold * peak)[0]
    return x[loud[0]:loud[-1] + 1]


def _job_seed(seed: int, path: Path) -> int:
    """A per-file seed from the file's name: the same bytes whatever the worker order."""
    key = f"{seed}/{path.parent.name}/{path.name}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def _render(job: _Job, seed: int, exe: str | None, noise_snr_db: tuple[float, float]) -> np.ndarray:
    rng = np.random.default_rng(_job_seed(seed, job.path))
    if job.kind == "background":
        return _to_int16(0.5 * generate_noise(job.noise, int(job.seconds * SAMPLE_RATE), rng))
    if job.kind == "silence":
        noise = generate_noise(job.noise, CLIP_SAMPLES, rng)
        return _to_int16(_at_level(noise, float(rng.uniform(-60.0, -25.0))))
    assert job.speaker is not None
    audio, rate = speak(job.text, job.speaker, exe)
    word = trim_silence(resample(audio, rate))
    if len(word) == 0:
        raise DataError(f"espeak-ng -v {job.speaker.espeak_voice} said nothing for {job.text!r}")
    word = word / np.max(np.abs(word)) * rng.uniform(0.3, 0.9)  # loudness varies between speakers
    clip = fit_clip(word.astype(np.float32), align="centre")
    # A faint noise floor: real microphones never give digital silence, and a model must
    # not learn "perfect zeros means synthetic".
    floor = generate_noise(str(rng.choice(NOISE_KINDS)), CLIP_SAMPLES, rng)
    clip = mix_at_snr(clip, floor, float(rng.uniform(*noise_snr_db)))
    return _to_int16(np.clip(clip, -1.0, 1.0))


def synth_speakers(voices: Iterable[str] = DEFAULT_VOICES, variants: Iterable[str] = DEFAULT_VARIANTS,
                   speeds: Iterable[int] = DEFAULT_SPEEDS, pitches: Iterable[int] = DEFAULT_PITCHES
                   ) -> list[SynthSpeaker]:
    """Every voice x variant x speed x pitch combination: each is one synthetic speaker."""
    return [SynthSpeaker(v, var, s, p) for v in voices for var in variants for s in speeds for p in pitches]


def _plan(out: Path, speakers: Sequence[SynthSpeaker], keywords: Sequence[str], unknown_words: Sequence[str],
          unknown_per_speaker: int, n_silence: int, background_seconds: float) -> list[_Job]:
    jobs: list[_Job] = []
    for i, spk in enumerate(speakers):
        for kw in keywords:
            jobs.append(_Job(out / kw / f"{spk.id}_nohash_0.wav", "word", text=kw, speaker=spk))
        for j in range(min(unknown_per_speaker, len(unknown_words))):
            w = (i * unknown_per_speaker + j) % len(unknown_words)  # rotate so every word gets said
            jobs.append(_Job(out / UNKNOWN / f"{spk.id}_nohash_{w}.wav", "word", text=unknown_words[w], speaker=spk))
    for k in range(n_silence):
        kind = NOISE_KINDS[k % len(NOISE_KINDS)]
        jobs.append(_Job(out / SILENCE / f"noise-{kind}-{k:04d}_nohash_0.wav", "silence", noise=kind))
    if background_seconds > 0:
        for kind in NOISE_KINDS:
            jobs.append(_Job(out / BACKGROUND_DIR / f"{kind}_noise.wav", "background", noise=kind,
                             seconds=background_seconds))
    return jobs


def synthesize(out_dir: str | os.PathLike, *, keywords: Sequence[str] = KEYWORDS,
               unknown_words: Sequence[str] = UNKNOWN_WORDS, speakers: Sequence[SynthSpeaker] | None = None,
               unknown_per_speaker: int = 2, n_silence: int | None = None, background_seconds: float = 20.0,
               noise_snr_db: tuple[float, float] = (20.0, 40.0), seed: int = 0, workers: int = 2,
               progress: Callable[[int, int], None] | None = None) -> SynthReport:
    """Write a Speech Commands-style dataset spoken by espeak-ng into `out_dir`.

    Each synthetic speaker (default: the 8 English voices of `DEFAULT_VOICES` that are
    installed x 12 variants x 3 speeds x 2 pitches = up to 576) says every keyword and `unknown_per_speaker` unknown words; the
    word is resampled to 16 kHz, trimmed, scaled to a random loudness, centred in one
    second and laid over a faint generated noise floor at `noise_snr_db`. `n_silence`
    generated-noise clips (default: as many as one keyword has) form _silence_, and
    `_background_noise_` gets one recording per noise kind for `augment`.

    Idempotent: files that exist are skipped, and every file is written atomically,
    so an interrupted run resumes where it stopped. Deterministic: each file's random
    choices come from `seed` and its name. `progress(done, total)` is called from
    this thread after each file. Raises DataError if espeak-ng is missing or fails.
    """
    out = Path(out_dir)
    if speakers is None:  # the default voices this espeak-ng has (older releases lack en-us-nyc)
        have = installed_voices() if shutil.which("espeak-ng") else set(DEFAULT_VOICES)
        speakers = synth_speakers(voices=[v for v in DEFAULT_VOICES if v in have] or DEFAULT_VOICES)
    spk = list(speakers)
    jobs = _plan(out, spk, keywords, unknown_words, unknown_per_speaker,
                 len(spk) if n_silence is None else n_silence, background_seconds)
    todo = [j for j in jobs if not j.path.exists()]
    exe = espeak_binary() if any(j.kind == "word" for j in todo) else None
    done = len(jobs) - len(todo)
    if progress:
        progress(done, len(jobs))

    def work(job: _Job) -> None:
        write_wav(job.path, _render(job, seed, exe, noise_snr_db))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = {pool.submit(work, j) for j in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                if fut.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise fut.exception()  # type: ignore[misc]
                done += 1
                if progress:
                    progress(done, len(jobs))
    return SynthReport(out_dir=out, total=len(jobs), written=len(todo), skipped=len(jobs) - len(todo),
                       speakers=len(spk))


def default_synth_dir() -> Path:
    """Where the synthetic default dataset lives: `kws-synth/` under the dataset registry's
    root ($TIERKIT_DATA, else ~/.cache/tierkit), so it is made once per machine."""
    from tiers.data import data_root  # the registry decides where data lives

    return data_root() / "kws-synth"
