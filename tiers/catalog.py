"""The milestone catalog: tiers/milestones.yaml, validated on load.

The data lives in the YAML; this module says what shape it must have (one
pydantic model per cost model's ladder rung, so a misspelt parameter is caught
with the milestone and rung it is in) and gives it to the planner as plain,
frozen objects. Any problem is a `CatalogError` whose message is one line.

    rung.model / .base / .dataset  must be names in tiers.data.REGISTRY (a model may also be
                                   b12, b13: the learner's own, or standin)  ->  rung.artifacts
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inventory.profile import one_line, yaml_problem
from inventory.profile import where as field_path

SCHEMA = "tierkit/milestones/v1"
DEFAULT_PATH = Path(__file__).with_name("milestones.yaml")
DEFAULT_TRACK = "build"


class CatalogError(Exception):
    """The milestone catalog cannot be read; str() is one line naming the place and the fix."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- one rung of a ladder, per cost model

# Models a rung may name that are not registry artifacts: the learner's own checkpoints (made by
# `tierkit run B12` / `B13`, never downloaded), and the small char model a milestone trains in seconds.
OWN_MODELS = {"b12": "B12", "b13": "B13", "standin": None}


class Rung(_M):
    """A size on a ladder: its label, plus the cost model's parameters (subclasses)."""

    size: str = Field(min_length=1)
    note: str | None = None            # shown with the plan; never priced
    data: str | None = None            # the data set this size trains on, for the learner
    model: str | None = None           # a registry name (tierkit data list), or b12 / b13 / standin
    base: str | None = None            # with model b12 / b13: the registry model it was trained from
    dataset: str | None = None         # a registry name: the data it trains or evaluates on
    dataset_files: list[str] | None = None   # the files of `dataset` this size reads (default: all of it)

    @model_validator(mode="after")
    def _registry_names(self) -> Rung:
        from tiers import data

        for key in ("model", "base", "dataset"):
            name = getattr(self, key)
            if name and name not in data.REGISTRY and not (key == "model" and name in OWN_MODELS):
                own = f" or {', '.join(OWN_MODELS)}" if key == "model" else ""
                raise ValueError(f"{key} {name!r} is not in the registry (`tierkit data list`){own}")
        if self.dataset_files:
            entry = data.get(self.dataset) if self.dataset else None
            known = {f.name for f in getattr(entry, "files", ())}
            wrong = [f for f in self.dataset_files if f not in known]
            if entry is None or wrong:
                raise ValueError(f"dataset_files {wrong or self.dataset_files} are not files of dataset "
                                 f"{self.dataset!r}" + (f" ({', '.join(sorted(known))})" if known else ""))
        return self

    def params(self) -> dict[str, Any]:
        """The configuration a runner gets: every field but the label."""
        return self.model_dump(exclude={"size"}, exclude_none=True)

    @property
    def artifacts(self) -> tuple[str, ...]:
        """The registry artifacts this size needs (models, then data), in the registry's spelling."""
        from tiers import data

        names = (self.model, self.base, self.dataset)
        return tuple(dict.fromkeys(n for n in names if n and n in data.REGISTRY))

    @property
    def own_model(self) -> str | None:
        """'B12' / 'B13' when this size runs on the learner's own model from that milestone's build."""
        return OWN_MODELS.get(self.model or "")


class Probe(Rung):
    bench: bool = True
    discover: bool = True
    mdns_wait: float = Field(0.25, ge=0)


class TabularQ(Rung):
    env: str
    states: int = Field(gt=0)
    actions: int = Field(gt=0)
    episodes: int = Field(gt=0)
    max_steps: int = Field(gt=0)


class BPE(Rung):
    corpus_bytes: int = Field(gt=0)
    vocab_size: int = Field(ge=256)
    impl: Literal["python", "numpy", "fast"] = "python"


class SkipGram(Rung):
    vocab: int = Field(gt=0)
    dim: int = Field(gt=0)
    corpus_tokens: int = Field(gt=0)
    window: int = Field(gt=0)
    negatives: int = Field(ge=0)
    epochs: float = Field(gt=0)


class MLPTrain(Rung):
    widths: list[int] = Field(min_length=2)
    samples: int = Field(gt=0)
    epochs: float = Field(gt=0)
    batch: int = Field(gt=0)
    framework: Literal["python", "numpy", "torch"] = "numpy"
    optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    runs: int = Field(1, gt=0)         # the same training once per optimiser compared (B4: SGD, momentum, Adam)
    test_samples: int = Field(0, ge=0)   # held-out images loaded beside the training ones (0: synthetic rows)


