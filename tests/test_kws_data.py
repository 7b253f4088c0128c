"""Keyword-spotting data: the speaker split on real Speech Commands clips, wav errors,
augmentation, and espeak-ng synthesis actually run (tiers/tier0/data.py)."""
from __future__ import annotations

import shutil
import wave
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED
from tiers.tier0 import data as d

REAL = SHARED / "data" / "speech_commands_v2_test"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real Speech Commands clips not found at {REAL}")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (sudo apt-get install espeak-ng sox)")


def _write(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1, width: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples).astype(f"<i{width}").tobytes())
    return path


# ------------------------------------------------------------------ the speaker split on real clips

@needs_real
def test_unsalted_split_is_speech_commands_official_one():
    """Every speaker of the official v2 test archive hashes to "test": our rule is theirs."""
    refs = [r for r in d.scan(REAL) if d.CLASSES[r.label] != d.SILENCE]  # _silence_ has no speakers
    assert len(refs) > 2000
    assert {d.which_split(r.speaker) for r in refs} == {"test"}


@needs_real
def test_salted_split_of_real_clips_is_speaker_disjoint():
    refs = d.scan(REAL)
    assert len(refs) == 2665
    assert {d.CLASSES[r.label] for r in refs} == set(d.CLASSES)
    by_split: dict[str, set[str]] = defaultdict(set)
    clips: dict[str, int] = defaultdict(int)
    for r in refs:
        s = d.which_split(r.speaker, salt="tierkit")
        by_split[s].add(r.speaker)
        clips[s] += 1
    assert set(by_split) == {"train", "val", "test"}
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    assert sum(clips.values()) == len(refs)
    assert clips["train"] > 0.65 * len(refs) and 0.04 * len(refs) < clips["test"] < 0.2 * len(refs)
    # Speaker ids as the archive spells them, including its word-prefixed _unknown_ names.
    assert d.speaker_of("backward_0c540988_nohash_0.wav.wav") == "0c540988"
    assert d.speaker_of("yes/4c6167ca_nohash_3.wav") == "4c6167ca"


@needs_real
def test_load_splits_arrays():
    splits = d.load_splits(REAL, salt="tierkit", limit_per_class=4)
    total = 0
    for name, cs in splits.items():
        assert cs.audio.dtype == np.int16 and cs.audio.shape == (len(cs), 16000), name
        assert cs.labels.dtype == np.int64 and set(cs.labels) <= set(range(12))
        assert all(n <= 4 for n in cs.counts().values())
        assert len(cs.paths) == len(cs) == len(cs.speakers)
        total += len(cs)
    assert set(splits["train"].speakers).isdisjoint(splits["test"].speakers)
    f = d.load(REAL, "test", salt="tierkit", dtype="float32", limit_per_class=2)
    assert f.audio.dtype == np.float32 and np.abs(f.audio).max() <= 1.0 and np.abs(f.audio).max() > 0.01
    # The int16 and float32 views are the same clips.
    i = d.load(REAL, "test", salt="tierkit", limit_per_class=2)
    np.testing.assert_array_equal(i.audio.astype(np.float32) / 32768, f.audio)


# ------------------------------------------------------------------ loader errors: one line naming the file

@pytest.mark.parametrize("kind,needle", [
    ("rate", "sample rate 22050 Hz"),
    ("stereo", "2 channels"),
    ("8bit", "8-bit"),
    ("truncated", "truncated"),
    ("garbage", "not a readable PCM wav"),
])
def test_malformed_wav_is_one_line_naming_the_file(tmp_path, kind, needle):
    p = tmp_path / "yes" / "abcd1234_nohash_0.wav"
    if kind == "rate":
        _write(p, np.zeros(22050), rate=22050)
    elif kind == "stereo":
        _write(p, np.zeros(32000), channels=2)
    elif kind == "8bit":
        _write(p, np.zeros(16000), width=1)
    elif kind == "truncated":
        _write(p, np.arange(16000))
        p.write_bytes(p.read_bytes()[:10_000])
    else:
        p.parent.mkdir(parents=True)
        p.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(d.DataError) as e:
        d.load(tmp_path)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg, msg


def test_loader_layout(tmp_path):
    with pytest.raises(d.DataError, match="no such folder"):
        d.scan(tmp_path / "missing")
    with pytest.raises(d.DataError, match="no clips found"):
        d.scan(tmp_path)
    _write(tmp_path / "yes" / "aaaa_nohash_0.wav", np.ones(12000))       # short: padded at the end
    _write(tmp_path / "bed" / "bbbb_nohash_0.wav", np.ones(16000))       # any other word: _unknown_
    _write(tmp_path / d.BACKGROUND_DIR / "white.wav", np.ones(40000))    # not a class
    (tmp_path / "README.md").write_text("not a folder")
    cs = d.load(tmp_path)
    assert [d.CLASSES[i] for i in cs.labels] == ["_unknown_", "yes"]
    assert cs.audio[1, 11999] == 1 and cs.audio[1, 12000] == 0
    assert len(d.load_background(tmp_path)) == 1


# ------------------------------------------------------------------ augmentation

