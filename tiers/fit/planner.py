"""The planner: for each milestone, the largest size that fits this kit, and why not when none does.

    fit(profile, milestone):
        for each device the milestone's tiers could use here (targets.py):
            for each size on its ladder:
                price it (pricing/), correct it by past runs (calibration.py),
                check memory with headroom, limits and the time box (rules.py)
        choose: a device where something fits > one whose packages are installed
                > the largest size > the tiers' order of preference
        packages missing here: it fits all the same, with "install first: ..." in its notes
        nothing fits: say what does not, and which reference kit it would fit on
        the chosen size's artifacts (artifacts.py): the registry models and data sets it
        needs, whether they are here, and "fetch first: ..." when not (it fits all the same)

    fit_all(profile, track) -> [fit(profile, m) for m in the track]

Plain arithmetic over plain data: no framework is imported here, and packages
are looked up with importlib.util.find_spec (Milestone.missing), never imported.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from pydantic import ValidationError

from inventory.kits import reference_names, reference_profile
from inventory.profile import Profile
from tiers import catalog
from tiers.catalog import Milestone, Rung
from tiers.config import expected
from tiers.fit.artifacts import fetch_line, needs
from tiers.fit.calibration import calibration
from tiers.fit.pricing import PRICERS, Priced
from tiers.fit.rules import Check, install_note, pool_check, time_check
from tiers.fit.targets import Target, targets
from tiers.plan import Plan, Prediction


class FitError(Exception):
    """A request the planner cannot answer (unknown size, a tier the milestone lacks); one line."""


# ---------------------------------------------------------------- sizing

@dataclass
class Sized:
    rung: Rung
    priced: Priced
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def tight(self) -> bool:
        return self.ok and any(c.tight for c in self.checks)

    def failing(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def size_on(p: Profile, m: Milestone, t: Target, rung: Rung, waive: frozenset[str] = frozenset()) -> Sized:
    """Price one rung on one device, correct it by calibration, and check every limit.

    waive: the kinds of check to pass all the same (`run --force`: "time", "limit"; with
    --force-memory also "pool", "memory"): such a check stays in the plan, marked tight.
    """
    priced = PRICERS[m.cost](rung, t, p, m)
    ft, fm, lines = calibration(p, m.cost, t.device)
    if fm != 1.0:
        priced.peak_bytes *= fm
        # re-check the device's pool at the corrected figure
        priced.checks = [pool_check(t, priced.peak_bytes) if c.kind == "pool" else c for c in priced.checks]
    priced.seconds *= ft
    priced.basis += lines
    checks = [*priced.checks, time_check(priced.seconds, m)]
    checks = [Check(c.what, True, True, f"{c.text}: run all the same (forced)", c.kind)
              if not c.ok and c.kind in waive else c for c in checks]
    return Sized(rung, priced, checks)


def with_settings(rung: Rung, overrides: dict | None) -> Rung:
    """The rung with the settings it prices by replaced (`run --set steps=2`); others are the runner's own.

    Only the cost model's parameters (a Rung subclass's fields) are priced: the label, and the
    model and data names a run may replace by a local stand-in, stay as the ladder has them.
    """
    known = {k: v for k, v in (overrides or {}).items()
             if k in type(rung).model_fields and k not in Rung.model_fields}
    if not known:
        return rung
    try:
        return type(rung).model_validate({**rung.model_dump(), **known})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        raise FitError(f"--set {key}={known.get(key)!r}: {expected(err)}") from None


@dataclass
class _Option:
    target: Target
    missing: list[str]
    sized: list[Sized]

    @property
    def best(self) -> int:
        """Index of the largest rung that fits, -1 if none."""
        return max((i for i, s in enumerate(self.sized) if s.ok), default=-1)


# ---------------------------------------------------------------- planning

def _milestone(milestone: Milestone | str, track: str) -> Milestone:
    if isinstance(milestone, Milestone):
        return milestone
    try:
        return catalog.get(milestone, track)
    except catalog.CatalogError as exc:
        raise FitError(str(exc)) from None


def _packaged(m: Milestone) -> bool:
    """Whether m is the packaged catalog's own (so reference kits can be asked about it by id)."""
    try:
        return catalog.get(m.id, m.track) == m
    except catalog.CatalogError:
        return False


def _rungs(m: Milestone, size: str | None, tier: int | None) -> tuple[Rung, ...]:
    """The sizes to try: the whole ladder, or the one asked for."""
    if tier is not None and tier not in m.tiers:
        raise FitError(f"{m.id} runs on tier(s) {', '.join(map(str, m.tiers))}, not tier {tier}")
    if size is None:
        return m.ladder
    try:
        return (m.rung(size),)
    except catalog.CatalogError as exc:
        raise FitError(str(exc)) from None