class Matmul(Rung):
    n_min: int = Field(64, gt=0)
    n_max: int = Field(gt=0)
    dtype: Literal["float32", "float64"] = "float32"
    min_seconds: float = Field(0.25, gt=0)


class DSCNN(Rung):
    channels: int = Field(gt=0)
    blocks: int = Field(gt=0)
    classes: int = Field(12, gt=1)
    train_samples: int = Field(gt=0)
    epochs: float = Field(gt=0)
    max_latency_ms: float = Field(gt=0)


class CNNTrain(Rung):
    in_hw: tuple[int, int]
    in_ch: int = Field(gt=0)
    widths: list[int] = Field(min_length=1)
    convs_per_stage: int = Field(1, gt=0)
    fc: list[int] = Field(default_factory=lambda: [128])
    classes: int = Field(10, gt=1)
    samples: int = Field(gt=0)
    epochs: float = Field(gt=0)
    batch: int = Field(gt=0)
    test_samples: int = Field(10_000, ge=0)   # the test split loaded beside them (MNIST's, CIFAR-10's: 10,000)


class LSTMTrain(Rung):
    vocab: int = Field(gt=0)
    embed: int = Field(gt=0)
    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)
    batch: int = Field(gt=0)
    seq: int = Field(gt=0)
    steps: int = Field(gt=0)


class GPTShaped(Rung):
    vocab_size: int = Field(gt=0)
    block_size: int = Field(gt=0)
    n_layer: int = Field(gt=0)
    n_head: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    bias: bool = True                  # llama: biases on q, k, v (Qwen2)
    # a pretrained model's own shape (its config.json); None: GPT-2's (models/costs.py GPTShape)
    arch: Literal["gpt2", "llama"] | None = None
    n_kv_head: int | None = Field(None, gt=0)    # grouped-query attention
    ffn_hidden: int | None = Field(None, gt=0)   # the SwiGLU width
    tied: bool | None = None                     # lm_head shares the embedding (None: yes)
    lora_rank: int | None = Field(None, ge=0)    # 0 / None: full fine-tuning; > 0: LoRA adapters only

    @model_validator(mode="after")
    def _heads_divide(self) -> GPTShaped:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        return self

    def shape(self) -> Any:
        """The cost model's view of it: models.costs.GPTShape."""
        from models.costs import GPTShape

        return GPTShape(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd, self.bias,
                        self.tied is not False, self.arch or "gpt2", self.n_kv_head, self.ffn_hidden)


class GPTTrain(GPTShaped):
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(1, gt=0)
    steps: int = Field(gt=0)
    framework: Literal["numpy", "torch"] = "torch"
    init: str = "scratch"              # or "pretrained", "your B12 model": same cost either way
    # loss estimates while training, priced when given (None: the milestone's own, too small to price):
    eval_interval: int | None = Field(None, ge=0)   # every this many steps, and at the end (0: only at the end)
    eval_iters: int | None = Field(None, gt=0)      # batches per split
    eval_splits: int | None = Field(None, gt=0)     # the splits scored (B12: training and held-out text)


class DPO(GPTShaped):
    pairs: int = Field(gt=0)
    seq: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    epochs: float = Field(1, gt=0)


class QuantLab(GPTShaped):
    eval_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)


class GPTInfer(GPTShaped):
    ctx: int = Field(gt=0)
    prompt_tokens: int = Field(ge=0)
    new_tokens: int = Field(gt=0)
    requests: int = Field(1, gt=0)
    min_tokens_per_s: float = Field(0, ge=0)
    dtype: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"


class VectorSearch(Rung):
    n: int = Field(gt=0)
    dim: int = Field(gt=0)
    queries: int = Field(gt=0)
    dtype: Literal["float32", "float16"] = "float32"
    embed_texts: int = Field(0, ge=0)      # texts the sentence encoder (MiniLM) embeds first; 0: none
    embed_tokens: float = Field(0, ge=0)   # their mean length in tokens, [CLS] and [SEP] included
    tsne: int = Field(0, ge=0)             # points in a t-SNE map; 0: none


