"""namm: Neural Attention Memory Models, a learned, evolved KV-cache memory for transformers decoders.

>>> model, tok = namm.load_model("smollm2-135m")
>>> out = namm.generate(model, tok, "The pass key is 4821. What is the pass key?", policy=namm.policies.H2O(budget=256))

The top-level names are imported on first use (PEP 562), so ``import namm`` and the command line's
``--help`` do not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from namm.errors import NammError

#: public name -> the module defining it
_LAZY = {
    "GenerationResult": "namm.engine",
    "GenerationStats": "namm.engine",
    "generate": "namm.engine",
    "MemoryCache": "namm.cache",
    "NAMM": "namm.memory",
    "NAMMConfig": "namm.memory",
    "enable": "namm.attention",
    "load_model": "namm.models",
    "make_policy": "namm.policies",
    "register_policy": "namm.policies",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from namm import policies
    from namm.attention import enable
    from namm.cache import MemoryCache
    from namm.engine import GenerationResult, GenerationStats, generate
    from namm.memory import NAMM, NAMMConfig
    from namm.models import load_model
    from namm.policies import make_policy, register_policy


def __getattr__(name: str) -> Any:
    if name == "policies":
        return importlib.import_module("namm.policies")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'namm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "policies"})


__all__ = [
    "GenerationResult",
    "GenerationStats",
    "MemoryCache",
    "NAMM",
    "NAMMConfig",
    "NammError",
    "enable",
    "generate",
    "load_model",
    "make_policy",
    "policies",
    "register_policy",
]
__version__ = "0.1.0"
