"""EmbeddingNormStats: do the text encoder's vectors lie on a shell, and where is its centre?"""

from .compute import CENTRES, EOS, PER_TOKEN_SPACES, SPACES, NormStats, NormStatsConfig, compute_norm_stats, stats_of_vectors

__all__ = ["CENTRES", "EOS", "PER_TOKEN_SPACES", "SPACES", "NormStats", "NormStatsConfig", "compute_norm_stats", "stats_of_vectors"]
