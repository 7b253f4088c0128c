"""B1 Q-learning, B4 gradient descent, B8 numpy MLP: run as a user runs them, and their properties checked.

Each milestone runs once through `tierkit run B<n> --size <smallest>` (on a
reference kit, so no probe is needed and no profile is touched); the functions
are then tested directly for what the milestone claims: B1's greedy policy
follows a shortest path (BFS says which), B4's trajectories end at a known
minimum, B8's backprop matches finite differences and torch's autograd, and it
learns MNIST.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from models import mlp
from tests.conftest import SHARED, run_cli
from tests.test_runner import assert_png
from tiers.data import load_images
from tiers.tier1 import b01_qlearning as b1
from tiers.tier1 import b04_gradient_descent as b4
from tiers.tier1 import b08_mlp as b8

DATA = SHARED / "data"
HAS_MNIST = (DATA / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
KIT = "laptop-8gb-cpu"


# Tests check what the milestones compute, not how fast: one BLAS thread keeps small matmuls from
# stalling on a busy machine (a second thread that is not scheduled holds up every call).
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


def run_milestone(mid: str, size: str, home: Path, **env: str) -> tuple[Path, dict]:
    proc = run_cli("run", mid, "--size", size, "--profile", KIT, home=home, env={**ONE_THREAD, **env}, timeout=180)
    assert proc.returncode == 0, proc.stderr
    folder = next((home / "builds").glob(f"B{int(mid[1:]):02d}-*"))
    return folder, json.loads((folder / "metrics.json").read_text())


def assert_build(folder: Path, pngs: list[str], *needles: str) -> str:
    assert {"README.md", "metrics.json", *pngs} <= {p.name for p in folder.iterdir()}
    for png in pngs:
        assert_png(folder / png)
    readme = (folder / "README.md").read_text()
    for needle in ("## Predicted vs actual", *(f"({p})" for p in pngs), *needles):
        assert needle in readme, needle
    return readme


# ---------------------------------------------------------------- B1

def test_b1_cli_smallest_size(home):
    folder, m = run_milestone("B1", "grid-5x5", home)
    assert_build(folder, ["policy.png", "values.png", "episodes.png"], "# B1: Q-learning", "BFS shortest path")
    r = m["metrics"]
    assert r["grid"] == 5 and r["bfs_shortest"] == 8
    assert r["reached_goal"] and r["greedy_is_shortest"] and r["greedy_length"] == 8
    assert m["plan"]["size"] == "grid-5x5" and m["actual"]["seconds"] > 0


def test_bfs_on_the_hand_drawn_map():
    world = b1.parse(b1.MAP_5X5)
    dist = b1.bfs_distances(world)
    assert world.start == (0, 0) and world.goal == (4, 4)
    assert dist[world.index(world.start)] == 8 and dist[world.index(world.goal)] == 0
    assert all(dist[i] == -1 for i in np.flatnonzero(world.walls.ravel()))   # walls are never reached
    assert dist[world.index((4, 3))] == 1 and dist[world.index((3, 4))] == 1  # the goal's neighbours


@pytest.mark.parametrize("n, episodes, max_steps", [(5, 300, 100), (10, 1500, 200)])
def test_greedy_policy_takes_a_shortest_path(n, episodes, max_steps):
    world = b1.make_grid(n, 0.2, seed=0)
    dist = b1.bfs_distances(world)
    out = b1.q_learning(world, episodes, max_steps, alpha=0.5, gamma=0.99, eps_start=0.5, eps_end=0.05, seed=0)
    path = b1.greedy_path(world, out["Q"])
    assert path[-1] == world.index(world.goal)
    assert len(path) - 1 == dist[world.index(world.start)]
    for a, b in itertools.pairwise(path):  # every move is one legal step onto a free cell, one closer to the goal
        (ra, ca), (rb, cb) = divmod(a, n), divmod(b, n)
        assert abs(ra - rb) + abs(ca - cb) == 1 and not world.walls[rb, cb]
        assert dist[b] == dist[a] - 1


def test_random_grids_always_have_a_path():
    for seed in range(5):
        world = b1.make_grid(12, 0.3, seed)
        assert b1.bfs_distances(world)[world.index(world.start)] > 0


# ---------------------------------------------------------------- B4

def test_b4_cli_smallest_size(home):
    folder, m = run_milestone("B4", "linreg-10K", home)
    assert_build(folder, ["rosenbrock.png", "himmelblau.png", "loss_2d.png", "linreg.png"], "## Rosenbrock",
                 "## Himmelblau", "Least-squares loss", "diverged")
    lin = m["metrics"]["linreg"]
    assert lin["features"] == 10 and lin["samples"] == 10_000


@pytest.mark.parametrize("surface", b4.SURFACES, ids=lambda s: s.name)
def test_gradients_match_finite_differences(surface):
    rng = np.random.default_rng(0)
    for p in rng.uniform(-2, 2, size=(5, 2)):
        h = 1e-6
        numeric = [(surface.f(p + h * e) - surface.f(p - h * e)) / (2 * h) for e in np.eye(2)]
        assert np.allclose(surface.grad(p), numeric, rtol=1e-5, atol=1e-4)


def test_good_learning_rates_end_at_a_known_minimum():
    rosen, himmel = b4.SURFACES
    runs = {t.label: t for t in b4.run_surface(rosen, 20_000)}
    for label in ("sgd lr=0.001", "momentum lr=0.001", "adam lr=0.01"):
        t = runs[label]
        assert not t.diverged and np.linalg.norm(t.points[-1] - [1, 1]) < 1e-2, (label, t.points[-1])
    assert runs["sgd lr=0.0022"].diverged  # past 2 / curvature: it blows up
    assert np.linalg.norm(runs["sgd lr=0.0002"].points[-1] - [1, 1]) > 0.1  # too small: still crawling
    for t in b4.run_surface(himmel, 3_000):
        if t.diverged:
            assert t.label == "sgd lr=0.05"
            continue
        _which, dist = b4.nearest_minimum(himmel, t.points[-1])
        assert dist < 1e-4 and himmel.f(t.points[-1]) < 1e-8, (t.label, t.points[-1])


def test_adam_and_momentum_by_hand():
    """One step of each optimiser, worked out on paper."""
    p, g = np.array([1.0, -2.0]), np.array([0.5, -4.0])
    assert np.allclose(b4.SGD(0.1).step(p, g), [0.95, -1.6])
    m = b4.Momentum(0.1, beta=0.9)
    p1 = m.step(p, g)
    assert np.allclose(p1, [0.95, -1.6]) and np.allclose(m.step(p1, g), p1 - 0.1 * (0.9 * g + g))
    # Adam's first step is lr * sign(g) (bias correction makes m_hat = g, s_hat = g^2)
    assert np.allclose(b4.Adam(0.01).step(p, g), p - 0.01 * np.sign(g), atol=1e-7)


def test_minibatch_sgd_reaches_the_least_squares_loss():
    lin = b4.run_linreg(b4.Config(widths=[10, 1], samples=5_000, epochs=5), log=lambda *a: None)
    for label, loss in lin["final_loss"].items():
        assert loss < 1.1 * lin["least_squares_loss"], (label, loss, lin["least_squares_loss"])


# ---------------------------------------------------------------- B8

@pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST test split not at {DATA / 'mnist'}")
def test_b8_cli_on_the_mnist_test_split(home):
    """784-32-10 on 8,000 of MNIST's test digits, tested on the other 2,000: >= 90% in a few seconds."""
    folder, m = run_milestone("B8", "784-32-10-8k", home, TIERKIT_DATA=str(DATA))
    readme = assert_build(folder, ["loss.png", "accuracy.png", "first_layer.png"], "## Gradient check",
                          "test split only", "tierkit data fetch mnist")
    r = m["metrics"]
    assert r["n_train"] == 8000 and r["n_test"] == 2000 and r["widths"] == [784, 32, 10]
    assert r["test_accuracy"] >= 0.90, r["test_accuracy"]
    assert r["gradient_check"]["max_rel_error"] < 1e-6
    assert f"{r['test_accuracy']:.2%}" in readme


