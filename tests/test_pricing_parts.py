"""What the planner prices besides the workload's arithmetic: the process (torch, matplotlib), the
images a CNN holds, every run a milestone makes (B4's three optimisers, B12's loss estimates, the
stand-in a small rung trains first), and the runner's clock that includes the milestone's imports."""
from __future__ import annotations

import time

from inventory import kits
from models import costs
from tiers import fit as F
from tiers import runner

LAPTOP, RTX = "laptop-8gb-cpu", "rtx4090-laptop-16gb"


def plan(kit: str, milestone: str, **kw):
    return F.fit(kits.reference_profile(kit).model_copy(deep=True), milestone, check_packages=False, **kw)


def basis(p) -> str:
    return "\n".join(p.prediction.basis)


def test_a_plotting_torch_milestone_prices_matplotlib_in_host_memory_only():
    cpu = plan(LAPTOP, "B11", size="0.2M")
    assert f"matplotlib {costs.fmt_bytes(costs.MATPLOTLIB_BYTES)}" in basis(cpu)
    assert cpu.prediction.peak_bytes > costs.TORCH_BYTES + costs.MATPLOTLIB_BYTES
    gpu = plan(RTX, "B11", size="0.2M")
    assert gpu.device.startswith("cuda") and "matplotlib" not in basis(gpu)   # the pool is the GPU's


def test_images_are_priced_as_float32_with_the_test_split():
    b9 = basis(plan(LAPTOP, "B9", size="mnist-xs-8k"))   # what MNIST's test split leaves: 8,000 + 2,000
    assert f"images: 10,000 (8,000 training + 2,000 test) x 784 pixels x float32 + the uint8 files = " \
           f"{costs.fmt_bytes(10_000 * 784 * 5)}" in b9
    b8 = basis(plan(LAPTOP, "B8", size="784-32-10"))
    assert "images: 70,000 (60,000 training + 10,000 test) x 784 pixels x float32 + the uint8 files" in b8
    assert "images:" not in basis(plan(LAPTOP, "B4", size="linreg-1M-d100"))   # synthetic rows, no test split
    gpu = basis(plan(RTX, "B9", size="mnist-xs-8k"))
    assert "x float32 = " in gpu and "uint8" not in gpu    # moved whole to the GPU: the pool holds the floats


def test_b4_prices_one_run_per_optimiser():
    p = plan(LAPTOP, "B4", size="linreg-1M-d100")
    assert "3 runs of 5 epochs (one per optimiser)" in basis(p)
    one = F.fit(kits.reference_profile(LAPTOP), "B4", size="linreg-1M-d100", check_packages=False,
                overrides={"runs": 1})
    assert p.prediction.seconds > 1.5 * (one.prediction.seconds - 1.5)


def test_b12_prices_its_loss_estimates_and_set_eval_iters_reprices_them():
    p = plan(LAPTOP, "B12", size="0.2M")
    assert "loss estimates: 9 x 2 splits x 200 batches = 3,600 forward passes" in basis(p)
    fewer = plan(LAPTOP, "B12", size="0.2M", overrides={"eval_iters": 1})
    assert "9 x 2 splits x 1 batches = 18 forward passes" in basis(fewer)
    assert fewer.prediction.seconds < p.prediction.seconds
    assert "loss estimates" not in basis(plan(LAPTOP, "B11", size="0.2M"))   # its own, at the end, is tiny


def test_a_standin_rung_prices_training_the_standin_first():
    for mid in ("B7", "B13", "B14"):
        assert "the stand-in model first: 300 steps x 16 x 64 tokens" in basis(plan(LAPTOP, mid, size="char-0.1M")), mid
    assert "stand-in" not in basis(plan(LAPTOP, "B13", size="gpt2-124M"))


def test_the_runs_clock_includes_importing_the_milestone_module(monkeypatch):
    """torch at the top of a milestone file is imported before its run starts: the wall time counts it."""
    monkeypatch.setitem(runner.REGISTRY, "B99", "tests.slow_import_milestone:run")
    t0 = time.perf_counter()
    runner.resolve("B99")
    took = time.perf_counter() - t0
    assert runner.IMPORT_SECONDS["tests.slow_import_milestone"] >= 0.3 and took >= 0.3
    runner.resolve("B99")              # imported once: the first import is what the run paid
    assert runner.IMPORT_SECONDS["tests.slow_import_milestone"] >= 0.3
