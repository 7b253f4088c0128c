"""The two kinds of registry entry: a data set tierkit fetches itself, and an artifact on the Hugging Face Hub.

    Dataset(name, ..., files=(Remote(path, urls, size, sha256), ...))   -> our fetcher, under $TIERKIT_DATA
    HubArtifact(name, ..., repo_id, repo_type, revision, files, kind)    -> huggingface_hub, in the user's HF cache

    HF cache:  $HF_HUB_CACHE | $HF_HOME/hub | ~/.cache/huggingface/hub
        models--org--name/refs/main                  -> <sha>
        models--org--name/snapshots/<sha>/<file>     -> ../../blobs/<etag>  (datasets--org--name/... alike)

Why the hub's own cache: a model the user already pulled with transformers or
llama.cpp is found where those tools put it, and a model tierkit fetched is
found by them; nothing is downloaded twice. Both kinds answer the same
questions (.name .title .licence .homepage .size .kind), so the planner and
`tierkit data list` treat them alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["model", "gguf", "data"]


class DataError(Exception):
    """A data set or model is missing or could not be fetched; str() is one line saying what to do."""


@dataclass(frozen=True)
class Remote:
    """One file of a data set: its path under the data root, where to get it, how to check it."""

    path: str                      # relative to the data root, e.g. "mnist/t10k-images-idx3-ubyte.gz"
    urls: tuple[str, ...]          # tried in order
    size: int | None               # bytes, when published
    sha256: str | None             # None: verified by size only (no published checksum found)

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    licence: str
    homepage: str
    files: tuple[Remote, ...]
    folder: str | None = None              # the data set's folder under the root (None: a single file)
    extract: str | None = None             # archives unpack into this folder under the root
    system_dirs: tuple[str, ...] = ()      # where an OS package installs the same files (names only matter)
    note: str = ""
    kind: Kind = "data"

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]

    @property
    def checksum(self) -> str:
        known = sum(f.sha256 is not None for f in self.files)
        return "sha256" if known == len(self.files) else "size only" if known == 0 else "sha256 (some files: size only)"

    def target(self, root: Path) -> Path:
        """What `tierkit data path` prints for this root: the folder, the extracted folder, or the one file."""
        if self.extract:
            return root / self.extract
        return root / self.folder if self.folder else root / self.files[0].path


# A model snapshot is usable when it has these (each "a|b" is satisfied by either); a sharded
# checkpoint's index must also find every shard it names (checked in tiers.data.hub).
MODEL_NEEDS = ("config.json", "*.safetensors", "tokenizer.json|vocab.json|tokenizer.model")


@dataclass(frozen=True)
class HubArtifact:
    """A model, GGUF file or data set in a Hugging Face repository, fetched with huggingface_hub."""

    name: str
    title: str
    licence: str
    homepage: str                          # the model card: its licence and, when gated, where to accept it
    repo_id: str                           # "org/name"
    kind: Kind
    files: tuple[str, ...]                 # what fetch downloads: file names or allow-patterns ("*.safetensors")
    size: int | None                       # bytes of those files, as the hub lists them (None: not confirmed)
    repo_type: Literal["model", "dataset"] = "model"
    revision: str = "main"                 # a commit sha where one is confirmed, else a branch
    gated: bool = False                    # the repo asks the user to accept a licence (HF_TOKEN needed)
    sha256: tuple[tuple[str, str], ...] = ()  # (file, sha256) where published; LFS files also carry it as their etag
    target: str | None = None              # the file `path` names (None: the snapshot folder)
    needs: tuple[str, ...] = ()            # what a snapshot must hold to count as here (default: see `required`)
    note: str = ""

    @property
    def checksum(self) -> str:
        return "sha256" if self.sha256 else "hub sha256"

    @property
    def required(self) -> tuple[str, ...]:
        if self.needs:
            return self.needs
        return MODEL_NEEDS if self.kind == "model" else self.files

    @property
    def folder(self) -> str:
        """The repository's folder in the hub cache: models--org--name or datasets--org--name."""
        return f"{self.repo_type}s--{self.repo_id.replace('/', '--')}"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"


Entry = Dataset | HubArtifact


def hub_cache() -> Path:
    """The user's Hugging Face hub cache, read now (as huggingface_hub reads it at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base.expanduser() / "huggingface" / "hub"
