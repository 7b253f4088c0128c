"""A milestone's typed configuration, built once and checked before anything runs.

    Config            a dataclass in the milestone's own file: every setting, its default,
                      its type and range (Annotated[int, Gt(0)]), a comment where the why is not obvious
      <- the rung     plan.config: the ladder size the planner picked (keys the Config does not
                      declare are the planner's own notes, such as `workload` or `summary`)
      <- --set        every key must be a field of Config; values are checked like the rung's

    build(Config, plan.config, {"steps": "abc"})
      -> ConfigError("B12 --set steps='abc': must be a valid integer ...")   one line, before the run starts

Values come from YAML (the catalog, `--set KEY=VALUE`), so they are checked the
way YAML means them: `steps=1e9` is a whole number and an integer setting takes
it (PyYAML reads `1e9` as a string, `1.0e9` as a float; both are accepted), while
`steps=1.5` or `steps=abc` is refused with the field's name and what is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

C = TypeVar("C")

_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(Exception):
    """A setting is unknown, of the wrong type or out of range; str() is one line naming it and the fix."""


def names(cls: type) -> list[str]:
    """The settings a Config declares, in their order."""
    return [f.name for f in dataclasses.fields(cls)]


def _number(value: Any) -> Any:
    """'1e9' (how PyYAML reads an exponent without a dot) -> 1e9; anything else unchanged."""
    if isinstance(value, str) and _EXPONENT.match(value.strip()):
        return float(value)
    return value


def _adapter(cls: type) -> TypeAdapter:
    cached = cls.__dict__.get("__tierkit_adapter__")
    if cached is None:
        cached = TypeAdapter(cls)
        setattr(cls, "__tierkit_adapter__", cached)
    return cached


def expected(err: dict[str, Any]) -> str:
    """pydantic's message as a clause: 'must be a valid integer' rather than 'Input should be ...'."""
    msg = str(err.get("msg", "invalid"))
    msg = re.sub(r"^Input should be ", "must be ", msg)
    msg = re.sub(r"^Value error, ", "", msg)
    return msg[:1].lower() + msg[1:]


def build(cls: type[C], base: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, *,
          where: str = "") -> C:
    """`cls` from the rung's values (`base`, undeclared keys ignored) and `overrides` (every key declared).

    `where` names the milestone in messages ("B12"). ConfigError (one line) on the first problem.
    """
    overrides = dict(overrides or {})
    fields = names(cls)
    prefix = f"{where} " if where else ""
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{prefix}--set {key}: no such setting; {hint}settings: {', '.join(fields)}")
    values = {k: _number(v) for k, v in base.items() if k in fields}
    values.update({k: _number(v) for k, v in overrides.items()})
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err.get("loc"):        # a check across fields (n_min <= n_max): name the settings given
            given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            raise ConfigError(f"{prefix}settings" + (f" (--set {given})" if given else "")
                              + f": {expected(err)}") from None
        key = str(err["loc"][0])
        if key in overrides:
            raise ConfigError(f"{prefix}--set {key}={overrides[key]!r}: {expected(err)}") from None
        raise ConfigError(f"{prefix}setting {key}={values.get(key, err.get('input'))!r} (from the planned size): "
                          f"{expected(err)}; fix the ladder in tiers/milestones.yaml") from None


def as_dict(config: Any) -> dict[str, Any]:
    """A built Config as plain data (for metrics.json and the README)."""
    return dataclasses.asdict(config)
