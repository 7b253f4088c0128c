"""The registry of models and data sets: where each comes from, where it lives here, how to fetch it.

    tierkit data list [--json]         models and data sets, and what is here already
    tierkit data fetch NAME [--url U]  download, verify the sha256, write atomically, resume
    tierkit data path NAME             where it is (one line naming the fetch if it is not)

    data.require(name) -> Path         a model's snapshot folder (for from_pretrained), a GGUF file,
                                       a data set's folder or file; DataError naming the fetch if missing
    data.locate(name)  -> Path | None  the same, without raising: no network, no huggingface_hub import
    data.get(name)     -> the entry    .name .title .licence .homepage .size .kind ("model" | "gguf" | "data")

Hugging Face entries live in the user's HF cache ($HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub), fetched with huggingface_hub:
what transformers or llama.cpp downloaded is found, what tierkit fetched they
find (tiers.data.hub). The rest is fetched by tierkit itself, as below.

Look-up order for a data set: an explicit path (a function argument), then
`$TIERKIT_DATA`, then the cache `~/.cache/tierkit`, then where a system package
installs it (Debian's `dataset-fashion-mnist`). `fetch` writes to `$TIERKIT_DATA`
when it is set, else to the cache. Nothing else in tierkit downloads: a command
that lacks data says which `tierkit data fetch` to run, or uses its embedded
fallback and says so.

Downloads stream into `<file>.part`; only a file whose size and sha256 match is
renamed to its real name, so a wrong checksum or an interruption never leaves a
file that looks valid. An interrupted `.part` is resumed with an HTTP Range
request; a checksum mismatch deletes it. `TIERKIT_DATA_URL` (or `--url`) replaces
the origin: each file is then fetched from `<url>/<its local path>`, which is how
the tests point the registry at a loopback server.

Errors are `DataError`; str() is one line naming the data set and what to do.
"""
from __future__ import annotations

from tiers.data.artifacts import Entry, HubArtifact, hub_cache
from tiers.data.registry import REGISTRY, DataError, Dataset, Remote, get
from tiers.data.store import (
    cache_dir,
    data_root,
    fetch,
    fetch_file,
    find_file,
    locate,
    missing_message,
    require,
    roots,
)

# The image readers need numpy: loaded on first use, so `tierkit fit` (which looks entries up) stays light.
_IMAGES = ("Images", "Split", "load_idx_splits", "load_images", "pixels", "read_idx", "sklearn_digits")


def __getattr__(name: str):
    if name in _IMAGES:
        from tiers.data import images

        return getattr(images, name)
    raise AttributeError(f"module 'tiers.data' has no attribute {name!r}")

__all__ = [
    "REGISTRY",
    "DataError",
    "Dataset",
    "Entry",
    "HubArtifact",
    "Images",
    "Remote",
    "Split",
    "cache_dir",
    "data_root",
    "fetch",
    "fetch_file",
    "find_file",
    "get",
    "hub_cache",
    "load_idx_splits",
    "load_images",
    "locate",
    "missing_message",
    "pixels",
    "read_idx",
    "require",
    "roots",
    "sklearn_digits",
]