def test_b8_cli_without_mnist_falls_back_to_sklearn_digits(home, tmp_path):
    mpl_cache = Path.home() / ".cache" / "matplotlib"  # a fresh HOME would rebuild matplotlib's font cache
    folder, m = run_milestone("B8", "784-32-10-8k", home, TIERKIT_DATA=str(tmp_path / "empty"),
                              HOME=str(tmp_path), MPLCONFIGDIR=str(mpl_cache))
    r = m["metrics"]
    assert "scikit-learn's bundled digits" in r["data"] and r["widths"] == [64, 32, 10]
    assert r["test_accuracy"] >= 0.85
    assert any("tierkit data fetch mnist" in line for line in m["log"])
    assert "scikit-learn's bundled digits" in (folder / "README.md").read_text()


@pytest.mark.parametrize("widths", [[784, 16, 10], [20, 16, 8, 10]])
def test_gradient_check_passes(widths):
    x = np.random.default_rng(1).random((8, widths[0]), dtype=np.float32)
    y = np.arange(8) % widths[-1]
    gc = mlp.gradient_check(widths, x, y, entries=10)
    assert gc["max_rel_error"] < 1e-6, gc
    assert {r["tensor"] for r in gc["per_tensor"]} == {f"{k}{i}" for i in range(1, len(widths)) for k in "Wb"}


