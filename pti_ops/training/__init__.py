"""What both training loops share: batches and captions, the latent cache, the diffusion loss, text
conditioning, precision, adapter switches, checkpoints and the PTI image-space term."""

from .adapters import adapters_disabled, lora_layers
from .batches import DEFAULT_TEMPLATES, BatchSampler, check_templates, fill_placeholder
from .diffusion_loss import NoisedBatch, add_noise, check_timestep_range, denoising_loss
from .latent_cache import LatentCache, encode_latents
from .precision import MIXED_PRECISION_MODES, MixedPrecision, check_mixed_precision
from .text_conditioning import encode_prompts, encode_tokens, tokenize

__all__ = [
    "DEFAULT_TEMPLATES", "MIXED_PRECISION_MODES", "BatchSampler", "LatentCache", "MixedPrecision", "NoisedBatch",
    "adapters_disabled", "add_noise", "check_mixed_precision", "check_templates", "check_timestep_range",
    "denoising_loss", "encode_latents", "encode_prompts", "encode_tokens", "fill_placeholder", "lora_layers", "tokenize",
]
