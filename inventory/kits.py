"""The reference kits: profiles of hardware the user may not own, shipped in profiles/.

    reference_names()            -> ['apple-m2-16gb', ..., 'two-node-lan']
    reference_profile('laptop-8gb-cpu') -> Profile          (parsed once, then cached)
    resolve_profile('laptop-8gb-cpu' | 'my.yaml') -> (Profile, is_reference_kit)

A kit is an ordinary profile file whose figures say they come from a datasheet,
so `tierkit fit --profile NAME` answers "would this fit on that machine?" with the
same planner that answers for the probed one. The kits are read with libyaml's
parser when it is present: `fit --all-profiles` reads every kit, and the
pure-Python parser is 5-10x slower.
"""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

from inventory import profile as prof
from inventory.profile import Profile, ProfileError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


def reference_names() -> list[str]:
    return sorted(f.stem for f in PROFILES_DIR.glob("*.yaml"))


def _read_profile(path: Path) -> Profile:
    """inventory.profile.load, with libyaml's parser when present (5-10x faster than pure Python)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return prof.load(path)          # its one-line errors for missing, unreadable, not text, ...
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is None:
        return prof.loads(text, str(path))
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError:
        return prof.loads(text, str(path))  # the pure-Python parser words the error
    return prof.parse(data, str(path))


@functools.cache
def reference_profile(name: str) -> Profile:
    """A reference kit by name; cached, so callers that change it take a deep copy first."""
    return _read_profile(PROFILES_DIR / f"{name}.yaml")


def resolve_profile(name_or_path: str | Path) -> tuple[Profile, bool]:
    """(profile, is_reference_kit) for a file path or a reference kit's name; ProfileError otherwise."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        is_ref = path.resolve().parent == PROFILES_DIR
        return (reference_profile(path.stem) if is_ref else _read_profile(path)), is_ref
    name = text.removesuffix(".yaml")
    if name in reference_names():
        return reference_profile(name), True
    if path.suffix in (".yaml", ".yml") or "/" in text:
        return _read_profile(path), False       # a missing file: its own one-line error
    raise ProfileError(f"unknown profile {text!r}: pass a profile file or one of the reference kits: "
                       + ", ".join(reference_names()))
