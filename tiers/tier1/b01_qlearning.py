"""B1: tabular Q-learning on a gridworld, epsilon-greedy, in numpy.

    S . . . .        An agent starts at S and must reach G. Each move costs -1, so
    . # # . .        the return of an episode is minus its length: maximising it
    . . # . #        means finding a shortest path. Walls (#) block; bumping into
    # . . . .        one (or the edge) leaves the agent where it was.
    . . # . G

The whole algorithm is one line, the Q-learning update:

    Q[s, a] += alpha * (r + gamma * max_a' Q[s', a'] - Q[s, a])

Q[s, a] estimates the return of taking action a in state s and acting greedily
after. Acting epsilon-greedily (a random action with probability epsilon, else
argmax Q[s]) keeps exploring; Q starts at 0, above every true value (all returns
are negative), so untried actions look best and get tried: "optimism in the face
of uncertainty". The 5x5 map is drawn above; bigger sizes of the ladder place
random walls (seeded, a path always exists). A breadth-first search gives the
true shortest distances, to check what the agent learned.
"""
from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from annotated_types import Ge, Gt, Le
from pydantic import AfterValidator

from tiers.report import pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output

Probability = Annotated[float, Ge(0), Le(1)]


@dataclass
class Config:
    env: Annotated[str, AfterValidator(_square_grid)] = "GridWorld-5x5"  # NxN; 5x5 is the map drawn above
    episodes: Annotated[int, Gt(0)] = 500
    max_steps: Annotated[int, Gt(0)] = 100            # an episode that has not reached G by then ends
    alpha: Annotated[float, Gt(0), Le(1)] = 0.5       # how far each update moves Q[s, a] towards its target
    gamma: Probability = 0.99                         # discount: a reward t steps later counts gamma^t
    epsilon_start: Probability = 0.5                  # exploration, decaying linearly over the first half
    epsilon_end: Probability = 0.05
    # random grids only (every size but the hand-drawn 5x5): past ~40% walls (site percolation's threshold)
    # a big grid almost never has a path from S to G, and make_grid would redraw it forever
    wall_density: Annotated[float, Ge(0), Le(0.35)] = 0.2
    seed: int = 0
    snapshots: Annotated[int, Gt(0)] = 6              # value maps drawn along training (values.png)


MAP_5X5 = ["S....",
           ".##..",
           "..#.#",
           "#....",
           "..#.G"]

ACTIONS = [(-1, 0), (1, 0), (0, -1), (0, 1)]  # up, down, left, right (row, col)
ARROWS = [(0, 1), (0, -1), (-1, 0), (1, 0)]   # the same as (dx, dy) with y pointing up, for quiver


# ---------------------------------------------------------------- the environment

@dataclass
class GridWorld:
    walls: np.ndarray          # (n, n) bool
    start: tuple[int, int]
    goal: tuple[int, int]

    @property
    def n(self) -> int:
        return self.walls.shape[0]

    def index(self, rc: tuple[int, int]) -> int:
        return rc[0] * self.n + rc[1]

    def transitions(self) -> np.ndarray:
        """next_state[s, a] for every state and action: the whole environment as a lookup table."""
        n = self.n
        nxt = np.zeros((n * n, len(ACTIONS)), dtype=np.int64)
        for r in range(n):
            for c in range(n):
                for a, (dr, dc) in enumerate(ACTIONS):
                    r2, c2 = r + dr, c + dc
                    blocked = not (0 <= r2 < n and 0 <= c2 < n) or self.walls[r2, c2]
                    nxt[r * n + c, a] = r * n + c if blocked else r2 * n + c2
        return nxt


def parse(rows: list[str]) -> GridWorld:
    walls = np.array([[ch == "#" for ch in row] for row in rows])
    find = lambda ch: next((r, c) for r, row in enumerate(rows) for c, x in enumerate(row) if x == ch)
    return GridWorld(walls, find("S"), find("G"))


def grid_size(env: str) -> int:
    """'GridWorld-5x5' -> 5; ValueError for anything but a square grid of at least 2 x 2."""
    m = re.fullmatch(r"GridWorld-(\d+)x(\d+)", env, re.IGNORECASE)
    if not m or m[1] != m[2] or int(m[1]) < 2:
        raise ValueError("must be a square GridWorld-NxN with N >= 2, such as GridWorld-10x10")
    return int(m[1])