class GGUF(Rung):
    model: str                         # a registry GGUF (its quantisation is in its name), or b12
    quant: str | None = None           # None: read from the name
    ctx: int = Field(gt=0)
    prompt_tokens: int = Field(ge=0)
    new_tokens: int = Field(gt=0)
    requests: int = Field(1, gt=0)
    min_tokens_per_s: float = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _quant_from_name(cls, v: Any) -> Any:
        from models.costs import gguf_family

        found = gguf_family(v["model"]) if isinstance(v, dict) and isinstance(v.get("model"), str) else None
        return {**v, "quant": found[1]} if found and v.get("quant") is None else v

    @model_validator(mode="after")
    def _known_model(self) -> GGUF:
        from models.costs import GGUF_BYTES_PER_PARAM, GGUF_MODELS, gguf_family

        found = gguf_family(self.model)
        if self.model in OWN_MODELS and self.model in GGUF_MODELS:
            found = (self.model, self.quant)
        elif found is None:
            raise ValueError(f"unknown GGUF model {self.model!r}: a registry name ending in its quantisation "
                             f"(-q4_k_m, -q8_0, ...) of one of {', '.join(GGUF_MODELS)}")
        if self.quant not in GGUF_BYTES_PER_PARAM or self.quant != found[1]:
            raise ValueError(f"quant {self.quant!r} does not match the model {self.model!r}; "
                             f"known: {', '.join(GGUF_BYTES_PER_PARAM)}")
        return self

    @property
    def family(self) -> str:
        """The model's entry in models.costs.GGUF_MODELS."""
        from models.costs import gguf_family

        found = gguf_family(self.model)
        return found[0] if found else self.model


class GenTrain(Rung):
    """A generative image model: a VAE or GAN of MLPs (hidden, latent), or a DDPM U-Net (channels, levels)."""

    kind: Literal["vae", "gan", "ddpm"]
    in_hw: tuple[int, int] = (28, 28)
    in_ch: int = Field(1, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [400])
    latent: int = Field(20, gt=0)
    channels: int = Field(32, gt=0)
    levels: int = Field(3, gt=0)
    res_blocks: int = Field(2, gt=0)
    timesteps: int = Field(1000, gt=0)         # DDPM: steps to draw one image
    draws: int = Field(64, ge=0)               # DDPM: images drawn at the end
    samples: int = Field(gt=0)
    epochs: float = Field(gt=0)
    batch: int = Field(gt=0)


class EncoderTrain(Rung):
    """ViT (image tower), BERT-mini (text tower, MLM head) or CLIP (both, a shared projection)."""

    image: int | None = Field(None, gt=0)
    patch: int = Field(4, gt=0)
    in_ch: int = Field(3, gt=0)
    classes: int = Field(0, ge=0)              # ViT: a classification head
    text_vocab: int | None = Field(None, gt=0)
    text_ctx: int = Field(64, gt=0)
    mlm: bool = False                          # BERT: predict masked tokens over the vocabulary
    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    heads: int = Field(gt=0)
    proj: int = Field(0, ge=0)                 # CLIP: the joint embedding width
    samples: int = Field(gt=0)
    epochs: float = Field(gt=0)
    batch: int = Field(gt=0)

    @model_validator(mode="after")
    def _a_tower(self) -> EncoderTrain:
        if self.image is None and self.text_vocab is None:
            raise ValueError("an encoder needs an image tower (image) or a text tower (text_vocab), or both")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        return self


class WhisperInfer(Rung):
    hidden: int = Field(384, gt=0)
    enc_layers: int = Field(4, gt=0)
    dec_layers: int = Field(4, gt=0)
    heads: int = Field(6, gt=0)
    clips: int = Field(gt=0)                   # 30 s clips transcribed
    new_tokens: int = Field(gt=0)              # tokens decoded per clip
    dtype: Literal["auto", "fp32", "fp16"] = "auto"


class MoETrain(GPTTrain):
    experts: int = Field(gt=1)
    top_k: int = Field(gt=0)

    @model_validator(mode="after")
    def _k_within(self) -> MoETrain:
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} is more than the {self.experts} experts")
        return self


class SpecDecode(GPTInfer):
    draft_layer: int = Field(gt=0)
    draft_head: int = Field(gt=0)
    draft_embd: int = Field(gt=0)
    k: int = Field(4, gt=0)                    # tokens the draft proposes a round
    accept: float = Field(0.7, ge=0, le=1)     # the chance the target accepts a draft token


