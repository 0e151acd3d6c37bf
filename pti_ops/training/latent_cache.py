"""VAE latents of the training images, encoded once per run.

The VAE encoder costs more than a UNet forward at SD1.5 size, and the images do not change
during training, so the encoder runs once. The cache keeps each image's latent distribution
(mean and std), not one sample of it, so training still draws a fresh latent each step as
diffusers' scripts do — at the cost of one `randn` instead of an encoder pass.
"""

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from ..dataset import ImageDataset


@dataclass
class LatentCache:
    """Latent distributions `[N, V, C, h, w]` (V = 2 with mirrored copies, else 1).

    Args:
        mean (`torch.Tensor`): mean of each image's latent distribution.
        std (`torch.Tensor`): its standard deviation.
        scaling_factor (`float`): VAE scaling factor applied to samples.
        shift_factor (`float`): VAE shift subtracted before scaling (0 for SD1.5).
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    shift_factor: float = 0.0

    @property
    def num_views(self) -> int:
        return self.mean.shape[1]

    def sample(self, indices: torch.Tensor, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents for images `indices` in views `views` (0 = as is, 1 = mirrored)."""
        mean = self.mean[indices, views]
        std = self.std[indices, views]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise - self.shift_factor) * self.scaling_factor

    def mode(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled distribution means (deterministic latents, for evaluation)."""
        views = torch.zeros_like(indices) if views is None else views
        return (self.mean[indices, views] - self.shift_factor) * self.scaling_factor


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, dataset: ImageDataset, batch_size: int = 4) -> LatentCache:
    """Encode every image (and its mirror when `dataset.flip`) once with the VAE encoder."""
    means, stds = [], []
    dtype = next(vae.parameters()).dtype
    for start in range(0, len(dataset), batch_size):
        pixels = dataset.pixels(list(range(start, min(start + batch_size, len(dataset)))))
        views = [pixels, pixels.flip(-1)] if dataset.flip else [pixels]
        batch_means, batch_stds = [], []
        for view in views:
            dist = vae.encode(view.to(vae.device, dtype)).latent_dist
            batch_means.append(dist.mean.float())
            batch_stds.append(dist.std.float())
        means.append(torch.stack(batch_means, dim=1))
        stds.append(torch.stack(batch_stds, dim=1))
    shift = vae.config.get("shift_factor", None) or 0.0
    return LatentCache(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor), float(shift))
