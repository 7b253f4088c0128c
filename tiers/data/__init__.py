"""The dataset registry: where each data set comes from, where it lives here, how to fetch it.

    tierkit data list                  what the registry knows, and what is here already
    tierkit data fetch NAME [--url U]  download, verify the sha256, write atomically, resume
    tierkit data path NAME             where a data set is (one line naming the fetch if it is not)

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

from tiers.data.images import Images, Split, load_idx_splits, load_images, pixels, read_idx, sklearn_digits
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

__all__ = [
    "REGISTRY",
    "DataError",
    "Dataset",
    "Images",
    "Remote",
    "Split",
    "cache_dir",
    "data_root",
    "fetch",
    "fetch_file",
    "find_file",
    "get",
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
