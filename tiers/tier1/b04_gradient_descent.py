"""B4: gradient descent, watched step by step, in numpy.

Two classic test surfaces, with their gradients worked out by hand:

    Rosenbrock  f(x, y) = (1 - x)^2 + 100 (y - x^2)^2      one minimum, f(1, 1) = 0, at the end of a long,
                                                            curved, flat-bottomed valley
    Himmelblau  f(x, y) = (x^2 + y - 11)^2 + (x + y^2 - 7)^2   four minima, f = 0 at each

and three optimisers, each a few lines on a parameter vector p and its gradient g:

    SGD       p <- p - lr * g
    momentum  v <- beta * v + g;                p <- p - lr * v      (a heavy ball: speeds up along the valley)
    Adam      m <- b1 m + (1 - b1) g;  s <- b2 s + (1 - b2) g^2;
              p <- p - lr * m_hat / (sqrt(s_hat) + eps)             (a per-coordinate step size; hats undo
                                                                      the zero start of m and s)

On a 2-D surface the gradient is exact, so "SGD" is plain gradient descent:
too small a learning rate crawls, too large one oscillates or blows up. The
"stochastic" part needs data: the second half fits a linear regression on
synthetic data (the planner's size: features x samples) from minibatch
gradients, where SGD's noise shows as a loss floor that momentum and Adam
reach at different speeds. The same `descend` loop drives both.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from annotated_types import Ge, Gt
from pydantic import AfterValidator

from tiers.report import pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    # the linear regression fitted from minibatches: y = X w + noise, X of `samples` rows x `features` columns
    widths: Annotated[list[int], AfterValidator(_linear)] = field(default_factory=lambda: [10, 1])  # [features, 1]
    samples: Annotated[int, Gt(0)] = 10000
    epochs: Annotated[float, Gt(0)] = 20
    batch: Annotated[int, Gt(0)] = 64
    noise: Annotated[float, Ge(0)] = 0.5             # std of the noise: the least-squares loss floor
    seed: int = 0
    steps_2d: Annotated[int, Gt(0)] | None = None     # None: each surface's own budget (Surface.steps)

    def __post_init__(self) -> None:
        if self.samples < self.widths[0]:
            raise ValueError(f"samples {self.samples} is fewer than the {self.widths[0]} features: "
                             "least squares needs at least one row per unknown")
        if self.batch > self.samples:
            raise ValueError(f"batch {self.batch} is larger than samples {self.samples}: a minibatch is part of the data")

# ---------------------------------------------------------------- the surfaces and their gradients


def rosenbrock(p: np.ndarray) -> float:
    x, y = p
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def rosenbrock_grad(p: np.ndarray) -> np.ndarray:
    x, y = p
    return np.array([-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)])


def himmelblau(p: np.ndarray) -> float:
    x, y = p
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def himmelblau_grad(p: np.ndarray) -> np.ndarray:
    x, y = p
    a, b = x**2 + y - 11, x + y**2 - 7
    return np.array([4 * x * a + 2 * b, 2 * a + 4 * y * b])


HIMMELBLAU_MINIMA = np.array([[3.0, 2.0], [-2.805118, 3.131312], [-3.779310, -3.283186], [3.584428, -1.848126]])


@dataclass(frozen=True)
class Surface:
    name: str
    f: Callable[[np.ndarray], float]
    grad: Callable[[np.ndarray], np.ndarray]
    start: tuple[float, float]
    minima: np.ndarray
    box: tuple[float, float, float, float]      # x0, x1, y0, y1 for the contour plot
    runs: tuple[tuple[str, float], ...]         # (optimiser, learning rate)
    good: tuple[str, float]                     # the SGD run with a good learning rate
    steps: int                                  # at most; a run that has stopped moving ends earlier


SURFACES = (
    Surface("Rosenbrock", rosenbrock, rosenbrock_grad, (-1.5, 2.0), np.array([[1.0, 1.0]]), (-2, 2, -1, 3),
            (("sgd", 2e-4), ("sgd", 1e-3), ("sgd", 2.2e-3), ("momentum", 1e-3), ("adam", 0.01)), ("sgd", 1e-3),
            20_000),  # plain GD needs ~20k steps down the valley: its curvature is 2,500x flatter along it
    Surface("Himmelblau", himmelblau, himmelblau_grad, (0.0, 0.0), HIMMELBLAU_MINIMA, (-5, 5, -5, 5),
            (("sgd", 1e-3), ("sgd", 0.01), ("sgd", 0.05), ("momentum", 0.005), ("adam", 0.1)), ("sgd", 0.01),
            3_000),
)

# ---------------------------------------------------------------- the optimisers


@dataclass
class SGD:
    lr: float

    def step(self, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        return p - self.lr * g


@dataclass
class Momentum:
    lr: float
    beta: float = 0.9
    v: Any = 0.0

    def step(self, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        self.v = self.beta * self.v + g
        return p - self.lr * self.v


@dataclass
class Adam:
    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    m: Any = 0.0
    s: Any = 0.0
    t: int = 0

    def step(self, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.s = self.b2 * self.s + (1 - self.b2) * g * g
        m_hat = self.m / (1 - self.b1**self.t)
        s_hat = self.s / (1 - self.b2**self.t)
        return p - self.lr * m_hat / (np.sqrt(s_hat) + self.eps)


OPTIMISERS = {"sgd": SGD, "momentum": Momentum, "adam": Adam}


@dataclass
class Trajectory:
    label: str
    points: np.ndarray            # (steps + 1, dim): where p was
    diverged: bool = False
    losses: list[float] = field(default_factory=list)


def descend(grad: Callable[[np.ndarray], np.ndarray], p0: np.ndarray, opt: Any, steps: int,
            record: bool = True, limit: float = 1e6, tol: float = 0.0) -> tuple[np.ndarray, bool]:
    """The loop every optimiser shares: p <- opt.step(p, grad(p)).

    Returns the points visited (only the last when not recording) and whether it
    diverged (p left |p| < limit). A step shorter than `tol` ends the run: it has converged.
    """
    p = np.asarray(p0, dtype=np.float64)
    points = [p]
    for _ in range(steps):
        new = opt.step(p, grad(p))
        if not np.all(np.isfinite(new)) or np.abs(new).max() > limit:
            return np.array(points), True
        moved, p = np.abs(new - p).max(), new
        if record:
            points.append(p)
        if moved < tol:
            break
    return (np.array(points) if record else p[None]), False


def run_surface(s: Surface, steps: int | None = None) -> list[Trajectory]:
    out = []
    for name, lr in s.runs:
        pts, diverged = descend(s.grad, np.array(s.start), OPTIMISERS[name](lr), steps or s.steps, tol=1e-12)
        out.append(Trajectory(f"{name} lr={lr:g}", pts, diverged, list(s.f(pts.T))))  # f of every point at once
    return out


def nearest_minimum(s: Surface, p: np.ndarray) -> tuple[int, float]:
    d = np.linalg.norm(s.minima - p, axis=1)
    return int(d.argmin()), float(d.min())


# ---------------------------------------------------------------- stochastic: linear regression from minibatches

def _linear(widths: list[int]) -> list[int]:
    if len(widths) != 2 or widths[0] < 1 or widths[1] != 1:
        raise ValueError("must be [features, 1]: B4 fits a linear regression, one output")
    return widths



def linreg_data(features: int, samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = X w* + noise, in float32 (drawn in float32: no float64 temporary of the whole matrix)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((samples, features), dtype=np.float32)
    w_true = rng.standard_normal(features).astype(np.float32)
    y = X @ w_true + noise * rng.standard_normal(samples, dtype=np.float32)
    return X, y, w_true


def minibatch_grad(X: np.ndarray, y: np.ndarray, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """The gradient of L(w) = mean (X w - y)^2 / 2 on the next minibatch each call: X_b^T (X_b w - y_b) / B.

    The rows were drawn independently at random, so consecutive slices are random
    minibatches already (real data would be shuffled once first); slices are views,
    not copies, and read memory in order.
    """
    start = 0

    def grad(w: np.ndarray) -> np.ndarray:
        nonlocal start
        if start + batch > len(X):  # the end of an epoch
            start = 0
        Xb, yb = X[start:start + batch], y[start:start + batch]
        start += batch
        return Xb.T @ (Xb @ w.astype(np.float32) - yb) / batch
    return grad


def run_linreg(cfg: Config, log: Any = print) -> dict[str, Any]:
    features = cfg.widths[0]
    X, y, _ = linreg_data(features, cfg.samples, cfg.noise, cfg.seed)
    probe = slice(0, min(len(X), 10_000))  # the curves use a fixed subset: a full pass per point costs too much
    loss = lambda w, rows=slice(None): float(np.mean((X[rows] @ w.astype(np.float32) - y[rows]) ** 2) / 2)
    floor = loss(np.linalg.solve(X.T @ X, X.T @ y))  # least squares by the normal equations: X^T X w = X^T y
    batch = cfg.batch
    steps_per_epoch = -(-cfg.samples // batch)
    steps = int(np.ceil(cfg.epochs * steps_per_epoch))
    marks = np.unique(np.geomspace(1, steps, 60).astype(int))  # log-spaced: early steps matter most
    runs = {"sgd": 0.05, "momentum": 0.005, "adam": 0.01}
    curves: dict[str, list[float]] = {}
    final: dict[str, float] = {}
    for name, lr in runs.items():
        opt = OPTIMISERS[name](lr)
        grad = minibatch_grad(X, y, batch)  # the same batches, in the same order, for each optimiser
        w = np.zeros(features)
        curve, done = [loss(w, probe)], 0
        for m in marks:
            w = descend(grad, w, opt, int(m) - done, record=False)[0][-1]
            done = int(m)
            curve.append(loss(w, probe))
        label = f"{name} lr={lr:g}"
        curves[label], final[label] = curve, loss(w)
        log(f"linear regression, {label}: loss {final[label]:.4f} after {steps:,} steps (least squares: {floor:.4f})")
    return {"features": features, "samples": cfg.samples, "batch": batch, "epochs": cfg.epochs,
            "steps": steps, "marks": [0, *map(int, marks)], "least_squares_loss": floor, "final_loss": final, "curves": curves}


# ---------------------------------------------------------------- the milestone


def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    surfaces: dict[str, Any] = {}
    trajectories: dict[str, list[Trajectory]] = {}
    with ctx.progress("2-D surfaces", len(SURFACES)) as bar:
        for s in SURFACES:
            trs = trajectories[s.name] = run_surface(s, cfg.steps_2d)
            rows = []
            for t in trs:
                end = t.points[-1]
                which, dist = nearest_minimum(s, end)
                rows.append({"run": t.label, "steps": len(t.points) - 1, "diverged": t.diverged,
                             "end": [round(float(v), 4) for v in end], "f_end": float(t.losses[-1]),
                             "nearest_minimum": [round(float(v), 4) for v in s.minima[which]],
                             "distance_to_minimum": dist})
                ctx.log(f"{s.name}, {t.label}: " + ("diverged" if t.diverged else
                        f"ends at ({end[0]:.4f}, {end[1]:.4f}), f = {t.losses[-1]:.2e}, {dist:.1e} from a minimum"))
            surfaces[s.name] = {"start": list(s.start), "max_steps": cfg.steps_2d or s.steps, "runs": rows}
            bar.advance()
    with ctx.progress("linear regression from minibatches", None):
        lin = run_linreg(cfg, ctx.log)

    plt = pyplot()
    plots = [contour_plot(plt, ctx.out_dir / f"{s.name.lower()}.png", s, trajectories[s.name]) for s in SURFACES]
    plots.append(loss_plot(plt, ctx.out_dir / "loss_2d.png", trajectories))
    plots.append(linreg_plot(plt, ctx.out_dir / "linreg.png", lin))
    metrics = {"surfaces": surfaces, "linreg": lin}
    r = {s.name: next(x for x in surfaces[s.name]["runs"] if x["run"] == f"{s.good[0]} lr={s.good[1]:g}")
         for s in SURFACES}
    summary = (f"Gradient descent with a good learning rate ends {r['Rosenbrock']['distance_to_minimum']:.1e} from "
               f"Rosenbrock's minimum (1, 1) and {r['Himmelblau']['distance_to_minimum']:.1e} from Himmelblau's "
               f"minimum at {tuple(r['Himmelblau']['nearest_minimum'])}; too large a rate diverges, too small "
               f"crawls, and momentum and Adam cross Rosenbrock's valley faster. From minibatches, SGD on a "
               f"{lin['features']}-feature linear regression ({lin['samples']:,} samples) levels off near the "
               f"least-squares loss {lin['least_squares_loss']:.4f}.")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


# ---------------------------------------------------------------- plots


def thin(a: np.ndarray, keep: int = 400) -> np.ndarray:
    """The first `keep` rows, then log-spaced ones to the last: a plot needs no more than that."""
    if len(a) <= 2 * keep:
        return a
    rest = np.unique(np.geomspace(keep, len(a) - 1, keep).astype(int))
    return a[np.concatenate([np.arange(keep), rest])]


def contour_plot(plt: Any, path: Any, s: Surface, trs: list[Trajectory]) -> str:
    x0, x1, y0, y1 = s.box
    xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    zs = s.f(np.stack([xs, ys]))
    fig, ax = plt.subplots(figsize=(7.5, 6))
    ax.contourf(xs, ys, np.log10(zs + 1e-3), levels=30, cmap="Greys_r", alpha=0.9)
    ax.contour(xs, ys, np.log10(zs + 1e-3), levels=15, colors="white", linewidths=0.3, alpha=0.6)
    for t, color in zip(trs, plt.get_cmap("tab10").colors):
        pts = thin(t.points)
        inside = (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
        label = f"{t.label}: " + ("diverged" if t.diverged else f"f = {t.losses[-1]:.1e} after {len(t.points) - 1:,} steps")
        ax.plot(pts[inside, 0], pts[inside, 1], ".-", ms=1.5, lw=1, color=color, label=label,
                zorder=3 if t.label.startswith("sgd") else 2)  # plain GD on top: the others follow the same valley
        if not t.diverged:
            ax.plot(*pts[-1], "o", color=color, ms=5)
    ax.plot(*s.start, "s", color="tab:red", ms=8, label=f"start {s.start}")
    ax.plot(s.minima[:, 0], s.minima[:, 1], "*", color="gold", ms=14, mec="black", label="minima")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"{s.name}: contours of log10 f, and where each optimiser went", fontsize=10)
    ax.legend(fontsize=7, loc="lower left" if s.name == "Rosenbrock" else "upper right", framealpha=0.85)
    save(fig, path)
    return f"{path.name}: {s.name}'s contours with the trajectories of SGD, momentum and Adam"


def loss_plot(plt: Any, path: Any, trajectories: dict[str, list[Trajectory]]) -> str:
    fig, axes = plt.subplots(1, len(trajectories), figsize=(11, 4))
    for ax, (name, trs) in zip(np.atleast_1d(axes), trajectories.items()):
        for t in trs:
            steps = thin(np.arange(len(t.losses)))
            ax.plot(steps + 1, np.maximum(np.asarray(t.losses)[steps], 1e-12), lw=1.2,
                    label=t.label + (" (diverged)" if t.diverged else ""))
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("step + 1")
        ax.set_ylabel("f(p)")
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("The value of the function along each trajectory", fontsize=10)
    save(fig, path)
    return f"{path.name}: f along each trajectory, step by step"


def linreg_plot(plt: Any, path: Any, lin: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in lin["curves"].items():
        ax.plot(np.array(lin["marks"]) + 1, curve, "-", lw=1.2, label=label)
    ax.axhline(lin["least_squares_loss"], color="gray", ls="--", label="least squares (the exact minimum)")
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel(f"step + 1 (minibatch of {lin['batch']})")
    ax.set_ylabel("loss, mean (Xw - y)^2 / 2 (10,000 fixed samples)")
    ax.set_title(f"Stochastic gradients: linear regression, {lin['features']} features, {lin['samples']:,} samples",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    return f"{path.name}: loss per epoch of SGD, momentum and Adam from minibatch gradients"


# ---------------------------------------------------------------- the report


def report(m: dict[str, Any]) -> str:
    out = []
    for name, s in m["surfaces"].items():
        out += [f"## {name} (start {tuple(s['start'])}, up to {s['max_steps']:,} steps)", "",
                "| run | ends at | f at the end | nearest minimum | distance |", "|---|---|---|---|---|"]
        for r in s["runs"]:
            if r["diverged"]:
                out.append(f"| {r['run']} | diverged after {r['steps']} steps | | | |")
            else:
                out.append(f"| {r['run']} | ({r['end'][0]:.4f}, {r['end'][1]:.4f}) | {r['f_end']:.2e} | "
                           f"{tuple(r['nearest_minimum'])} | {r['distance_to_minimum']:.1e} |")
        out.append("")
    lin = m["linreg"]
    out += [(f"## Linear regression from minibatches ({lin['features']} features, {lin['samples']:,} samples, "
            f"batch {lin['batch']})"), "", f"Least-squares loss (the floor): {lin['least_squares_loss']:.4f}", "",
            f"| optimiser | loss after 100 steps | after {lin['steps']:,} steps (all the data) |", "|---|---|---|"]
    at100 = int(np.searchsorted(lin["marks"], 100))
    out += [f"| {k} | {c[min(at100, len(c) - 1)]:.4f} | {lin['final_loss'][k]:.4f} |" for k, c in lin["curves"].items()]
    return "\n".join(out)