def test_augment_shapes_dtypes_and_determinism():
    rng = np.random.default_rng(1)
    clips = (rng.standard_normal((6, 16000)) * 3000).astype(np.int16)
    noises = [(rng.standard_normal(50_000) * 8000).astype(np.int16)]
    a = d.augment(clips, noises, seed=7)
    b = d.augment(clips, noises, seed=7)
    c = d.augment(clips, noises, seed=8)
    assert a.dtype == np.int16 and a.shape == clips.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    one = d.augment(clips[0].astype(np.float32) / 32768, noises, seed=3)
    assert one.dtype == np.float32 and one.shape == (16000,) and np.abs(one).max() <= 1.0
    # No noise given: augmentation is a pure shift within ±100 ms.
    x = np.zeros(16000, np.int16)
    x[8000] = 1000
    moved = [int(np.argmax(d.augment(x, seed=s))) for s in range(40)]
    assert all(abs(m - 8000) <= 1600 for m in moved) and len(set(moved)) > 10


def test_mix_at_snr_hits_the_snr():
    rng = np.random.default_rng(0)
    clip = rng.standard_normal(16000).astype(np.float32) * 0.1
    noise = rng.standard_normal(16000).astype(np.float32)
    mixed = d.mix_at_snr(clip, noise, 10.0)
    snr = 10 * np.log10(np.mean(clip.astype(np.float64) ** 2) / np.mean((mixed - clip).astype(np.float64) ** 2))
    assert abs(snr - 10.0) < 1e-3
    quiet = d.mix_at_snr(np.zeros(16000, np.float32), noise, 40.0)   # silence: level from the SNR
    assert 0.005 < np.sqrt(np.mean(quiet ** 2)) < 0.02


def test_silence_and_generated_noise():
    rng = np.random.default_rng(0)
    for kind in d.NOISE_KINDS:
        x = d.generate_noise(kind, 16000, rng)
        assert x.dtype == np.float32 and abs(np.max(np.abs(x)) - 1) < 1e-6
    s = d.silence_clips([d._to_int16(0.5 * d.generate_noise("pink", 40_000, rng))], 3, seed=1)
    assert s.shape == (3, 16000) and s.dtype == np.int16 and s.std() > 0
    with pytest.raises(d.DataError, match="no background noise"):
        d.silence_clips([], 1)


# ------------------------------------------------------------------ synthesis

@needs_espeak
def test_synthesize_small_set(tmp_path):
    speakers = d.synth_speakers(voices=("en-us", "en-gb", "en-gb-scotland"), variants=("m3",),
                                speeds=(160,), pitches=(50,))
    seen: list[tuple[int, int]] = []
    rep = d.synthesize(tmp_path, keywords=("yes", "stop"), speakers=speakers, unknown_per_speaker=1,
                       n_silence=2, background_seconds=2.0, progress=lambda a, b: seen.append((a, b)))
    # 3 speakers x (2 keywords + 1 unknown) + 2 silence + 6 background recordings
    assert (rep.total, rep.written, rep.skipped, rep.speakers) == (17, 17, 0, 3)
    assert seen[0] == (0, 17) and seen[-1] == (17, 17)
    cs = d.load(tmp_path)
    assert cs.counts()["yes"] == 3 and cs.counts()["stop"] == 3 and cs.counts()["_silence_"] == 2
    assert cs.counts()["_unknown_"] == 3
    yes = cs.audio[cs.labels == d.CLASSES.index("yes")]
    assert len(set(cs.speakers[cs.labels == 0])) == 3
    for clip in yes:   # a word, centred: loud middle, quiet ends
        env = np.abs(clip.astype(np.float64))
        assert env.max() > 5000
        assert env[7000:9000].max() > 10 * env[:1000].max()
    assert not np.array_equal(yes[0], yes[1])
    assert not list(tmp_path.rglob("*.tmp"))
    # Idempotent: a second run writes nothing and leaves every byte alone.
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.wav")}
    again = d.synthesize(tmp_path, keywords=("yes", "stop"), speakers=speakers, unknown_per_speaker=1,
                         n_silence=2, background_seconds=2.0)
    assert (again.written, again.skipped) == (0, 17)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.wav")} == before
    # Deterministic: a deleted file comes back identical.
    victim = next(iter(before))
    victim.unlink()
    d.synthesize(tmp_path, keywords=("yes", "stop"), speakers=speakers, unknown_per_speaker=1,
                 n_silence=2, background_seconds=2.0)
    assert victim.read_bytes() == before[victim]
    assert len(d.load_background(tmp_path)) == len(d.NOISE_KINDS)


def test_missing_espeak_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))   # no espeak-ng anywhere
    with pytest.raises(d.DataError) as e:
        d.synthesize(tmp_path / "out", keywords=("yes",), speakers=d.synth_speakers(("en-us",), ("m1",), (150,), (50,)))
    msg = str(e.value)
    assert "espeak-ng" in msg and "apt-get install espeak-ng sox" in msg and "\n" not in msg


@needs_espeak
def test_unknown_voice_is_one_line(tmp_path):
    bad = [d.SynthSpeaker("xx-nonexistent", "", 150, 50)]
    with pytest.raises(d.DataError) as e:
        d.synthesize(tmp_path, keywords=("yes",), speakers=bad, unknown_per_speaker=0, n_silence=0,
                     background_seconds=0)
    assert "xx-nonexistent" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.rglob("*.wav"))
