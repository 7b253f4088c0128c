"""The planner and `tierkit fit`: the seeds' data points (REFERENCE.md), every kit x every
track, calibration, a broken catalog, and the command's speed and imports."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from inventory import kits
from inventory.profile import Calibration, ProfileError, save
from inventory.units import fmt_bytes
from models import costs
from tests.conftest import REPO, assert_one_line_error, run_cli
from tiers import catalog, data
from tiers import fit as F

LAPTOP, RTX, ARDUINO, LAN = "laptop-8gb-cpu", "rtx4090-laptop-16gb", "arduino-nano-33-ble-sense", "two-node-lan"


def ref(name: str):
    return kits.reference_profile(name).model_copy(deep=True)


def plan(name: str, milestone: str, **kw):
    return F.fit(ref(name), milestone, check_packages=False, **kw)


# ---------------------------------------------------------------- the seeds' data points

def test_rtx4090_pretrains_about_100m():
    p = plan(RTX, "B12")
    assert p.verdict in ("fits", "tight") and p.tier == 2 and p.device == "cuda:0"
    assert 50e6 <= p.config["params"] <= 200e6, p.config
    assert p.prediction.peak_bytes < 16e9 and p.prediction.seconds <= 12 * 3600


def test_cpu_laptop_pretrains_10m_at_most_and_much_slower():
    p = plan(LAPTOP, "B12")
    assert p.verdict in ("fits", "tight") and p.tier == 1 and p.device == "cpu"
    assert p.config["params"] <= 11e6, p.config
    same = plan(RTX, "B12", size=p.size)          # the laptop's config, on the 4090
    ratio = p.prediction.seconds / same.prediction.seconds
    assert 10 <= ratio <= 50, ratio


def test_b6_needs_a_board():
    p = plan(LAPTOP, "B6")
    assert p.verdict == "no" and p.size is None
    why = " ".join(p.reasons)
    assert "microcontroller board" in why and "tierkit probe" in why and f"--profile {ARDUINO}" in why


def test_b6_fits_a_ds_cnn_on_the_arduino():
    p = plan(ARDUINO, "B6")
    assert p.verdict in ("fits", "tight") and p.tier == 0 and p.device == "board:/dev/ttyACM0"
    assert p.size.startswith("ds-cnn")
    assert p.config["sram_bytes"] <= 0.9 * 256 * 1024 and p.config["flash_bytes"] <= 0.9 * 1024 * 1024
    assert p.config["latency_ms"] <= 500


def test_b17_needs_two_nodes():
    p = plan(LAPTOP, "B17")
    assert p.verdict == "no"
    why = " ".join(p.reasons)
    assert "needs 2 nodes" in why and "this profile has 1" in why and "tierkit agent" in why
    assert f"--profile {LAN}" in why


def test_b17_plans_across_both_nodes():
    p = plan(LAN, "B17")
    assert p.verdict in ("fits", "tight") and p.tier == 3 and p.device == "cluster:2"
    assert len(p.config["split"]) == 2 and sum(p.config["split"].values()) == pytest.approx(1, abs=0.01)
    # the model is bigger than either node could hold alone (with headroom)
    model = p.prediction.peak_bytes
    assert sum(p.config["node_bytes"]) > 0.9 * kits.reference_profile(LAN).memory.available_bytes
    assert model <= 0.9 * kits.reference_profile(LAN).memory.available_bytes


def test_seeds_on_apple_and_llama():
    """16 GB runs a 7-8B model at 4-bit; 10M trains in hours and 1M in minutes on an M-series Mac."""
    assert plan("apple-m2-16gb", "B16").size == "llama-3.1-8b-Q4_K_M"
    ten = plan("apple-m2-16gb", "B12", size="10.7M").prediction.seconds
    one = plan("apple-m2-16gb", "B12", size="0.8M").prediction.seconds
    assert 3600 <= ten <= 10 * 3600 and one <= 30 * 60


def test_b5_runs_on_the_gpu_when_there_is_one():
    p = plan(RTX, "B5")
    assert p.device == "cuda:0" and p.size == "n4096"
    assert {"n_min", "n_max", "dtype", "min_seconds"} <= set(p.config) and p.config["workload"] == "matmul"
    assert plan(LAPTOP, "B5").device == "cpu"
    assert plan("apple-m2-16gb", "B5").device == "cpu"   # the roofline's GPU sweep is CUDA only


# ---------------------------------------------------------------- every kit, every track

@pytest.mark.parametrize("track", catalog.tracks())
@pytest.mark.parametrize("name", kits.reference_names())
def test_every_kit_every_track(name, track):
    plans = F.fit_all(ref(name), track, check_packages=False)
    assert [p.milestone for p in plans] == [m.id for m in catalog.track(track)]
    for p in plans:
        assert p.verdict in ("fits", "tight", "no") and p.profile == name
        if p.verdict == "no":
            assert p.reasons and all(r.strip() for r in p.reasons), p
        else:
            assert p.size and p.prediction and p.prediction.seconds > 0 and p.prediction.peak_bytes > 0
            assert p.prediction.basis and p.config["workload"]
        json.dumps(p.to_dict(), default=str)


def test_every_cost_model_has_a_pricer():
    assert set(F.PRICERS) == set(catalog.COST_MODELS)


@pytest.mark.parametrize("cost", sorted(catalog.COST_MODELS))
def test_each_pricer_prices_its_cost_models_rung(cost):
    """PRICERS and catalog.COST_MODELS agree both ways: each pricer takes the rung class its cost model names."""
    hints = typing.get_type_hints(F.PRICERS[cost])
    assert hints["r"] is catalog.COST_MODELS[cost] and hints["return"] is F.Priced


def test_the_build_track():
    ms = catalog.track("build")
    assert [m.id for m in ms] == [f"B{i}" for i in range(18)]
    b = {m.id: m for m in ms}
    assert b["B1"].time_box.budget_seconds == 3 * 3600
    assert b["B12"].time_box.budget_seconds == 12 * 3600 and b["B12"].time_box.hours == 3
    assert b["B6"].time_box.hours == (6, 8) and b["B17"].time_box.hours == (4, 6)
    assert b["B6"].needs.board and b["B17"].needs.nodes == 2 and b["B6"].tiers == (0,)
    sizes = [r.size for r in b["B12"].ladder]
    assert sizes[0] == "28K" and sizes[-1] == "354M"
    assert len(catalog.track("g2c")) == 20 and len(catalog.track("mentor100m")) == 5


# ---------------------------------------------------------------- options

def test_forced_size_and_tier():
    p = plan(LAPTOP, "B12", size="124M")
    assert p.verdict == "no" and p.size is None and "124M" in p.reasons[0]
    assert plan(RTX, "B12", tier=1).device == "cpu"
    with pytest.raises(F.FitError, match="sizes: 28K, 0.2M"):
        plan(LAPTOP, "B12", size="9M")
    with pytest.raises(F.FitError, match="not tier 0"):
        plan(LAPTOP, "B12", tier=0)
    with pytest.raises(F.FitError, match="no milestone"):
        plan(LAPTOP, "B99")


def _custom(packages: list[str]) -> catalog.Milestone:
    data = yaml.safe_load(catalog.DEFAULT_PATH.read_text())
    b5 = next(m for m in data["tracks"]["build"]["milestones"] if m["id"] == "B5")
    b5["needs"]["packages"] = packages
    return catalog.parse(data).get("B5")


def test_missing_packages_only_count_on_the_live_profile():
    m = _custom(["numpy", "surely_no_such_package_xyz"])
    live = F.fit(ref(LAPTOP), m, check_packages=True)
    # the hardware fits: it fits, with the one install command in its notes
    assert live.verdict == "fits" and "surely_no_such_package_xyz" in live.reasons[0]
    assert "pip install" in live.reasons[0] and live.size == "n4096"  # sized all the same
    assert "make setup-dev" in live.reasons[0]
    assert F.fit(ref(LAPTOP), m, check_packages=False).verdict == "fits"


def test_a_gpu_without_its_packages_falls_back_to_the_cpu():
    data = yaml.safe_load(catalog.DEFAULT_PATH.read_text())
    b5 = next(m for m in data["tracks"]["build"]["milestones"] if m["id"] == "B5")
    b5["needs"]["gpu_packages"] = ["surely_no_such_package_xyz"]
    m = catalog.parse(data).get("B5")
    p = F.fit(ref(RTX), m, check_packages=True)
    assert p.device == "cpu" and p.verdict == "fits"
    assert F.fit(ref(RTX), m, check_packages=False).device == "cuda:0"


# ---------------------------------------------------------------- calibration

def _record(p, workload, device, pred_s, act_s, pred_b=None, act_b=None, minutes=0):
    p.calibration.append(Calibration(workload=workload, milestone="B12", size="3M", device=device,
                                     predicted_seconds=pred_s, actual_seconds=act_s, predicted_peak_bytes=pred_b,
                                     actual_peak_bytes=act_b,
                                     when=dt.datetime(2025, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=minutes)))


def test_calibration_moves_predictions_the_right_way():
    base = plan(LAPTOP, "B12", size="3M").prediction
    slow = ref(LAPTOP)
    _record(slow, "gpt-train", "cpu", 100, 200, 1e9, 1.5e9)
    p = F.fit(slow, "B12", size="3M", check_packages=False).prediction
    assert p.seconds == pytest.approx(2 * base.seconds) and p.peak_bytes == pytest.approx(1.5 * base.peak_bytes)
    assert any("calibration" in line for line in p.basis)
    fast = ref(LAPTOP)
    _record(fast, "gpt-train", "cpu", 100, 50)
    assert F.fit(fast, "B12", size="3M", check_packages=False).prediction.seconds < base.seconds
    other = ref(LAPTOP)   # another workload, another device: no effect
    _record(other, "matmul", "cpu", 100, 300)
    _record(other, "gpt-train", "cuda:0", 100, 300)
    assert F.fit(other, "B12", size="3M", check_packages=False).prediction.seconds == pytest.approx(base.seconds)


def test_calibration_does_not_drift_back():
    """A record made with an already corrected prediction keeps the correction, not halves it."""
    p = ref(LAPTOP)
    _record(p, "gpt-train", "cpu", 100, 200, minutes=0)    # model said 100 s, it took 200: x2
    _record(p, "gpt-train", "cpu", 400, 400, minutes=1)    # next plan said 2 x 200 and was right
    ft, _, _ = F.calibration(p, "gpt-train", "cpu")
    assert ft == pytest.approx(2.0)


def test_calibration_is_clamped():
    p = ref(LAPTOP)
    _record(p, "gpt-train", "cpu", 1, 1000)
    assert F.calibration(p, "gpt-train", "cpu")[0] == F.CALIBRATION_CLAMP[1]


# ---------------------------------------------------------------- a broken catalog

def _broken(tmp_path: Path, edit) -> str:
    data = yaml.safe_load(catalog.DEFAULT_PATH.read_text())
    edit(data)
    f = tmp_path / "milestones.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(catalog.CatalogError) as e:
        catalog.load(f)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_malformed_catalog_gives_one_line(tmp_path):
    def typo(d):
        d["tracks"]["build"]["milestones"][12]["ladder"][2]["n_layers"] = 6
    msg = _broken(tmp_path, typo)
    assert "tracks.build.milestones[12].ladder[2].n_layers: unknown field" in msg and "B12" in msg

    def cost(d):
        d["tracks"]["build"]["milestones"][5]["cost"] = "magic"
    assert "unknown cost model 'magic'" in _broken(tmp_path, cost)

    def missing(d):
        del d["tracks"]["build"]["milestones"][1]["time_box"]
    assert "milestones[1].time_box: required field is missing" in _broken(tmp_path, missing)

    def heads(d):
        d["tracks"]["build"]["milestones"][12]["ladder"][0]["n_head"] = 5
    assert "not divisible" in _broken(tmp_path, heads)

    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: tierkit/milestones/v1\ntracks: {build: [\n")
    with pytest.raises(catalog.CatalogError, match=r"not valid YAML at line \d+") as e:
        catalog.load(bad)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- profiles by name

def test_resolve_profile():
    p, is_ref = kits.resolve_profile(LAPTOP)
    assert p.name == LAPTOP and is_ref
    p, is_ref = kits.resolve_profile(str(kits.PROFILES_DIR / f"{RTX}.yaml"))
    assert p.name == RTX and is_ref
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*laptop-8gb-cpu"):
        kits.resolve_profile("nope")


# ---------------------------------------------------------------- the command

def test_cli_fit_profile(home):
    proc = run_cli("fit", "--profile", LAPTOP, home=home)
    assert proc.returncode == 0, proc.stderr
    assert "B12 Pretraining" in proc.stdout and "B17" in proc.stdout and "needs 2 nodes" in proc.stdout
    assert "✓" in proc.stdout and "✗" in proc.stdout


def test_cli_fit_probed_profile_by_default(home):
    save(ref(RTX), home / "profile.yaml")
    proc = run_cli("fit", "--milestone", "B12", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "124M" in proc.stdout and "cuda:0" in proc.stdout


def test_cli_fit_without_a_profile(home):
    proc = run_cli("fit", home=home)
    assert_one_line_error(proc, "tierkit probe", "--profile", LAPTOP)


def test_cli_unknown_profile(home):
    assert_one_line_error(run_cli("fit", "--profile", "nope", home=home), "unknown profile 'nope'", LAPTOP)
    assert_one_line_error(run_cli("fit", "--profile", "x.yaml", home=home), "x.yaml")
    assert_one_line_error(run_cli("fit", "--profile", LAPTOP, "--track", "nope", home=home), "no track 'nope'")
    assert_one_line_error(run_cli("fit", "--profile", LAPTOP, "--milestone", "B99", home=home), "no milestone")


def test_cli_all_profiles(home):
    proc = run_cli("fit", "--all-profiles", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "B17" in proc.stdout and "qwen2.5" in proc.stdout and "124M" in proc.stdout
    proc = run_cli("fit", "--all-profiles", "--json", "--track", "g2c", home=home)
    doc = json.loads(proc.stdout)
    assert set(doc["profiles"]) == set(kits.reference_names()) and doc["track"] == "g2c"
    assert all(len(ps) == 20 for ps in doc["profiles"].values())


def test_cli_json_and_explain(home):
    proc = run_cli("fit", "--profile", RTX, "--json", home=home)
    doc = json.loads(proc.stdout)
    b12 = next(p for p in doc["plans"] if p["milestone"] == "B12")
    assert b12["verdict"] in ("fits", "tight") and b12["prediction"]["basis"] and doc["profile"] == RTX
    proc = run_cli("fit", "--profile", RTX, "--milestone", "B12", "--explain", home=home)
    assert proc.returncode == 0, proc.stderr
    for needle in ("params = V*h", "16 B/param", "Korthikanti", "6*N_matmul", "TFLOP/s", "datasheet figure"):
        assert needle in proc.stdout, needle


def test_cli_fit_is_fast_and_light(home):
    """No framework on the fit path, and well under a second from a cold start (bench-free guard)."""
    env = {"TIERKIT_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tiers.cli", "fit", "--profile", LAPTOP],
                          capture_output=True, text=True, env={**os.environ, **env}, cwd=home, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {m.group(1).strip().split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|(.+)$",
                                                                        proc.stderr, re.MULTILINE)}
    assert "tiers" in imported and not imported & {"torch", "tensorflow", "matplotlib"}
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        done = run_cli("fit", "--profile", LAPTOP, home=home)
        best = min(best, time.perf_counter() - t)
        assert done.returncode == 0
    assert best < 2.0, best  # ~0.4 s on an idle 2-core machine: a guard against heavy imports, not a benchmark


# ---------------------------------------------------------------- pretrained models, LoRA, DPO's reference

@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_hf_shapes_and_lora_count_like_transformers_and_peft(arch):
    """The cost model's parameter count of a Llama / Qwen2 / GPT-2 shape, and of LoRA on every block
    linear, against the real classes: transformers builds the model, peft adds the adapters."""
    pytest.importorskip("peft", reason="tier 2 installs peft")
    from peft import LoraConfig, get_peft_model

    from models.costs import GPTShape, gpt_params, lora_params
    from tests.hf_fixtures import tiny_model

    model = tiny_model(arch, vocab_size=96, n_embd=32, n_layer=2, n_head=4, ctx=64)
    cfg = model.config
    if arch == "gpt2":
        shape = GPTShape(96, 64, 2, 4, 32)
        targets = ["c_attn", "c_proj", "c_fc"]
    else:
        shape = GPTShape(96, 64, 2, 4, 32, bias=arch == "qwen2", tied=bool(cfg.tie_word_embeddings), arch="llama",
                         n_kv_head=cfg.num_key_value_heads, ffn_hidden=cfg.intermediate_size)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert gpt_params(shape) == model.num_parameters()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=targets, fan_in_fan_out=arch == "gpt2"))
    assert lora_params(shape, 4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_real_model_shapes_count_as_published():
    """SmolLM2-135M, Qwen2.5-0.5B and TinyLlama-1.1B as their config.json give them."""
    b13 = {r.size: r for r in catalog.get("B13").ladder}
    counts = {s: costs.gpt_params(b13[s].shape()) for s in ("smollm2-135m", "smollm2-360m", "qwen2.5-0.5b",
                                                           "tinyllama-1.1b")}
    assert counts == {"smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "qwen2.5-0.5b": 494_032_768,
                      "tinyllama-1.1b": 1_100_048_384}


def test_lora_trains_only_adapters_and_dpo_with_lora_needs_no_second_copy():
    s = catalog.get("B13").rung("qwen2.5-0.5b").shape()
    full = costs.gpt_train(s, 4, 1e6, "bf16")
    lora = costs.gpt_train(s, 4, 1e6, "bf16", lora_rank=16)
    n, na = full.params, costs.lora_params(s, 16)
    assert lora.memory["frozen base"] == 2 * n and lora.memory["adapters+grads+Adam"] == 16 * na
    assert "weights+grads+Adam" not in lora.memory and full.memory["weights+grads+Adam"] == 16 * n
    assert lora.memory["activations"] == full.memory["activations"]        # the gradient still flows back
    assert lora.flops < full.flops * 0.7 and lora.extra["trainable"] == na < n / 50
    # B14: with LoRA the adapter-disabled model is the reference; without, a frozen copy in the run's dtype
    rtx = ref(RTX)
    by_lora = {}
    for rank in (0, 16):
        m = _with_rung("B14", "qwen2.5-0.5b", lora_rank=rank, batch_size=1)   # on the GPU either way
        p = F.fit(rtx, m, size="qwen2.5-0.5b", check_packages=False)
        by_lora[rank] = p
        basis = " ".join(p.prediction.basis)
        assert ("adapters disabled, no copy" in basis) == bool(rank) and ("a frozen copy (bf16)" in basis) != bool(rank)
    # full: 16 B/param + the copy's 2 B; LoRA: the base's 2 B + 16 B per adapter parameter
    assert by_lora[0].prediction.peak_bytes - by_lora[16].prediction.peak_bytes == pytest.approx(16 * (n - na))


def _with_rung(milestone: str, size: str, **changes) -> catalog.Milestone:
    data = yaml.safe_load(catalog.DEFAULT_PATH.read_text())
    m = next(x for x in data["tracks"]["build"]["milestones"] if x["id"] == milestone)
    next(r for r in m["ladder"] if r["size"] == size).update(changes)
    return catalog.parse(data).get(milestone)


def test_gguf_rungs_are_priced_from_their_registry_names():
    rung = catalog.get("B16").rung("llama-3.1-8b-Q4_K_M")
    assert (rung.model, rung.family, rung.quant) == ("llama-3.1-8b-instruct-q4_k_m", "llama-3.1-8b", "Q4_K_M")
    p = plan("apple-m2-16gb", "B16")
    assert p.config["model"] == "llama-3.1-8b-instruct-q4_k_m" and p.config["quant"] == "Q4_K_M"
    assert [a.name for a in p.artifacts] == ["llama-3.1-8b-instruct-q4_k_m"]
    size = data.get("llama-3.1-8b-instruct-q4_k_m").size     # the weights are the file the registry fetches
    assert any(line.endswith(f"(its file) = {fmt_bytes(size)}") for line in p.prediction.basis), p.prediction.basis
    with pytest.raises(catalog.CatalogError, match="'llama-9b-q4_k_m'"):
        _with_rung("B16", "llama-3.1-8b-Q4_K_M", model="llama-9b-q4_k_m")


# ---------------------------------------------------------------- run --force, and --set re-pricing

def test_set_reprices_the_rung_it_is_judged_by():
    p = F.fit(ref(LAPTOP), "B12", size="10.7M", check_packages=False)
    assert p.verdict == "no" and "over the 12 h box" in p.reasons[0]
    fast = F.fit(ref(LAPTOP), "B12", size="10.7M", check_packages=False, overrides={"steps": 2, "eval_iters": 1})
    assert fast.verdict in ("fits", "tight") and fast.config["steps"] == 2 and fast.config["eval_iters"] == 1
    assert fast.prediction.seconds < p.prediction.seconds / 100
    forced = F.fit(ref(LAPTOP), "B12", size="10.7M", check_packages=False, waive=frozenset({"time"}))
    assert forced.verdict == "tight" and any("forced" in r for r in forced.reasons)
    with pytest.raises(F.FitError, match="--set steps='x'"):
        F.fit(ref(LAPTOP), "B12", size="10.7M", overrides={"steps": "x"})


def _slow_kit(tmp_path: Path, factor: float, memory: int | None = None) -> str:
    """The laptop kit with its CPU `factor` times as fast (and `memory` bytes of RAM): B12 28K refused for
    time there, while the run itself is as quick as this machine makes it."""
    p = ref(LAPTOP)
    for fig in (p.cpu.matmul_gflops["fp32"], p.cpu.matmul_gflops["fp64"], p.cpu.peak_fp32_gflops,
                p.cpu.peak_fp64_gflops, p.cpu.memory_bandwidth_gbs):
        fig.value *= factor
    if memory:
        p.memory.total_bytes = p.memory.available_bytes = memory
    path = tmp_path / f"slow-{factor:g}-{memory}.yaml"
    save(p, path)
    return str(path)


# B12 at its smoke size, a few steps, a tiny evaluation: seconds of real training
QUICK = ("B12", "--size", "28K", "--set", "eval_iters=1", "--set", "eval_interval=0", "--set", "sample_tokens=8")
DATA = {"TIERKIT_DATA": str(REPO.parent / "shared" / "data"), "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").exists(),
                    reason="needs the shared data folder's tinyshakespeare.txt (offline B12 data)")
def test_run_force_past_time_never_past_memory(home, tmp_path):
    slow = _slow_kit(tmp_path, 1e-8)   # even 4 steps are days there
    args = ("run", *QUICK, "--set", "steps=4", "--profile", slow, "--out", str(tmp_path / "b"))
    refused = run_cli(*args, home=home, env=DATA)
    assert refused.returncode == 2 and "over the 12 h box" in refused.stderr and "--force runs it" in refused.stderr
    forced = run_cli(*args, "--force", home=home, env=DATA, timeout=400)
    assert forced.returncode == 0, forced.stderr
    assert "forced: B12 size 28K" in forced.stderr and "predicted" in forced.stderr
    assert (tmp_path / "b" / "B12-pretraining" / "README.md").exists()
    # refused for memory: --force alone does not run it, and says which flag would
    tiny = _slow_kit(tmp_path, 1.0, memory=64 * 2**20)
    margs = ("run", *QUICK, "--set", "steps=4", "--profile", tiny, "--out", str(tmp_path / "m"))
    for extra in ((), ("--force",)):
        p = run_cli(*margs, *extra, home=home, env=DATA)
        assert p.returncode == 2 and "memory" in p.stderr and "--force-memory" in p.stderr, p.stderr
        assert not (tmp_path / "m").exists()
    assert run_cli(*margs, "--force-memory", home=home, env=DATA).returncode == 2  # it goes with --force


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").exists(),
                    reason="needs the shared data folder's tinyshakespeare.txt (offline B12 data)")
def test_run_set_steps_brings_a_rung_within_reach(home, tmp_path):
    slow = _slow_kit(tmp_path, 3e-6)   # 28K's 200 steps: over the 12 h box; 2 steps: well within it
    args = ("run", *QUICK, "--profile", slow, "--out", str(tmp_path / "b"))
    refused = run_cli(*args, home=home, env=DATA)
    assert refused.returncode == 2 and "over the 12 h box" in refused.stderr
    ran = run_cli(*args, "--set", "steps=2", home=home, env=DATA, timeout=400)
    assert ran.returncode == 0, ran.stderr
    assert "forced" not in ran.stderr
