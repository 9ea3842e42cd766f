"""Neural Attention Memory Models: spectrogram features, the BAM scorer and the :class:`NAMM` policy."""

from namm.memory.bam import bam_scores, flatten, param_count, unflatten
from namm.memory.config import NAMMConfig
from namm.memory.features import FeatureNormaliser, recency_code, step_features
from namm.memory.policy import NAMM, bundled_checkpoints

__all__ = [
    "NAMM",
    "FeatureNormaliser",
    "NAMMConfig",
    "bam_scores",
    "bundled_checkpoints",
    "flatten",
    "param_count",
    "recency_code",
    "step_features",
    "unflatten",
]