def _square_grid(env: str) -> str:
    grid_size(env)
    return env


def make_grid(n: int, density: float, seed: int) -> GridWorld:
    """The 5x5 map above, or n x n with random walls; redrawn until the goal can be reached."""
    if n == 5:
        return parse(MAP_5X5)
    rng = np.random.default_rng(seed)
    while True:
        walls = rng.random((n, n)) < density
        walls[0, 0] = walls[n - 1, n - 1] = False
        world = GridWorld(walls, (0, 0), (n - 1, n - 1))
        if bfs_distances(world)[world.index(world.start)] >= 0:
            return world


def bfs_distances(world: GridWorld) -> np.ndarray:
    """Shortest number of moves from every cell to the goal (-1: unreachable), by BFS backwards from the goal."""
    nxt = world.transitions()
    dist = np.full(world.n * world.n, -1, dtype=np.int64)
    goal = world.index(world.goal)
    dist[goal] = 0
    queue = deque([goal])
    preds: dict[int, list[int]] = {}
    for s in range(len(nxt)):
        for s2 in nxt[s]:
            if s2 != s:
                preds.setdefault(int(s2), []).append(s)
    while queue:
        s = queue.popleft()
        for p in preds.get(s, []):
            if dist[p] < 0 and not world.walls.flat[p]:
                dist[p] = dist[s] + 1
                queue.append(p)
    return dist


# ---------------------------------------------------------------- the agent

def q_learning(world: GridWorld, episodes: int, max_steps: int, alpha: float, gamma: float,
               eps_start: float, eps_end: float, seed: int = 0, snapshot_at: list[int] | None = None,
               on_episode: Any = None) -> dict[str, Any]:
    """Epsilon-greedy Q-learning from the start cell; epsilon decays linearly over the first half of training."""
    rng = np.random.default_rng(seed)
    nxt = world.transitions()
    start, goal = world.index(world.start), world.index(world.goal)
    Q = np.zeros((len(nxt), len(ACTIONS)))
    returns, lengths, snapshots = [], [], {}
    for ep in range(episodes):
        eps = eps_end + (eps_start - eps_end) * max(0.0, 1 - ep / (episodes / 2))
        explore = rng.random(max_steps) < eps              # drawn once per episode: cheaper than per step
        random_action = rng.integers(len(ACTIONS), size=max_steps)
        s, total, t = start, 0.0, 0
        for t in range(max_steps):
            a = int(random_action[t]) if explore[t] else int(Q[s].argmax())
            s2 = int(nxt[s, a])
            r, done = -1.0, s2 == goal
            target = r if done else r + gamma * Q[s2].max()   # the goal is terminal: nothing follows it
            Q[s, a] += alpha * (target - Q[s, a])
            s, total = s2, total + r
            if done:
                break
        returns.append(total)
        lengths.append(t + 1)
        if snapshot_at and ep + 1 in snapshot_at:
            snapshots[ep + 1] = Q.max(axis=1).copy()
        if on_episode:
            on_episode(ep)
    return {"Q": Q, "returns": returns, "lengths": lengths, "snapshots": snapshots}


def greedy_path(world: GridWorld, Q: np.ndarray, start: int | None = None, limit: int | None = None,
                nxt: np.ndarray | None = None) -> list[int]:
    """Follow argmax Q from a cell until the goal (or `limit` moves: a loop means the policy is not done)."""
    nxt = world.transitions() if nxt is None else nxt
    s = world.index(world.start) if start is None else start
    goal, path = world.index(world.goal), [s]
    for _ in range(limit or world.n * world.n):
        if s == goal:
            break
        s = int(nxt[s, int(Q[s].argmax())])
        path.append(s)
    return path


# ---------------------------------------------------------------- the milestone

