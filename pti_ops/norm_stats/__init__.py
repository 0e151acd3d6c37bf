"""EmbeddingNormStats: do the text encoder's vectors lie on a shell, and where is its centre?"""

from .compute import CENTRES, ENCODERS, EOS, PER_TOKEN_SPACES, SPACES, NormStats, NormStatsConfig, compute_norm_stats, stats_of_vectors
from .per_encoder import PerEncoderNormStats, load_norm_stats, measure_norm_stats

__all__ = [
    "CENTRES", "ENCODERS", "EOS", "PER_TOKEN_SPACES", "SPACES", "NormStats", "NormStatsConfig", "PerEncoderNormStats",
    "compute_norm_stats", "load_norm_stats", "measure_norm_stats", "stats_of_vectors",
]
