"""The checklist and ScratchToProd tracks: they load, answer for every reference kit, price sanely, and an entry
that is a build milestone plans exactly as that milestone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from inventory import kits
from models import costs, costs_gen, costs_xfmr
from tests.conftest import run_cli
from tiers import catalog
from tiers import fit as F

NEW_TRACKS = ("checklist", "scratchtoprod")
NEW_COSTS = ("gen-train", "encoder-train", "whisper-infer", "moe-train", "spec-decode", "rl-train", "classic-ml")
LAPTOP = "laptop-8gb-cpu"


def _kit(name: str):
    return kits.reference_profile(name).model_copy(deep=True)


@pytest.mark.parametrize("track", NEW_TRACKS)
def test_track_loads_validated(track):
    t = catalog.load().track(track)
    assert len(t.milestones) >= 17
    for m in t.milestones:
        assert m.ladder and m.cost in catalog.COST_MODELS
        # the table says which entries run and which are planned only
        assert ("(runs as " in m.title) == (m.runs_as is not None)
        assert m.runs_as is not None or "(fit only)" in m.title
        if m.runs_as:
            b = catalog.get(m.runs_as)
            assert (m.ladder, m.cost, m.module, m.tiers) == (b.ladder, b.cost, b.module, b.tiers)
        else:
            assert m.module is None


def test_every_new_cost_model_is_used():
    used = {m.cost for tr in NEW_TRACKS for m in catalog.load().track(tr).milestones}
    assert set(NEW_COSTS) <= used


@pytest.mark.parametrize("track", NEW_TRACKS)
def test_fit_all_profiles_answers_for_every_kit(track, tmp_path):
    proc = run_cli("fit", "--track", track, "--all-profiles", "--json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["track"] == track
    assert set(doc["profiles"]) == set(kits.reference_names())
    n = len(catalog.load().track(track).milestones)
    for kit, plans in doc["profiles"].items():
        assert len(plans) == n, kit
        for p in plans:
            assert p["verdict"] in ("fits", "tight", "no"), (kit, p)
            assert p["prediction"] is None or p["prediction"]["seconds"] > 0, (kit, p)
    # a laptop runs every entry at some size
    assert all(p["size"] for p in doc["profiles"][LAPTOP])


@pytest.mark.parametrize("track", NEW_TRACKS)
def test_runs_as_plans_as_the_build_milestone(track):
    for kit in (LAPTOP, "rtx4090-laptop-16gb", "raspberry-pi-5-8gb"):
        prof = _kit(kit)
        for m in catalog.load().track(track).milestones:
            if not m.runs_as:
                continue
            mine = F.fit(prof, m, check_packages=False, suggest=False)
            build = F.fit(prof, catalog.get(m.runs_as), check_packages=False, suggest=False)
            assert (mine.size, mine.device, mine.verdict) == (build.size, build.device, build.verdict), (kit, m.id)
            if build.prediction:
                assert mine.prediction.peak_bytes == build.prediction.peak_bytes
                assert mine.prediction.seconds == pytest.approx(build.prediction.seconds)


def _broken(tmp_path: Path, entry: dict) -> str:
    data = yaml.safe_load(catalog.DEFAULT_PATH.read_text())
    data["tracks"]["checklist"]["milestones"].append(entry)
    f = tmp_path / "milestones.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(catalog.CatalogError) as e:
        catalog.load(f)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_runs_as_is_one_line(tmp_path):
    base = {"id": "C90", "slug": "x", "title": "x", "phase": "x", "time_box": {"hours": 1}}
    assert "runs_as B99 is not a build milestone" in _broken(tmp_path, {**base, "runs_as": "B99"})
    assert "takes its tiers, ladder and module from B12" in _broken(
        tmp_path, {**base, "runs_as": "B12", "ladder": [{"size": "x"}]})
    assert "is priced by gpt-train, not dpo" in _broken(tmp_path, {**base, "runs_as": "B12", "cost": "dpo"})
    assert "tiers, cost and ladder are required" in _broken(tmp_path, {**base, "tiers": [1]})
    bad_moe = {**base, "tiers": [1], "cost": "moe-train", "ladder": [
        {"size": "x", "vocab_size": 65, "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 8, "batch_size": 1,
         "steps": 1, "experts": 2, "top_k": 3}]}
    assert "top_k 3 is more than the 2 experts" in _broken(tmp_path, bad_moe)


# ---------------------------------------------------------------- each new cost model against a hand count

def test_vae_matches_pytorch_examples_vae():
    # pytorch/examples' MNIST VAE: 784-400-(20, 20), 20-400-784 = 652,824 parameters
    c = costs_gen.vae(784, [400], 20, 60000, 10, 128)
    assert c.params == 652_824
    assert c.memory["weights+grads+Adam"] == 16 * 652_824
    assert c.memory["activations"] == 2 * 128 * (784 + 400 + 40 + 20 + 400 + 784) * 4
    assert c.flops == 6 * 652_824 * 60000 * 10


def test_gan_counts_both_networks():
    c = costs_gen.gan(784, [256], 100, 60000, 1, 64)
    g = 100 * 256 + 256 + 256 * 784 + 784
    d = 784 * 256 + 256 + 256 + 1
    assert c.params == g + d
    assert c.flops == (12 * d + 2 * g + 6 * (g + d)) * 60000


def test_ddpm_unet_is_a_small_unet():
    s = costs_gen.UNetShape(28, 1, 32, 2, 2)
    n, macs, _ = costs_gen.unet_counts(s)
    # by hand: level c: 9c^2 x (2*2 + 2*3 convs) + 9c^2 x 2 (the up path's wider inputs) + 4c x 10 biases/norms
    hand = sum(108 * c * c + 40 * c for c in (32, 64)) + 2 * 9 * 32
    assert n == hand and 0.3e6 < n < 3e6
    assert macs == 108 * 32 * 32 * 28 * 28 + 108 * 64 * 64 * 14 * 14 + 2 * 9 * 32 * 28 * 28
    c = costs_gen.ddpm(s, 60000, 10, 128, 1000, 64)
    assert 16 * n == c.memory["weights+grads+Adam"]
    assert 50e6 < c.memory["activations"] < 2e9     # 3 values x ~0.3M outputs a conv-image x 128 images, fp32


def test_bert_mini_and_vit_param_counts():
    bert = costs_xfmr.encoder_train([costs_xfmr.text_tower(30522, 128, 4, 256, 4, True)], 1000, 1, 32)
    # BERT-mini (L4 H256) is published at 11.3M parameters (512 positions and a pooler included)
    assert bert.params == pytest.approx(11.3e6, rel=0.05)
    vit = costs_xfmr.vit_tower(32, 4, 3, 6, 256, 8, 10)
    h = 256
    assert vit.seq == 65
    assert vit.params == 6 * (12 * h * h + 13 * h) + 3 * 16 * h + h + 65 * h + h * 10 + 10 + 2 * h
    clip = costs_xfmr.encoder_train([vit, costs_xfmr.text_tower(8192, 32, 6, 256, 8, False)], 1000, 1, 256, 256)
    assert clip.params == vit.params + (6 * (12 * h * h + 13 * h) + 8192 * h + 32 * h + 2 * h) + 256 * 2 * h


def test_whisper_tiny_is_39m_params():
    enc, dec = costs_xfmr.whisper_params(costs_xfmr.WhisperShape())
    assert enc + dec == pytest.approx(39e6, rel=0.08)     # Whisper tiny: 39M (Radford et al. 2022)
    c = costs_xfmr.whisper_infer(costs_xfmr.WhisperShape(), "fp32", 1, 100)
    assert c.memory["weights"] == 4 * (enc + dec)
    assert c.memory["K/V"] == 2 * 4 * 1500 * 384 * 4 + 2 * 4 * 448 * 384 * 4


def test_moe_holds_every_expert():
    s = costs.GPTShape(65, 256, 6, 6, 384, False)
    dense = costs.gpt_train(s, 32, 1e6, "fp32")
    moe = costs_xfmr.moe_train(s, 8, 2, 32, 1e6, "fp32", True)
    h = 384
    extra = 6 * (7 * (8 * h * h + 5 * h) + 8 * h)
    assert moe.params == dense.params + extra
    assert moe.memory["experts+grads+AdamW"] == 16 * extra
    assert moe.flops == dense.flops + 6 * 6 * 8 * h * h * 1e6


def test_speculative_decoding_memory_and_rounds():
    t, d = costs.GPTShape(50257, 1024, 24, 16, 1024), costs.GPTShape(50257, 1024, 12, 12, 768)
    c = costs_xfmr.speculative(t, d, "fp32", 1024, 256, 0, 4, 0.7)
    assert c.memory["target weights"] == 4 * costs.gpt_params(t)
    assert c.memory["draft KV"] == 2 * 12 * 12 * 64 * 1024 * 4
    assert c.extra["per_round"] == pytest.approx((1 - 0.7 ** 5) / 0.3)
    assert costs_xfmr.accepted_per_round(1.0, 4) == 5


def test_rl_and_classic_ml_memory():
    c = costs_gen.rl_agent("dqn", [4, 128, 128, 2], 50000, 64, 50000, 4)
    n = 4 * 128 + 128 + 128 * 128 + 128 + 128 * 2 + 2
    assert c.params == n and c.memory == {"networks": 2 * 16 * n, "buffer": 50000 * 11 * 4}
    svm = costs_gen.classic_ml("svm", 10000, 784, 1, 10)
    assert svm.memory == {"data": 10000 * 784 * 8, "kernel cache": costs_gen.SVM_CACHE_BYTES}


@pytest.mark.parametrize("cost", NEW_COSTS)
def test_new_cost_models_price_on_a_laptop(cost):
    """Every rung of every new cost model prices to a positive time and a peak between the runtime and 64 GB."""
    prof = _kit(LAPTOP)
    ms = [m for tr in NEW_TRACKS for m in catalog.load().track(tr).milestones if m.cost == cost]
    for m in ms:
        for r in m.ladder:
            plan = F.fit(prof, m, check_packages=False, size=r.size, suggest=False)
            assert plan.prediction is not None, (m.id, r.size)
            assert 50e6 < plan.prediction.peak_bytes < 64e9, (m.id, r.size)
            assert plan.prediction.seconds > 0
