"""What both training loops share: optimiser/schedule/loss options, snapshots, batches and captions, the latent cache, the diffusion loss, text
conditioning, precision, adapter switches, checkpoints, the PTI image-space term, and the step
callback, loss history and divergence guard (`recorder`)."""

from .adapters import adapters_disabled, lora_layers
from .batches import BatchSampler, build_caption_table
from .diffusion_loss import NoisedBatch, add_noise, check_timestep_range, denoising_loss
from .latent_cache import LatentCache, encode_latents
from .precision import MIXED_PRECISION_MODES, MixedPrecision, check_mixed_precision
from .options import LR_SCHEDULES, OPTIMIZERS, TrainingOptions
from .recorder import LossRecorder, StepCallback, check_losses_finite, diverged, offset_steps
from .snapshots import Snapshots
from .text_conditioning import encode_conditioning, encode_ids, encode_prompts, encode_tokens, tokenize, tokenize_per_encoder

__all__ = [
    "LR_SCHEDULES", "OPTIMIZERS", "Snapshots", "TrainingOptions",
    "MIXED_PRECISION_MODES", "BatchSampler", "LatentCache", "LossRecorder", "MixedPrecision", "NoisedBatch", "StepCallback",
    "adapters_disabled", "add_noise", "build_caption_table", "check_losses_finite", "check_mixed_precision",
    "check_timestep_range", "denoising_loss", "diverged", "encode_conditioning", "encode_ids", "encode_latents",
    "encode_prompts", "encode_tokens", "lora_layers", "offset_steps", "tokenize", "tokenize_per_encoder",
]
