"""tiers.config.build: a milestone's typed Config from the planned size plus --set, checked before the run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest
from annotated_types import Gt

from tiers.catalog import track
from tiers.config import ConfigError, build, names
from tiers.runner import REGISTRY, resolve


@dataclass
class Config:
    steps: Annotated[int, Gt(0)] = 2000
    lr: Annotated[float, Gt(0)] = 1e-3
    arch: Literal["llama", "gpt2"] = "llama"
    widths: list[int] = field(default_factory=lambda: [784, 10])
    top_p: Annotated[float, Gt(0)] | None = None
    prompt: str = "\n"


def test_rung_values_then_overrides_with_yaml_numbers():
    cfg = build(Config, {"steps": 10, "workload": "gpt-train", "summary": "x"}, {"lr": "3e-4", "steps": "1e9"})
    assert cfg == Config(steps=1_000_000_000, lr=3e-4)
    assert build(Config, {}, {"steps": 1.0e3, "widths": [8, 4, 2], "top_p": 0.9}).steps == 1000


@pytest.mark.parametrize("overrides, needles", [
    ({"step": 50}, ["--set step", "did you mean 'steps'", "settings: steps, lr, arch"]),
    ({"nonsense": 1}, ["--set nonsense", "no such setting"]),
    ({"steps": "abc"}, ["--set steps='abc'", "valid integer"]),
    ({"steps": 0}, ["--set steps=0", "greater than 0"]),
    ({"steps": 1.5}, ["--set steps=1.5", "fractional part"]),
    ({"arch": "rnn"}, ["--set arch='rnn'", "'llama' or 'gpt2'"]),
    ({"widths": "wide"}, ["--set widths='wide'", "valid list"]),
])
def test_bad_override_is_one_line(overrides, needles):
    with pytest.raises(ConfigError) as err:
        build(Config, {}, overrides, where="B12")
    msg = str(err.value)
    assert msg.startswith("B12 ") and "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_a_bad_rung_value_names_the_catalog():
    with pytest.raises(ConfigError, match=r"setting steps=-5 \(from the planned size\).*milestones.yaml"):
        build(Config, {"steps": -5}, {})


def test_every_milestone_declares_a_config_that_takes_every_rung():
    """Each registered milestone's Config accepts every size of its ladder, as the planner hands it over."""
    for m in track():
        if m.id not in REGISTRY:
            continue
        _, cls = resolve(m.id)
        assert names(cls), m.id
        for rung in m.ladder:
            build(cls, {"workload": m.cost, **rung.params()}, {}, where=m.id)


@dataclass
class Ranged:
    n_min: Annotated[int, Gt(0)] = 64
    n_max: Annotated[int, Gt(0)] = 1024

    def __post_init__(self) -> None:
        if self.n_min > self.n_max:
            raise ValueError(f"n_min {self.n_min} is above n_max {self.n_max}")


def test_a_check_across_settings_is_one_line_naming_what_was_set():
    with pytest.raises(ConfigError) as err:
        build(Ranged, {"n_min": 64, "n_max": 256}, {"n_min": 512}, where="B5")
    msg = str(err.value)
    assert msg == "B5 settings (--set n_min=512): n_min 512 is above n_max 256", msg