def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    world = make_grid(grid_size(cfg.env), cfg.wall_density, cfg.seed)
    dist = bfs_distances(world)
    shortest = int(dist[world.index(world.start)])
    episodes = cfg.episodes
    marks = sorted({max(1, round(episodes * f)) for f in np.geomspace(0.002, 1, cfg.snapshots)})
    ctx.log(f"{world.n}x{world.n} grid, {int(world.walls.sum())} walls; BFS: shortest path {shortest} moves")

    t0 = time.perf_counter()
    with ctx.progress(f"Q-learning, {episodes:,} episodes", episodes) as bar:
        out = q_learning(world, episodes, cfg.max_steps, cfg.alpha, cfg.gamma, cfg.epsilon_start,
                         cfg.epsilon_end, cfg.seed, marks, lambda ep: bar.advance() if ep % 50 == 49 else None)
    seconds = time.perf_counter() - t0
    Q, nxt, goal = out["Q"], world.transitions(), world.index(world.goal)
    path = greedy_path(world, Q, nxt=nxt)
    reached = path[-1] == goal
    # From every reachable cell: does the greedy policy take a shortest path?
    cells = [s for s in range(world.n * world.n) if dist[s] > 0]
    optimal = sum(len(p) - 1 == dist[s] and p[-1] == goal for s in cells for p in [greedy_path(world, Q, s, nxt=nxt)])
    steps = int(sum(out["lengths"]))
    ctx.log(f"greedy path from S: {len(path) - 1} moves ({'shortest' if reached and len(path) - 1 == shortest else 'NOT shortest'}); "
            f"{optimal}/{len(cells)} cells follow a shortest path; {steps:,} steps in {seconds:.2f} s")

    plt = pyplot()
    plots = [policy_plot(plt, ctx.out_dir / "policy.png", world, Q, path, dist),
             values_plot(plt, ctx.out_dir / "values.png", world, out["snapshots"]),
             curves_plot(plt, ctx.out_dir / "episodes.png", out["returns"], out["lengths"], shortest)]
    metrics = {
        "env": cfg.env, "grid": world.n, "walls": int(world.walls.sum()), "episodes": episodes,
        "max_steps": cfg.max_steps, "alpha": cfg.alpha, "gamma": cfg.gamma,
        "epsilon": [cfg.epsilon_start, cfg.epsilon_end],
        "bfs_shortest": shortest, "greedy_length": len(path) - 1, "reached_goal": reached,
        "greedy_is_shortest": bool(reached and len(path) - 1 == shortest),
        "cells_on_shortest_path": optimal, "cells_reachable": len(cells),
        "total_steps": steps, "fill": round(steps / (episodes * cfg.max_steps), 3),
        "microseconds_per_step": round(seconds / steps * 1e6, 2),
        "final_return_mean_last_10pct": float(np.mean(out["returns"][-max(1, episodes // 10):])),
        "first_episode_length": out["lengths"][0],
    }
    summary = (f"Tabular Q-learning on a {world.n}x{world.n} gridworld with {metrics['walls']} walls: after "
               f"{episodes:,} episodes the greedy policy walks from S to G in {len(path) - 1} moves"
               + (" (BFS's shortest path: the optimum)" if metrics["greedy_is_shortest"] else
                  f" against BFS's {shortest}") + f", and {optimal} of {len(cells)} reachable cells follow a "
               f"shortest path. The first episode took {out['lengths'][0]} steps.")
    return Output(metrics=metrics, summary=summary, report=report(metrics), plots=plots)


# ---------------------------------------------------------------- plots

def _grid_image(world: GridWorld, values: np.ndarray | None = None) -> np.ndarray:
    v = np.zeros((world.n, world.n)) if values is None else values.reshape(world.n, world.n).astype(float)
    return np.ma.masked_array(v, mask=world.walls)


def policy_plot(plt: Any, path: Any, world: GridWorld, Q: np.ndarray, walk: list[int], dist: np.ndarray) -> str:
    n = world.n
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("black")
    im = ax.imshow(_grid_image(world, Q.max(axis=1)), cmap=cmap)
    best = Q.argmax(axis=1)
    rows, cols = np.divmod(np.arange(n * n), n)
    free = ~world.walls.flat[np.arange(n * n)] & (np.arange(n * n) != world.index(world.goal)) & (dist >= 0)
    u = np.array([ARROWS[a][0] for a in best])[free]
    v = np.array([ARROWS[a][1] for a in best])[free]
    ax.quiver(cols[free], rows[free], u, v, color="white", scale=max(n, 5) * 1.6, width=0.006 if n <= 10 else 0.003)
    pr, pc = np.divmod(np.array(walk), n)
    ax.plot(pc, pr, color="tab:red", lw=2 if n <= 20 else 1, alpha=0.8, label=f"greedy path ({len(walk) - 1} moves)")
    for (r, c), label in ((world.start, "S"), (world.goal, "G")):
        ax.text(c, r, label, ha="center", va="center", color="tab:red", fontsize=14 if n <= 10 else 8, weight="bold")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="V(s) = max_a Q(s, a)")
    ax.set_title("Learned greedy policy (arrows) over the learned values; walls black", fontsize=10)
    save(fig, path)
    return f"{path.name}: the learned policy as arrows, and the greedy path from S to G"


def values_plot(plt: Any, path: Any, world: GridWorld, snaps: dict[int, np.ndarray]) -> str:
    keys = sorted(snaps)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.9))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("black")
    lo = min(float(s.min()) for s in snaps.values())
    for ax, k in zip(axes, keys):
        ax.imshow(_grid_image(world, snaps[k]), cmap=cmap, vmin=lo, vmax=0)
        ax.set_title(f"after {k:,} episode{'s' if k > 1 else ''}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"V(s) = max_a Q(s, a) as training goes on (colour scale {lo:.0f} .. 0): the values start "
                 "at an optimistic 0 and sink towards minus each cell's distance to G", fontsize=9)
    save(fig, path)
    return f"{path.name}: the value of each cell at {len(keys)} points of training"


def curves_plot(plt: Any, path: Any, returns: list[float], lengths: list[int], shortest: int) -> str:
    k = max(1, len(returns) // 50)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, values, ref, label in ((a1, returns, -shortest, f"optimum: -{shortest}"),
                                   (a2, lengths, shortest, f"shortest path: {shortest}")):
        x = np.asarray(values, dtype=float)
        eps = np.arange(1, len(x) + 1)
        if len(x) <= 2000:
            ax.plot(eps, x, lw=0.5, alpha=0.4)
        else:  # thousands of episodes: draw each bin's range, not every point
            bins = np.array_split(np.arange(len(x)), 1000)
            ax.fill_between([b[0] + 1 for b in bins], [x[b].min() for b in bins], [x[b].max() for b in bins],
                            alpha=0.3, lw=0, label="range per bin of episodes")
        ax.plot(eps[k - 1:], np.convolve(x, np.ones(k) / k, mode="valid"), lw=1.5, label=f"running mean of {k}")
        ax.axhline(ref, color="gray", ls="--", label=label)
    a1.set_ylabel("return (-1 per move)")
    a2.set_ylabel("episode length (moves)")
    for ax in (a1, a2):
        ax.set_xlabel("episode")
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Episode return and length (epsilon-greedy exploration keeps them above the optimum)", fontsize=10)
    save(fig, path)
    return f"{path.name}: return and length of every episode"


# ---------------------------------------------------------------- the report

def report(m: dict[str, Any]) -> str:
    return "\n".join([
        "## Result", "",
        (f"- grid {m['grid']}x{m['grid']}, {m['walls']} walls; {m['episodes']:,} episodes of at most "
        f"{m['max_steps']} moves; alpha {m['alpha']:g}, gamma {m['gamma']:g}, epsilon {m['epsilon'][0]:g} -> "
        f"{m['epsilon'][1]:g}"),
        (f"- BFS shortest path S -> G: **{m['bfs_shortest']}** moves; learned greedy path: **{m['greedy_length']}** "
        f"moves ({'optimal' if m['greedy_is_shortest'] else 'not optimal'})"),
        (f"- cells whose greedy path is a shortest path: {m['cells_on_shortest_path']} of {m['cells_reachable']} "
        "(cells far from the route the agent takes are visited rarely, so some may still be sub-optimal)"),
        (f"- mean return over the last 10% of episodes: {m['final_return_mean_last_10pct']:.1f} (exploration "
        f"costs a little); first episode: {m['first_episode_length']} moves"),
        (f"- {m['total_steps']:,} environment steps ({m['fill']:.0%} of the episodes x max_steps budget), "
        f"{m['microseconds_per_step']:g} us per step"),
    ])
