"""Eviction policies. A policy scores cached tokens; :mod:`namm.cache` does the eviction.

``make_policy("h2o", budget=256)`` builds one by name; ``POLICIES`` lists them.
"""

from __future__ import annotations

import dataclasses

from namm.errors import NammError
from namm.policies.allocation import DepthAllocation
from namm.policies.base import ALL_QUERIES, BudgetPolicy, BudgetSchedule, MemoryStep, Policy, Probe, StepRequest
from namm.policies.classic import H2O, Full, L2Norm, Random, SnapKV, StreamingLLM
from namm.policies.distilled import Distilled, DistilledScorer
from namm.policies.peers import TOVA, AdaKV, KVzip, PyramidKV

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Full, StreamingLLM, H2O, L2Norm, SnapKV, Random, TOVA, AdaKV, PyramidKV, KVzip, Distilled)
}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Add a policy class to the registry under ``cls.name``."""
    POLICIES[cls.name] = cls
    return cls


def policy_parameters(cls: type[Policy]) -> dict[str, object]:
    """The constructor parameters of a policy class with their defaults."""
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None)
        for f in dataclasses.fields(cls)
        if f.init
    }


def registered() -> dict[str, type[Policy]]:
    """Every registered policy, the learned NAMM included.

    The NAMM lives in :mod:`namm.memory`, which imports this package (and registers itself when imported);
    this package imports it only here, at call time, so the import graph has no cycle.
    """
    import namm.memory  # noqa: F401, PLC0415 - registers NAMM

    return POLICIES


def make_policy(name: str, **options) -> Policy:
    """Build a policy by registry name, e.g. ``make_policy("snapkv", budget=0.25, window=32)``.

    ``make_policy("namm", checkpoint="smollm2-135m", budget=0.5)`` loads a NAMM checkpoint (the bundled one
    by default; a missing checkpoint is an error naming what is available), never an untrained NAMM.
    """
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"streamingllm": "streaming", "l2norm": "l2", "knorm": "l2"}
    key = aliases.get(key, key)
    if key == "namm":
        from namm.memory import NAMM  # noqa: PLC0415

        unknown = sorted(set(options) - {"checkpoint", "budget"})
        if unknown:
            raise NammError(f"Policy 'namm' has no option(s) {unknown}; its options are: ['budget', 'checkpoint'].")
        return NAMM.from_pretrained(options.get("checkpoint", "smollm2-135m"), budget=options.get("budget"))
    if key not in registered():
        raise NammError(f"Unknown policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}.")
    cls = POLICIES[key]
    params = policy_parameters(cls)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise NammError(f"Policy {key!r} has no option(s) {unknown}; its options are: {sorted(params) or 'none'}.")
    return cls(**options)




__all__ = [
    "ALL_QUERIES",
    "H2O",
    "POLICIES",
    "TOVA",
    "AdaKV",
    "BudgetPolicy",
    "BudgetSchedule",
    "DepthAllocation",
    "Distilled",
    "DistilledScorer",
    "Full",
    "KVzip",
    "L2Norm",
    "MemoryStep",
    "Policy",
    "Probe",
    "PyramidKV",
    "Random",
    "SnapKV",
    "StepRequest",
    "StreamingLLM",
    "make_policy",
    "policy_parameters",
    "register_policy",
    "registered",
]