class RLTrain(Rung):
    algo: Literal["dqn", "ppo"]
    env: str
    widths: list[int] = Field(min_length=2)
    env_steps: int = Field(gt=0)
    batch: int = Field(gt=0)                   # DQN: transitions an update; PPO: steps a rollout
    replay: int = Field(50_000, gt=0)          # DQN's replay buffer
    epochs: int = Field(4, gt=0)               # PPO: passes over each rollout
    env_step_us: float = Field(20, gt=0)       # one environment step in Python (gymnasium CartPole ~20 us)


class ClassicML(Rung):
    algo: Literal["tree", "forest", "svm"]
    samples: int = Field(gt=1)
    features: int = Field(gt=0)
    trees: int = Field(1, gt=0)
    depth: int = Field(10, gt=0)


# cost model name -> the rung it prices (tiers/fit/pricing/ has one pricer per name)
COST_MODELS: dict[str, type[Rung]] = {
    "probe": Probe, "tabular-q": TabularQ, "bpe": BPE, "skipgram": SkipGram, "mlp-train": MLPTrain,
    "matmul": Matmul, "dscnn": DSCNN, "cnn-train": CNNTrain, "lstm-train": LSTMTrain, "gpt-train": GPTTrain,
    "dpo": DPO, "quant-lab": QuantLab, "gpt-infer": GPTInfer, "vector-search": VectorSearch,
    "gguf-decode": GGUF, "gguf-split": GGUF,
    "embeddings": VectorSearch,    # B3: priced as vector search, calibrated apart from B15 (the key is the name)
    "gen-train": GenTrain, "encoder-train": EncoderTrain, "whisper-infer": WhisperInfer, "moe-train": MoETrain,
    "spec-decode": SpecDecode, "rl-train": RLTrain, "classic-ml": ClassicML,
}


# ---------------------------------------------------------------- a milestone

class TimeBox(_M):
    hours: float | tuple[float, float]
    compute_hours: float | None = Field(None, gt=0)
    estimate: bool = False
    note: str | None = None

    @field_validator("hours")
    @classmethod
    def _positive(cls, v: float | tuple[float, float]) -> float | tuple[float, float]:
        lo, hi = (v, v) if isinstance(v, (int, float)) else v
        if not 0 < lo <= hi:
            raise ValueError("hours must be positive, as a number or [low, high] with low <= high")
        return v

    @property
    def budget_seconds(self) -> float:
        """The most compute time a plan may take."""
        hi = self.hours if isinstance(self.hours, (int, float)) else self.hours[1]
        return 3600 * (self.compute_hours or hi)

    def label(self) -> str:
        h = self.hours
        text = f"{h:g} h" if isinstance(h, (int, float)) else f"{h[0]:g}-{h[1]:g} h"
        if self.compute_hours:
            text += f" (compute up to {self.compute_hours:g} h)"
        return ("~" if self.estimate else "") + text


class BoardNeed(_M):
    min_sram_kb: int = Field(gt=0)
    min_flash_kb: int = Field(gt=0)


class Needs(_M):
    packages: list[str] = Field(default_factory=list)        # import names
    gpu_packages: list[str] = Field(default_factory=list)    # only when the plan runs on a GPU
    gpu: Literal["none", "optional", "required"] = "none"
    gpu_backends: list[Literal["cuda", "rocm", "mps"]] = Field(default_factory=lambda: ["cuda", "rocm", "mps"])
    board: BoardNeed | None = None
    nodes: int = Field(1, ge=1)


