"""VAE latents of the training images, encoded once per run.

The VAE encoder costs more than a UNet forward at SD1.5 size, and the images do not change
during training, so the encoder runs once. The cache keeps each image's latent distribution
(mean and std), not one sample of it, so training still draws a fresh latent each step as
diffusers' scripts do — at the cost of one `randn` instead of an encoder pass. With aspect-ratio
buckets of several sizes each image keeps its own `[V, C, h, w]` at its bucket's size (a batch
takes images of one bucket).
"""

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from ..dataset import ImageDataset


@dataclass
class LatentCache:
    """Latent distributions `[N, V, C, h, w]` (V = 2 with mirrored copies, else 1), or one `[V, C, h, w]` per image.

    Args:
        mean (`torch.Tensor` or `list[torch.Tensor]`): mean of each image's latent distribution.
        std (`torch.Tensor` or `list[torch.Tensor]`): its standard deviation.
        scaling_factor (`float`): VAE scaling factor applied to samples.
        shift_factor (`float`): VAE shift subtracted before scaling (0 for SD1.5).
    """

    mean: torch.Tensor | list[torch.Tensor]
    std: torch.Tensor | list[torch.Tensor]
    scaling_factor: float
    shift_factor: float = 0.0

    @property
    def num_views(self) -> int:
        return self.mean[0].shape[0]

    def sample(self, indices: torch.Tensor, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents for images `indices` in views `views` (0 = as is, 1 = mirrored)."""
        mean = _pick(self.mean, indices, views)
        std = _pick(self.std, indices, views)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise - self.shift_factor) * self.scaling_factor

    def mode(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled distribution means (deterministic latents, for evaluation)."""
        views = torch.zeros_like(indices) if views is None else views
        return (_pick(self.mean, indices, views) - self.shift_factor) * self.scaling_factor


def _pick(cache: torch.Tensor | list[torch.Tensor], indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """`[b, C, h, w]` of images `indices` in `views`; per-image tensors must be of one size (one bucket)."""
    if isinstance(cache, torch.Tensor):
        return cache[indices, views]
    return torch.stack([cache[i][v] for i, v in zip(indices.tolist(), views.tolist())])


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, dataset: ImageDataset, batch_size: int = 4) -> LatentCache:
    """Encode every image (and its mirror when `dataset.flip`) once with the VAE encoder.

    Images of one size are encoded `batch_size` at a time into one tensor; with buckets of several
    sizes, each bucket's images together, kept per image.
    """
    groups = dataset.groups()
    shift = float(vae.config.get("shift_factor", None) or 0.0)
    if len(groups) == 1:
        means, stds = _encode(vae, dataset, groups[0], batch_size)
        return LatentCache(means, stds, float(vae.config.scaling_factor), shift)
    mean, std = [None] * len(dataset), [None] * len(dataset)
    for group in groups:
        means, stds = _encode(vae, dataset, group, batch_size)
        for row, index in enumerate(group):
            mean[index], std[index] = means[row], stds[row]
    return LatentCache(mean, std, float(vae.config.scaling_factor), shift)


def _encode(vae: AutoencoderKL, dataset: ImageDataset, indices: list[int], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and stds `[n, V, C, h, w]` of images `indices` (all of one size)."""
    means, stds = [], []
    dtype = next(vae.parameters()).dtype
    for start in range(0, len(indices), batch_size):
        pixels = dataset.pixels(indices[start:start + batch_size])
        views = [pixels, pixels.flip(-1)] if dataset.flip else [pixels]
        batch_means, batch_stds = [], []
        for view in views:
            dist = vae.encode(view.to(vae.device, dtype)).latent_dist
            batch_means.append(dist.mean.float())
            batch_stds.append(dist.std.float())
        means.append(torch.stack(batch_means, dim=1))
        stds.append(torch.stack(batch_stds, dim=1))
    return torch.cat(means), torch.cat(stds)
