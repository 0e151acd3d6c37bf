"""What both training loops share: batches and captions, the latent cache, the diffusion loss, text
conditioning, precision, adapter switches, checkpoints, the PTI image-space term, and the step
callback, loss history and divergence guard (`recorder`)."""

from .adapters import adapters_disabled, lora_layers
from .batches import BatchSampler, build_caption_table
from .diffusion_loss import NoisedBatch, add_noise, check_timestep_range, denoising_loss
from .latent_cache import LatentCache, encode_latents
from .precision import MIXED_PRECISION_MODES, MixedPrecision, check_mixed_precision
from .recorder import LossRecorder, StepCallback, check_losses_finite, diverged, offset_steps
from .text_conditioning import encode_prompts, encode_tokens, tokenize

__all__ = [
    "MIXED_PRECISION_MODES", "BatchSampler", "LatentCache", "LossRecorder", "MixedPrecision", "NoisedBatch", "StepCallback",
    "adapters_disabled", "add_noise", "build_caption_table", "check_losses_finite", "check_mixed_precision",
    "check_timestep_range", "denoising_loss", "diverged", "encode_latents", "encode_prompts", "encode_tokens",
    "lora_layers", "offset_steps", "tokenize",
]