def fit(profile: Profile, milestone: Milestone | str, *, track: str = catalog.DEFAULT_TRACK,
        check_packages: bool = True, size: str | None = None, tier: int | None = None,
        suggest: bool = True, overrides: dict | None = None, waive: frozenset[str] = frozenset()) -> Plan:
    """Plan one milestone on one profile.

    check_packages: judge the milestone's Python packages by this machine (True for
    the live, probed profile; False for a reference kit, which is not this machine).
    size / tier: force a rung of the ladder / a tier (FitError if the milestone has none such).
    suggest: when nothing fits, name the reference kits on which it would.
    overrides: settings that change what is priced (`run --set steps=2`), applied to every rung tried.
    waive: the kinds of check a forced run passes all the same (size_on).
    """
    m = _milestone(milestone, track)
    rungs = tuple(with_settings(r, overrides) for r in _rungs(m, size, tier))
    found, blocked = targets(profile, m)
    if tier is not None:
        found = [t for t in found if t.tier == tier]
    options = [_Option(t, m.missing(t.gpu) if check_packages else [],
                       [size_on(profile, m, t, r, waive) for r in rungs]) for t in found]
    # Prefer a device where something fits, then one whose packages are installed, then the
    # largest size, then the tiers' order of preference.
    ranked = sorted(enumerate(options), key=lambda io: (io[1].best >= 0, not io[1].missing, io[1].best, -io[0]),
                    reverse=True)
    if ranked and ranked[0][1].best >= 0:
        return _fitting(profile, m, ranked[0][1])
    return _nothing_fits(profile, m, options, blocked, size=size, tier=tier, suggest=suggest)


def _plan(profile: Profile, m: Milestone, t: Target | None, s: Sized | None, verdict: str, reasons: list[str],
          sized: bool) -> Plan:
    """sized: s is the chosen size (its config goes to the runner); else s only shows what was tried."""
    box = f"time box: {m.time_box.label()}" + (" (our estimate)" if m.time_box.estimate else "") \
        + (f"; {m.time_box.note}" if m.time_box.note else "")
    pred = None if s is None else Prediction(s.priced.peak_bytes, s.priced.seconds,
                                             [f"device: {t.label}; {t.memory_basis}", box, *s.priced.basis],
                                             s.priced.bound)  # type: ignore[arg-type]
    config = {"workload": m.cost, **s.rung.params(), **s.priced.config,
              "summary": s.priced.summary} if s is not None and sized else {}
    arts = needs(s.rung) if s is not None and sized else []
    missing = [a for a in arts if not a.here]
    if missing:  # it fits the hardware all the same: the note says what to fetch before running it
        reasons = [f"fetch first: {fetch_line(missing)}", *reasons]
    return Plan(milestone=m.id, slug=m.slug, title=m.title, tier=t.tier if t else m.tiers[0],
                device=t.device if t else "-", size=s.rung.size if s is not None and sized else None,
                config=config, prediction=pred, verdict=verdict,  # type: ignore[arg-type]
                reasons=reasons, profile=profile.name, artifacts=arts)


def _fitting(profile: Profile, m: Milestone, opt: _Option) -> Plan:
    """The largest size that fits on the chosen device: what is tight, what stops the next size up."""
    chosen = opt.sized[opt.best]
    reasons = [c.text for c in chosen.checks if c.tight]
    if opt.best + 1 < len(opt.sized):
        nxt = opt.sized[opt.best + 1]
        reasons.append(f"next size up ({nxt.rung.size}) does not fit: "
                       + "; ".join(c.text for c in nxt.failing()))
    if opt.missing:  # it fits the hardware: the note says what to install before running it
        reasons = [install_note(opt.missing, catalog.load().extras), *reasons]
    return _plan(profile, m, opt.target, chosen, "tight" if chosen.tight else "fits", reasons, True)


def _nothing_fits(profile: Profile, m: Milestone, options: list[_Option], blocked: list[str], *,
                  size: str | None, tier: int | None, suggest: bool) -> Plan:
    """Say what does not fit, and what hardware would."""
    reasons = [f"{m.id} {r}" for r in blocked]
    if tier is not None and not options:
        kind = {0: "microcontroller board", 1: "CPU", 2: "GPU", 3: "cluster of nodes"}[tier]
        reasons.insert(0, f"{m.id}: this profile has no {kind} for tier {tier}")
    first = options[0].sized[0] if options else None
    if options:
        t = options[0].target
        what = "at size " + first.rung.size if size else f"even at its smallest size ({first.rung.size})"
        reasons.append(f"{m.id} does not fit {t.device} {what}: " + "; ".join(c.text for c in first.failing()))
    if suggest and _packaged(m):
        kits = [k for k in fitting_reference_kits(m.track, m.id, size, tier) if k != profile.name]
        if kits:
            hint = f"try `--profile {kits[0]}`" + (f" (also fits: {', '.join(kits[1:4])})" if len(kits) > 1 else "")
            if reasons:
                reasons[0] += f", or {hint}"
            else:
                reasons.append(hint)
        elif not blocked:
            reasons.append(f"no reference kit fits {m.id} either")
    if not reasons:
        reasons.append(f"{m.id}: no device on this profile can run tier(s) {', '.join(map(str, m.tiers))}")
    return _plan(profile, m, options[0].target if options else None, first, "no", reasons, False)


def fit_all(profile: Profile, track: str = catalog.DEFAULT_TRACK, *, check_packages: bool = True,
            suggest: bool = True) -> list[Plan]:
    """Plan every milestone of a track on one profile."""
    try:
        milestones = catalog.track(track)
    except catalog.CatalogError as exc:
        raise FitError(str(exc)) from None
    return [fit(profile, m, check_packages=check_packages, suggest=suggest) for m in milestones]


@functools.cache
def fitting_reference_kits(track: str, milestone: str, size: str | None = None,
                           tier: int | None = None) -> tuple[str, ...]:
    """Reference kits on which a milestone fits (to say what hardware would): roomy ones first."""
    verdicts = {}
    for name in reference_names():
        plan = fit(reference_profile(name), milestone, track=track, check_packages=False, size=size, tier=tier,
                   suggest=False)
        verdicts[name] = plan.verdict
    return tuple(sorted((n for n, v in verdicts.items() if v != "no"), key=lambda n: verdicts[n] == "tight"))
