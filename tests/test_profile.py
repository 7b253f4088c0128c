"""The profile: schema, YAML IO, one-line errors, atomic writes, and a fuzzed loader."""
from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inventory.probe import probe
from inventory.profile import SCHEMA, Profile, ProfileError, dumps, load, loads, parse, save
from tests.conftest import assert_one_line_error, run_cli

VALID = {
    "schema": SCHEMA, "name": "t",
    "cpu": {"model": "X", "architecture": "x86_64", "physical_cores": 4, "threads": 8, "simd": ["AVX2"],
            "matmul_gflops": {"fp32": {"value": 100.0, "unit": "GFLOP/s", "source": "measured"}}},
    "memory": {"total_bytes": 8 << 30, "available_bytes": 6 << 30},
    "gpus": [{"vendor": "nvidia", "model": "RTX", "backend": "cuda", "memory_bytes": 16 << 30}],
    "boards": [{"port": "/dev/ttyACM0", "vid_pid": "2341:805A", "match": "board",
                "board": {"name": "Nano", "mcu": "nRF52840", "core": "Cortex-M4F", "clock_mhz": 64,
                          "flash_bytes": 1 << 20, "sram_bytes": 256 << 10, "fpu": True, "dsp": True}}],
    "peers": [{"address": "10.0.0.2", "port": 8477, "found_by": "manual"}],
}


@pytest.fixture(scope="module")
def probed() -> Profile:
    return probe(bench=False, discover=False)


def test_probed_profile_round_trips(tmp_path, probed):
    path = save(probed, tmp_path / "p.yaml")
    again = load(path)
    assert again == probed
    assert again.cpu is not None and again.cpu.threads >= 1
    assert again.memory is not None and again.memory.total_bytes > 0
    # Every figure says where it came from.
    assert again.cpu.peak_fp32_gflops is None or again.cpu.peak_fp32_gflops.source == "datasheet"


def test_valid_document_loads():
    p = parse(copy.deepcopy(VALID))
    assert p.boards[0].board.sram_bytes == 256 << 10
    assert p.cpu.matmul_gflops["fp32"].source == "measured"


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["cpu"].update(threads="many"), "cpu.threads"),
    (lambda d: d["cpu"].update(thread=8), "cpu.thread: unknown field"),
    (lambda d: d["cpu"].pop("model"), "cpu.model: required field is missing"),
    (lambda d: d["cpu"]["matmul_gflops"]["fp32"].update(source="guess"), "cpu.matmul_gflops.fp32.source"),
    (lambda d: d["boards"][0].update(vid_pid="2341-805a"), "boards[0].vid_pid"),
    (lambda d: d["peers"][0].update(port=70000), "peers[0].port"),
    (lambda d: d.update(schema="tierkit/profile/v0"), "schema: expected 'tierkit/profile/v1'"),
    (lambda d: d.pop("schema"), "schema: expected"),
])
def test_bad_field_is_named_in_one_line(mutate, needle):
    d = copy.deepcopy(VALID)
    mutate(d)
    with pytest.raises(ProfileError) as exc:
        parse(d, "p.yaml")
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and msg.startswith("p.yaml: ")


@pytest.mark.parametrize("text, needle", [
    ("", "got empty"), ("- a\n- b\n", "got a list"), ("cpu: [unclosed", "not valid YAML at line 1"),
    ("a: b\n\tc: d", "not valid YAML"), ("!!python/object:os.system {}", "not valid YAML"),
])
def test_bad_yaml_is_one_line(text, needle):
    with pytest.raises(ProfileError) as exc:
        loads(text, "p.yaml")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_missing_dir_and_binary_files(tmp_path):
    for path, needle in [(tmp_path / "nope.yaml", "no such profile; run `tierkit probe`"),
                         (tmp_path, "is a directory")]:
        with pytest.raises(ProfileError, match=needle.replace("`", ".").replace("(", ".")):
            load(path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ProfileError, match="not a text file"):
        load(tmp_path / "bin.yaml")


def test_save_is_atomic(tmp_path, probed):
    """A failed write leaves the old profile intact and no temporary file behind."""
    target = save(probed, tmp_path / "p.yaml")
    before = target.read_text()

    class Boom:
        def to_dict(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        save(Boom(), target)  # type: ignore[arg-type]
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


def test_cli_validate_schema_and_show(home, tmp_path, probed):
    good = save(probed, tmp_path / "good.yaml")
    ok = run_cli("profile", "validate", str(good), home=home)
    assert ok.returncode == 0 and "valid tierkit/profile/v1" in ok.stdout
    bad = tmp_path / "bad.yaml"
    d = probed.to_dict()
    d["memory"]["total_bytes"] = "eight gigs"
    bad.write_text(yaml.safe_dump(d))
    assert_one_line_error(run_cli("profile", "validate", str(bad), home=home), "memory.total_bytes")
    assert_one_line_error(run_cli("profile", "validate", str(tmp_path / "none.yaml"), home=home),
                          "no such profile")
    schema = json.loads(run_cli("profile", "schema", home=home).stdout)
    assert "cpu" in schema["properties"] and "Figure" in schema["$defs"]
    shown = run_cli("profile", "show", str(good), home=home)
    assert load(good) == loads(shown.stdout)
    # No probed profile yet: `profile show` says what to run.
    assert_one_line_error(run_cli("profile", "show", home=home), "run `tierkit probe`")


# ---------------------------------------------------------------- fuzzing

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=8).map(lambda b: b.decode("latin-1")))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                      max_leaves=12)


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


ALL_PATHS = list(_paths(VALID))


def _check(text: str) -> None:
    try:
        p = loads(text, "fuzz.yaml")
    except ProfileError as exc:
        msg = str(exc)
        assert msg.startswith("fuzz.yaml: ") and "\n" not in msg and "Traceback" not in msg
    else:
        assert isinstance(p, Profile)
        assert isinstance(loads(dumps(p)), Profile)  # what loads, saves and loads again


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(ALL_PATHS), new=values, delete=st.booleans())
def test_fuzz_mutated_profiles(path, new, delete):
    d = copy.deepcopy(VALID)
    parent = d
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    _check(yaml.safe_dump(d, allow_unicode=True))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_random_text(text):
    _check(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_mangled_bytes(junk):
    # Splice random bytes into a valid document: truncated files, stray characters.
    base = yaml.safe_dump(VALID)
    cut = len(junk) % len(base)
    _check(base[:cut] + junk.decode("utf-8", errors="replace") + base[cut:])
