"""The image-space locality term of PTI: LPIPS + λ_L2 · L2 between decoded predictions.

PTI compares generated images of the tuned and the original generator. Here the tuned and the
original UNet's predictions at the regularisation conditioning are turned into clean-latent
estimates x̂0, decoded by the (frozen) VAE and compared. The gradient flows through the decoder
into the tuned prediction, so this costs two decodes and one decoder backward per application.
"""

import torch
import torch.nn.functional as F

from ..models.bundle import ModelBundle
from .diffusion_loss import NoisedBatch, predicted_x0

# LPIPS' AlexNet needs images of at least 32 px; smaller decodes (toy models) are upsampled.
LPIPS_MIN_SIDE = 32


def decode_x0(bundle: ModelBundle, batch: NoisedBatch, model_output: torch.Tensor) -> torch.Tensor:
    """Decoded x̂0 of a UNet output, `[n, 3, H, W]` in about [-1, 1] (gradients flow if enabled)."""
    x0 = predicted_x0(bundle.noise_scheduler, batch.noisy_latents, batch.timesteps, model_output)
    vae = bundle.vae
    shift = vae.config.get("shift_factor", None) or 0.0
    return vae.decode((x0 / vae.config.scaling_factor + shift).to(next(vae.parameters()).dtype)).sample.float()


def image_locality_loss(
    bundle: ModelBundle, lpips_model: torch.nn.Module, batch: NoisedBatch, tuned: torch.Tensor, base: torch.Tensor, l2_weight: float
) -> torch.Tensor:
    """LPIPS(tuned, base) + `l2_weight` · MSE(tuned, base) of the decoded predictions, averaged over the batch.

    Args:
        bundle (`ModelBundle`): the model, for its scheduler and VAE.
        lpips_model (`lpips.LPIPS`): see `metrics.lpips_model.load_lpips`.
        batch (`NoisedBatch`): the regularisation batch the predictions were made on.
        tuned (`torch.Tensor`): the tuned UNet's prediction (carries the gradient).
        base (`torch.Tensor`): the original UNet's prediction (the target).
        l2_weight (`float`): λ_L2 of the pixel term.
    """
    tuned_images = decode_x0(bundle, batch, tuned)
    with torch.no_grad():
        base_images = decode_x0(bundle, batch, base)
    side = min(tuned_images.shape[-2:])
    if side < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / side
        tuned_images = F.interpolate(tuned_images, scale_factor=scale, mode="bilinear", align_corners=False)
        base_images = F.interpolate(base_images, scale_factor=scale, mode="bilinear", align_corners=False)
    perceptual = lpips_model(tuned_images.clamp(-1, 1), base_images.clamp(-1, 1)).mean()
    return perceptual + l2_weight * F.mse_loss(tuned_images, base_images)