class _MilestoneIn(_M):
    id: str = Field(pattern=r"^[A-Z][0-9]{1,2}$")
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    title: str
    phase: str
    time_box: TimeBox
    tiers: list[Literal[0, 1, 2, 3]] | None = Field(None, min_length=1)   # required unless runs_as
    needs: Needs = Field(default_factory=Needs)
    cost: str | None = None            # required unless runs_as names the build milestone it inherits from
    module: str | None = Field(None, pattern=r"^tiers\.tier[0-3]\.[a-z][a-z0-9_]*$")
    defaults: dict[str, Any] = Field(default_factory=dict)
    ladder: list[dict[str, Any]] = Field(default_factory=list)
    notes: str | None = None
    # a build-track milestone this entry is: its cost, needs, ladder and runner, so it plans and runs as that one
    runs_as: str | None = Field(None, pattern=r"^B[0-9]{1,2}$")

    @model_validator(mode="after")
    def _priced(self) -> _MilestoneIn:
        if self.runs_as is None and (self.cost is None or not self.ladder or not self.tiers):
            raise ValueError("tiers, cost and ladder are required (or runs_as: a build milestone to run as)")
        if self.runs_as is not None and (self.ladder or self.module or self.defaults or self.tiers):
            raise ValueError(f"runs_as {self.runs_as} takes its tiers, ladder and module from "
                             f"{self.runs_as}")
        return self

    @field_validator("cost")
    @classmethod
    def _known_cost(cls, v: str | None) -> str | None:
        if v is not None and v not in COST_MODELS:
            raise ValueError(f"unknown cost model {v!r}; known: {', '.join(COST_MODELS)}")
        return v

    @field_validator("tiers")
    @classmethod
    def _unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("a tier is listed twice")
        return v


class _TrackIn(_M):
    title: str
    milestones: list[_MilestoneIn] = Field(min_length=1)


class _CatalogIn(_M):
    schema_: Literal["tierkit/milestones/v1"] = Field(alias="schema")
    extras: dict[str, str] = Field(default_factory=dict)
    tracks: dict[str, _TrackIn] = Field(min_length=1)


@dataclass(frozen=True)
class Milestone:
    """One milestone, validated: what the planner sizes and the runner runs."""

    id: str
    slug: str
    title: str
    phase: str
    track: str
    time_box: TimeBox
    tiers: tuple[int, ...]            # in preference order
    needs: Needs
    cost: str                         # the cost model (and the calibration's workload name)
    ladder: tuple[Rung, ...]          # smallest to largest
    notes: str | None = None
    module: str | None = None         # the file `tierkit run` imports (Config + run); None: planned only
    runs_as: str | None = None        # the build milestone it is (`tierkit run` that one); None: its own

    def packages(self, gpu: bool) -> list[str]:
        """The import names it needs: its packages, plus its GPU packages when it runs on a GPU."""
        return list(dict.fromkeys([*self.needs.packages, *(self.needs.gpu_packages if gpu else [])]))

    def missing(self, gpu: bool) -> list[str]:
        """What is not installed here to run it (on a GPU or not): import names, in the catalog's order."""
        out = []
        for name in self.packages(gpu):
            try:
                if importlib.util.find_spec(name) is None:
                    out.append(name)
            except (ImportError, ValueError):
                out.append(name)
        return out

    @property
    def artifacts(self) -> tuple[str, ...]:
        """Every registry artifact some size of its ladder needs."""
        return tuple(dict.fromkeys(a for r in self.ladder for a in r.artifacts))

    def rung(self, size: str) -> Rung:
        for r in self.ladder:
            if r.size == size:
                return r
        raise CatalogError(f"{self.id} has no size {size!r}; sizes: {', '.join(r.size for r in self.ladder)}")


@dataclass(frozen=True)
class Track:
    name: str
    title: str
    milestones: tuple[Milestone, ...]


@dataclass(frozen=True)
class Catalog:
    tracks: dict[str, Track]
    extras: dict[str, str]            # import name -> pip extra

    def track(self, name: str = DEFAULT_TRACK) -> Track:
        try:
            return self.tracks[name]
        except KeyError:
            raise CatalogError(f"no track {name!r}; tracks: {', '.join(self.tracks)}") from None

    def get(self, milestone: str, track: str = DEFAULT_TRACK) -> Milestone:
        t = self.track(track)
        key = milestone.strip().upper()
        for m in t.milestones:
            if m.id == key:
                return m
        raise CatalogError(f"no milestone {milestone!r} in track {track}; "
                           f"milestones: {', '.join(m.id for m in t.milestones)}")

    def install_hints(self, packages: list[str]) -> str:
        """'pip install ...' for each package, joined: what to run to get them."""
        return "; ".join(sorted({self.install_hint(p) for p in packages}))

    def install_hint(self, package: str) -> str:
        extra = self.extras.get(package)
        if extra in (None, "base"):
            return "pip install -e ." if extra == "base" else f"pip install {package}"
        return f"pip install 'tierkit[{extra}]'"


# ---------------------------------------------------------------- loading

