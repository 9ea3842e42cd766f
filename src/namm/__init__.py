"""namm: Neural Attention Memory Models, a learned, evolved KV-cache memory for transformers decoders."""

from namm.errors import NammError
from namm.models import load_model

__all__ = ["NammError", "load_model"]
__version__ = "0.1.0"
