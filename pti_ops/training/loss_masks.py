"""Masked loss: the images' masks on the latent grid, as per-pixel weights of the diffusion loss.

A mask is brought to the latent grid by area averaging over each latent cell's `factor × factor`
pixels (`factor` = the VAE's downsampling), which is the same operation at every bucket size
since bucket sides are multiples of it. A mirrored view uses the mirrored mask. The weight of a
latent pixel is `m + floor · (1 − m)`: 1 inside the mask, `mask_floor` outside. A batch whose
weights are all exactly 1 gets no pixel weights at all, so a mask of ones trains bit-identically
to no mask (`diffusion_mse` then is the plain mean).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..dataset import ImageDataset
from .diffusion_loss import LossWeighting


@dataclass
class LatentMasks:
    """Each image's mask on the latent grid, `[V, 1, h, w]` in [0, 1] (V views, as the latent cache).

    Args:
        masks (`list[torch.Tensor]`): one per image.
        floor (`float`): the weight outside the mask.
        full (`list[bool]`): per image, whether its weights are all 1 (found once, on the CPU: no
            device sync per step).
    """

    masks: list[torch.Tensor]
    floor: float = 0.0
    full: list[bool] = field(default_factory=list)

    def pixel_weights(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor | None:
        """`[b, 1, h, w]` loss weights of a batch (one bucket), or None when they are all 1."""
        rows = indices.tolist()
        if all(self.full[i] for i in rows):
            return None
        masks = torch.stack([self.masks[i][v] for i, v in zip(rows, views.tolist())])
        return masks + self.floor * (1 - masks)


def latent_masks(dataset: ImageDataset, factor: int, device: torch.device | str | None = None) -> LatentMasks | None:
    """The dataset's masks on the latent grid of a VAE downsampling by `factor`, or None without masks."""
    if dataset.masks is None:
        return None
    masks, full = [], []
    for index in range(len(dataset)):
        grid = F.avg_pool2d(dataset.mask_pixels([index]), factor)  # [1, 1, h, w]
        views = [grid, grid.flip(-1)] if dataset.flip else [grid]
        masks.append(torch.cat(views).to(device))
        full.append(dataset.mask_floor == 1 or bool((grid == 1).all()))  # then m + floor · (1 − m) is exactly 1
    return LatentMasks(masks, dataset.mask_floor, full)


def batch_weighting(weighting: LossWeighting | None, masks: LatentMasks | None, indices: torch.Tensor,
                    views: torch.Tensor, scheduler) -> LossWeighting | None:
    """The run's loss weighting (min-SNR or None) with this batch's pixel weights added, when it has any."""
    weights = None if masks is None else masks.pixel_weights(indices, views)
    if weights is None:
        return weighting
    snr_gamma = None if weighting is None else weighting.snr_gamma
    return LossWeighting(scheduler, snr_gamma, weights)
