"""What an agent tells others about its node: a small summary (GET /v1/profile) and its mDNS TXT record.

    summarize(profile, name, budget) -> {"name", "cpu", "threads", "memory_available_bytes", "gpus",
                                         "memory_budget_bytes", "engines", ...}
    txt_properties(summary)          -> {"cpu", "mem_gb", "gpu", "budget_gb", "engines", ...}  (short strings)

The summary carries the few numbers a head needs to place layers; the TXT
record a glance at the node before anyone connects.
"""
from __future__ import annotations

from typing import Any

from inventory import __version__
from inventory.profile import Profile
from tiers.tier3.engines import ENGINES


def summarize(profile: Profile, name: str, memory_budget: int | None = None) -> dict[str, Any]:
    """The few numbers a head needs to place layers, in one small dict.

    Available memory is read now rather than from the profile: the head splits
    the model by free memory at launch time, not at probe time.
    """
    cpu = profile.cpu
    mem = profile.memory
    available = mem.available_bytes if mem else None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported: keep the probed figure
        pass
    return {
        "name": name,
        "version": __version__,
        "cpu": cpu.model if cpu else None,
        "physical_cores": cpu.physical_cores if cpu else None,
        "threads": cpu.threads if cpu else None,
        "cpu_matmul_gflops_fp32": cpu.matmul_gflops["fp32"].value if cpu and "fp32" in cpu.matmul_gflops else None,
        "memory_bandwidth_gbs": cpu.memory_bandwidth_gbs.value if cpu and cpu.memory_bandwidth_gbs else None,
        "memory_total_bytes": mem.total_bytes if mem else None,
        "memory_available_bytes": available,
        "gpus": [{"model": g.model, "backend": g.backend, "memory_bytes": g.memory_bytes,
                  "memory_free_bytes": g.memory_free_bytes, "unified_memory": g.unified_memory}
                 for g in profile.gpus],
        "boards": len(profile.boards),
        # What this node lets placement use (--memory-budget), when the user capped it.
        "memory_budget_bytes": memory_budget,
        "engines": list(ENGINES),
    }


def txt_properties(summary: dict[str, Any]) -> dict[str, str]:
    """mDNS TXT record: a glance at the node before anyone connects (kept short: TXT has ~1300 bytes)."""
    mem = summary.get("memory_total_bytes")
    gpus = summary.get("gpus") or []
    return {
        "version": str(summary.get("version", "")),
        "cpu": str(summary.get("cpu") or "")[:60],
        "threads": str(summary.get("threads") or ""),
        "mem_gb": f"{mem / 2**30:.1f}" if mem else "",
        "gpu": ", ".join(str(g["model"]) for g in gpus)[:80],
        "budget_gb": f"{summary['memory_budget_bytes'] / 2**30:.3f}" if summary.get("memory_budget_bytes") else "",
        "engines": ",".join(summary.get("engines") or []),
    }