def parse(data: Any, origin: str = "milestones.yaml") -> Catalog:
    """Validate parsed YAML into a Catalog; CatalogError with one line on the first problem."""
    fix = "fix the file (see the comments at its top)"
    if not isinstance(data, dict):
        raise CatalogError(f"{origin}: expected a mapping with 'schema: {SCHEMA}'; {fix}")
    try:
        raw = _CatalogIn.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(f"{origin}: {one_line(exc)}; {fix}") from None
    tracks: dict[str, Track] = {}
    for tname, t in raw.tracks.items():
        seen: set[str] = set()
        milestones = []
        for i, m in enumerate(t.milestones):
            where = ("tracks", tname, "milestones", i)
            if m.id in seen:
                raise CatalogError(f"{origin}: {field_path(where)}: milestone {m.id} is listed twice; {fix}")
            seen.add(m.id)
            if m.runs_as is not None:
                milestones.append(_runs_as(m, tracks, where, origin, tname))
                continue
            kind = COST_MODELS[str(m.cost)]
            rungs = []
            for j, entry in enumerate(m.ladder):
                try:
                    rungs.append(kind.model_validate({**m.defaults, **entry}))
                except ValidationError as exc:
                    line = one_line(exc, where + ("ladder", j))
                    raise CatalogError(f"{origin}: {line} ({m.id}, cost model {m.cost}); {fix}") from None
            sizes = [r.size for r in rungs]
            if len(set(sizes)) != len(sizes):
                raise CatalogError(f"{origin}: {field_path(where)}: {m.id} has a size label twice; {fix}")
            tiers = m.tiers or []        # set: _priced checked it
            if 0 in tiers and m.needs.board is None:
                raise CatalogError(f"{origin}: {field_path(where)}: {m.id} runs on tier 0 but needs no board; {fix}")
            milestones.append(Milestone(id=m.id, slug=m.slug, title=m.title, phase=m.phase, track=tname,
                                        time_box=m.time_box, tiers=tuple(tiers), needs=m.needs, cost=str(m.cost),
                                        ladder=tuple(rungs), notes=m.notes, module=m.module))
        tracks[tname] = Track(tname, t.title, tuple(milestones))
    if DEFAULT_TRACK not in tracks:
        raise CatalogError(f"{origin}: tracks: the default track {DEFAULT_TRACK!r} is missing; {fix}")
    return Catalog(tracks=tracks, extras=dict(raw.extras))


def _runs_as(m: _MilestoneIn, tracks: dict[str, Track], where: tuple, origin: str, tname: str) -> Milestone:
    """An entry that is a build milestone: its cost, tiers, needs and ladder, under this track's title and time box.

    The build track comes first in the file, so the milestone it names is already read.
    """
    build = {b.id: b for b in tracks[DEFAULT_TRACK].milestones} if DEFAULT_TRACK in tracks else {}
    b = build.get(str(m.runs_as))
    if b is None or (m.cost is not None and m.cost != b.cost):
        why = "is not a build milestone" if b is None else f"is priced by {b.cost}, not {m.cost}"
        raise CatalogError(f"{origin}: {field_path(where)}: runs_as {m.runs_as} {why}; "
                           "fix the file (see the comments at its top)")
    return Milestone(id=m.id, slug=m.slug, title=m.title, phase=m.phase, track=tname, time_box=m.time_box,
                     tiers=b.tiers, needs=b.needs, cost=b.cost, ladder=b.ladder, notes=m.notes, module=b.module,
                     runs_as=b.id)


def load(path: str | Path | None = None) -> Catalog:
    """The catalog at `path` (default: the packaged tiers/milestones.yaml, read once)."""
    if path is None:
        return _default()
    return _load(Path(path))


@functools.lru_cache(maxsize=1)
def _default() -> Catalog:
    return _load(DEFAULT_PATH)


def _load(p: Path) -> Catalog:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{p}: cannot read the milestone catalog ({exc.strerror or exc}); "
                           "reinstall tierkit or pass a readable file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{p}: {yaml_problem(exc)}; fix the file") from None
    return parse(data, str(p))


# ---------------------------------------------------------------- shortcuts

def tracks() -> list[str]:
    return list(load().tracks)


def track(name: str = DEFAULT_TRACK) -> list[Milestone]:
    return list(load().track(name).milestones)


def get(milestone: str, track: str = DEFAULT_TRACK) -> Milestone:
    """A milestone by id ('B12', 'b12'), from the packaged catalog."""
    return load().get(milestone, track)
