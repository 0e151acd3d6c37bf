"""Measuring what a run did: sampling, evaluation (reconstruction, editability, locality, diversity,
distance), CLIP and LPIPS scorers, plots."""

from .clip import ClipScorer, load_clip, try_load_clip
from .distance import embedding_distance, nearest_tokens
from .evaluation import (
    DEFAULT_EDIT_PROMPTS,
    DEFAULT_PROMPTS,
    EvaluationConfig,
    EvaluationResult,
    Scorers,
    evaluate,
    evaluate_tuned,
    evaluation_batches,
)
from .lpips_model import BACKBONE_URLS, LPIPS_NETS, backbone_path, load_lpips
from .plots import figure_to_array, history_figure, save_png
from .previews import PreviewConfig, Previews
from .snapshot_series import SeriesEntry, evaluate_series, series_table, snapshot_files
from .scorers import LPIPS_CHOICES, load_scorers
from .sampling import SAMPLERS, SamplingConfig, apply_embedding, apply_lora, sample_images, sampling_side
from .scores import EvaluationReport, Metric, dataset_images

__all__ = [
    "PreviewConfig", "Previews", "SeriesEntry", "evaluate_series", "series_table", "snapshot_files",
    "BACKBONE_URLS", "DEFAULT_EDIT_PROMPTS", "DEFAULT_PROMPTS", "LPIPS_CHOICES", "LPIPS_NETS", "SAMPLERS", "ClipScorer",
    "EvaluationConfig", "EvaluationReport", "EvaluationResult", "Metric", "SamplingConfig", "Scorers", "apply_embedding",
    "apply_lora", "backbone_path", "dataset_images", "embedding_distance", "evaluate", "evaluate_tuned", "evaluation_batches",
    "figure_to_array", "history_figure", "load_clip", "load_lpips", "load_scorers", "nearest_tokens", "sample_images",
    "sampling_side", "save_png", "try_load_clip",
]
