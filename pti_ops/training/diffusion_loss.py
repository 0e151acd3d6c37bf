"""The denoising loss shared by textual inversion and LoRA tuning."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from ..errors import InvalidInputError
from ..models.conditioning import Conditioning


@dataclass
class NoisedBatch:
    """A noised training batch: the UNet input, its timesteps and the regression target."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def check_timestep_range(timestep_range: tuple[int, int] | None, scheduler: DDPMScheduler) -> tuple[int, int]:
    """`(t_min, t_max)` with `0 <= t_min < t_max <= num_train_timesteps` (t_max exclusive)."""
    total = scheduler.config.num_train_timesteps
    if timestep_range is None:
        return 0, total
    t_min, t_max = (int(v) for v in timestep_range)
    if not 0 <= t_min < t_max <= total:
        raise InvalidInputError(
            f"`timestep_range` must satisfy 0 <= t_min < t_max <= {total}, got ({t_min}, {t_max})."
        )
    return t_min, t_max


def add_noise(
    scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator, timestep_range: tuple[int, int]
) -> NoisedBatch:
    """Draw noise and timesteps (on the CPU generator, so runs match across devices) and noise `latents`."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    timesteps = torch.randint(*timestep_range, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise InvalidInputError(f"unsupported scheduler prediction_type {prediction_type!r}.")
    return NoisedBatch(noisy, timesteps, target)


def denoising_loss(
    unet: UNet2DConditionModel, batch: NoisedBatch, conditioning: torch.Tensor | Conditioning, time_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and the target, in float32.

    Args:
        conditioning (`torch.Tensor` or `Conditioning`): SD1.5's `[b, 77, dim]` states, or a `Conditioning`
            (any family; SDXL's carries the pooled embedding).
        time_ids (`torch.Tensor`, *optional*): `[b, 6]` SDXL `add_time_ids`, with a pooled `Conditioning`.
    """
    dtype = batch.noisy_latents.dtype
    if isinstance(conditioning, Conditioning):
        kwargs = conditioning.to(dtype=dtype).unet_kwargs(time_ids)
        prediction = unet(batch.noisy_latents, batch.timesteps, **kwargs).sample
    else:
        prediction = unet(batch.noisy_latents, batch.timesteps, conditioning.to(dtype)).sample
    return F.mse_loss(prediction.float(), batch.target.float())


def predicted_x0(scheduler: DDPMScheduler, noisy: torch.Tensor, timesteps: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The clean latents implied by a UNet output at `timesteps` (epsilon, v or sample prediction)."""
    alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, *([1] * (noisy.ndim - 1)))
    noisy, model_output = noisy.float(), model_output.float()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (noisy - (1 - alphas).sqrt() * model_output) / alphas.sqrt()
    if prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise InvalidInputError(f"unsupported scheduler prediction_type {prediction_type!r}.")