def test_gradient_check_catches_a_broken_backward(monkeypatch):
    """Forget the ReLU mask in the backward pass: the check must say so."""
    def wrong(params, acts, dlogits):
        grads, d = [], dlogits
        for i in range(len(params) - 1, -1, -1):
            grads.append((acts[i].T @ d, d.sum(axis=0)))
            d = d @ params[i][0].T  # no "* (a > 0)"
        return grads[::-1]

    monkeypatch.setattr(mlp, "backward", wrong)
    x = np.random.default_rng(1).random((8, 20)) - 0.5
    assert mlp.gradient_check([20, 16, 10], x, np.arange(8) % 10, entries=10)["max_rel_error"] > 1e-2


def test_loss_and_gradients_equal_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = mlp.init([30, 20, 10], rng, np.float64)
    x, y = rng.random((16, 30)), rng.integers(0, 10, 16)
    loss, grads = mlp.loss_and_grads(params, x, y)
    tp = [(torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True)) for W, b in params]
    h = torch.relu(torch.tensor(x) @ tp[0][0] + tp[0][1])
    t_loss = torch.nn.functional.cross_entropy(h @ tp[1][0] + tp[1][1], torch.tensor(y))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    for (gW, gb), (W, b) in zip(grads, tp):
        assert np.allclose(gW, W.grad.numpy(), rtol=1e-10, atol=1e-12)
        assert np.allclose(gb, b.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0]])
    loss, grad = mlp.softmax_cross_entropy(logits, np.array([0]))
    assert loss == pytest.approx(0.0) and np.isfinite(grad).all()
    loss, _ = mlp.softmax_cross_entropy(logits, np.array([2]))
    assert loss == pytest.approx(2000.0)


@pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST test split not at {DATA / 'mnist'}")
def test_mlp_learns_mnist_in_a_few_seconds(one_blas_thread):
    cfg = b8.Config(widths=[784, 64, 10], samples=8000, epochs=4, data_path=str(DATA))
    d = load_images(cfg.data, cfg.samples, cfg.seed, cfg.data_path, log=lambda *a: None)
    params = mlp.init([784, 64, 10], np.random.default_rng(0))
    hist = mlp.train(params, d, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, momentum=cfg.momentum,
                     lr_final=cfg.lr_final, optimizer=cfg.optimizer, seed=cfg.seed)
    assert hist["test_acc"][-1] >= 0.90 and hist["train_loss"][-1] < hist["train_loss"][0]
    assert mlp.accuracy(params, d.x_test, d.y_test)[1] == hist["test_acc"][-1]
