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
    scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator, timestep_range: tuple[int, int],
    noise_offset: float = 0.0,
) -> NoisedBatch:
    """Draw noise and timesteps (on the CPU generator, so runs match across devices) and noise `latents`.

    `noise_offset` adds `offset × N(0, 1)` per sample and channel to the noise (the "offset noise" of
    Guttenberg 2023, as kohya's `--noise_offset`): the model learns to shift the mean brightness. At 0
    nothing more is drawn, so the run is unchanged.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=torch.float32)
    noise = noise.to(latents.device, latents.dtype)
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
    unet: UNet2DConditionModel, batch: NoisedBatch, conditioning: torch.Tensor | Conditioning, time_ids: torch.Tensor | None = None,
    weighting: "LossWeighting | None" = None,
) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and the target, in float32 (`diffusion_mse`).

    Args:
        conditioning (`torch.Tensor` or `Conditioning`): SD1.5's `[b, 77, dim]` states, or a `Conditioning`
            (any family; SDXL's carries the pooled embedding).
        time_ids (`torch.Tensor`, *optional*): `[b, 6]` SDXL `add_time_ids`, with a pooled `Conditioning`.
        weighting (`LossWeighting`, *optional*): min-SNR-γ and per-pixel weights; None: the plain mean.
    """
    dtype = batch.noisy_latents.dtype
    if isinstance(conditioning, Conditioning):
        kwargs = conditioning.to(dtype=dtype).unet_kwargs(time_ids)
        prediction = unet(batch.noisy_latents, batch.timesteps, **kwargs).sample
    else:
        prediction = unet(batch.noisy_latents, batch.timesteps, conditioning.to(dtype)).sample
    return diffusion_mse(prediction, batch, weighting)


@dataclass
class LossWeighting:
    """How the squared errors of a batch are weighted before the mean.

    Args:
        scheduler (`DDPMScheduler`): gives the SNR of each timestep and the prediction type.
        snr_gamma (`float`, *optional*): min-SNR-γ (Hang et al. 2023): each sample weighted by
            min(SNR, γ) / SNR for ε targets, min(SNR, γ) / (SNR + 1) for v targets; 5 is the paper's value.
        pixel_weights (`torch.Tensor`, *optional*): `[b, 1, h, w]` per latent pixel (masked loss: 1 inside
            the mask, the floor outside), multiplied into the error before the mean.
    """

    scheduler: DDPMScheduler
    snr_gamma: float | None = None
    pixel_weights: torch.Tensor | None = None

    def sample_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """`[b]` min-SNR-γ weights of `timesteps`, or None without `snr_gamma`."""
        if self.snr_gamma is None:
            return None
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            return (clipped / (snr + 1)).float()
        if prediction_type == "epsilon":
            return (clipped / snr).float()
        raise InvalidInputError(f"min-SNR weighting needs an epsilon or v_prediction model, not {prediction_type!r}.")


def diffusion_mse(prediction: torch.Tensor, batch: NoisedBatch, weighting: LossWeighting | None = None) -> torch.Tensor:
    """The batch's mean squared error against `batch.target` in float32, weighted by `weighting`.

    Without weights (None, or neither min-SNR nor pixel weights) it is exactly `F.mse_loss`, so a run
    without these options is bit-identical to one before they existed.
    """
    prediction, target = prediction.float(), batch.target.float()
    sample_weights = None if weighting is None else weighting.sample_weights(batch.timesteps)
    pixel_weights = None if weighting is None else weighting.pixel_weights
    if sample_weights is None and pixel_weights is None:
        return F.mse_loss(prediction, target)
    error = (prediction - target).pow(2)
    if pixel_weights is not None:
        error = error * pixel_weights.to(error.device, error.dtype)
    per_sample = error.mean(dim=tuple(range(1, error.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device)
    return per_sample.mean()


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
