"""namm: Neural Attention Memory Models, a learned, evolved KV-cache memory for transformers decoders.

>>> model, tok = namm.load_model("smollm2-135m")
>>> out = namm.generate(model, tok, prompt, policy=namm.policies.H2O(budget=256))
"""

from namm import policies
from namm.attention import enable
from namm.cache import MemoryCache
from namm.engine import GenerationResult, GenerationStats, generate
from namm.errors import NammError
from namm.memory import NAMM, NAMMConfig
from namm.models import load_model
from namm.policies import make_policy, register_policy

register_policy(NAMM)

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
]
__version__ = "0.1.0"
