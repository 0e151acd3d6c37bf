"""Train the toy world's text-to-image model from scratch on a CPU (reproducible, resumable).

    OMP_NUM_THREADS=1 nice -n 15 python -m pti_ops.toyworld.train --out runs/toyworld

(The shipped model: this command, then the same with `--steps 6500`, which resumes it.)

Two stages, as for Stable Diffusion: first an `AutoencoderKL` on rendered images (32×32 pixels
→ 16×16×4 latents), then the CLIP text encoder and the UNet jointly, from scratch, on the latents
of a fixed set of rendered scenes with random captions (10 % empty, for classifier-free
guidance). The denoiser keeps an EMA of its weights and the exported model uses them (the
notes' probe found colours off without EMA or a low final learning rate; we use both). Every `checkpoint_every` steps the run saves
a resumable checkpoint and a usable diffusers folder `OUT/model`; rerunning the same command
resumes. Each step's data comes from a generator seeded by (seed, stage, step), so a resumed run
draws exactly what an uninterrupted one would.
"""

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..models.bundle import ModelBundle
from ..models.clip_vocab import make_clip_tokenizer, write_clip_vocab
from ..training.diffusion_loss import NoisedBatch, add_noise
from ..training.text_conditioning import encode_tokens, tokenize
from .world import (
    HELD_OUT_CHARACTERS,
    random_caption,
    random_scenes,
    render_batch,
    vocabulary,
)

logger = logging.getLogger(__name__)

MAX_TOKENS = 32  # longest world caption is 17 tokens; room for multi-vector placeholders
TEXT_WIDTH = 64
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",  # the probe run's schedule: keeps signal at high t on tiny images
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,  # as SD1.5's config; diffusers warns about pipelines saved without it
}
# Stage 3 (positions): v-prediction, as SD2 was fine-tuned from its epsilon model, and sampling
# from t = 999 ("trailing"), where the latent is gone and only the caption says where to draw.
# With epsilon the clean latent at the noisiest steps is read back as (x_t - σ ε̂) / α, errors ×
# 1/α ≈ 20 at t = 958, and sampling started at t = 951, where the model had learned to look for
# the character in the noise instead of reading the position words.
POSITION_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
SNR_FLOOR = 0.02  # largest epsilon-loss weight ≈ 50 (see `snr_weights`)
VAE_STAGE, DENOISER_STAGE, POSITION_STAGE = 1, 2, 3  # stage ids mixed into the per-step data seeds


@dataclass
class ToyTrainConfig:
    """Settings of the toy model's training run (the shipped model used these defaults).

    Args:
        seed (`int`): fixes the initial weights, the rendered scenes and every step's batch.
        num_scenes (`int`): rendered training scenes (held-in characters only).
        vae_steps (`int`): autoencoder optimiser steps.
        vae_learning_rate (`float`): autoencoder AdamW learning rate.
        vae_kl_weight (`float`): weight of the KL term (small: the latents only need to be smooth).
        steps (`int`): text encoder + UNet optimiser steps.
        learning_rate (`float`): peak AdamW learning rate of the denoiser.
        final_learning_rate (`float`): learning rate at the last step (cosine decay; a low end
            sharpens colours).
        warmup_steps (`int`): linear warm-up of the learning rate.
        batch_size (`int`): images per step, both stages.
        cfg_dropout (`float`): fraction of captions replaced by `""` (classifier-free guidance).
        snr_gamma (`float`): loss weighting by signal-to-noise ratio: the error of the implied clean
            latent is weighted by `min(SNR + 1, γ)`, i.e. the noise-prediction loss by
            `min(SNR + 1, γ) / SNR`; 0 = plain noise-prediction loss. Where noise dominates this
            is v-prediction's weighting: the highest noise levels fix the layout, and with the
            plain loss (weight SNR there) the first sampling steps predicted speckles that
            stayed; at low noise it is capped like min-SNR-γ (Hang et al. 2023, arXiv 2303.09556).
        position_steps (`int`): stage 3 steps (0 = none): the stage-2 model fine-tuned to v-prediction
            with `pure_noise_fraction` of each batch at t ≥ `pure_noise_from`, so that it learns to
            place characters from the position words (see docs/toyworld.md).
        position_learning_rate (`float`): peak learning rate of stage 3.
        pure_noise_fraction (`float`): share of each stage-3 batch drawn at the noisiest timesteps.
        pure_noise_from (`int`): first timestep of that range (SNR < 2e-4 from 980 on: only the caption
            tells the model where the character is).
        ema_decay (`float`): decay of the exported EMA weights.
        checkpoint_every (`int`): steps between checkpoints (and exports of `OUT/model`).
        log_every (`int`): steps between loss records.
    """

    seed: int = 0
    num_scenes: int = 20000
    vae_steps: int = 1000
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-5
    steps: int = 4000
    learning_rate: float = 3e-4
    final_learning_rate: float = 3e-5
    warmup_steps: int = 100
    batch_size: int = 32
    cfg_dropout: float = 0.1
    snr_gamma: float = 5.0
    position_steps: int = 0
    position_learning_rate: float = 3e-4
    pure_noise_fraction: float = 0.25
    pure_noise_from: int = 980
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    log_every: int = 25


# --- the models ----------------------------------------------------------------------------


def build_vae() -> AutoencoderKL:
    """32×32×3 → 16×16×4 latents (two levels).

    A factor-8 autoencoder (8×8 latents) of this size still drew dark marks on plain bodies and
    lost hats after 1,800 steps; at factor 2 each latent cell covers 2×2 pixels and
    reconstructions are sharp after a few hundred. No attention in the middle block: at 16×16 it
    would cost more than the rest of the autoencoder and adds nothing for flat shapes.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
        mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer) -> CLIPTextModel:
    """A 3-layer, 64-wide CLIP text transformer over the world's vocabulary."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="quick_gelu",
            projection_dim=TEXT_WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # the real id: the pooled output is read there
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_unet() -> UNet2DConditionModel:
    """UNet on 16×16 latents (16 → 8 → 4); cross-attention at 8×8, 4×4 and in the middle.

    Two attention levels as in the notes' pixel-space probe; attention at 16×16 would double the
    step time on this CPU. (Neither this nor 4×4 only learned position words: docs/toyworld.md.)
    """
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_untrained_bundle(seed: int) -> ModelBundle:
    """Tokenizer over the world's words and seeded random text encoder, UNet and VAE."""
    tokenizer = make_clip_tokenizer(vocabulary(), model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    bundle = ModelBundle(
        tokenizer, build_text_encoder(tokenizer), build_unet(), build_vae(),
        DDPMScheduler.from_config(SCHEDULER_CONFIG), name="toyworld", source="toy",
    )
    return bundle


# --- stage 1: the autoencoder --------------------------------------------------------------


def step_generators(seed: int, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one step: a pure function of (seed, stage, step)."""
    rng = np.random.default_rng([seed, stage, step])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def lr_at(step: int, config: ToyTrainConfig, peak: float, total: int) -> float:
    """Linear warm-up then cosine decay from `peak` to `final_learning_rate`."""
    if step <= config.warmup_steps:
        return peak * step / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    floor = min(config.final_learning_rate, peak)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def vae_step(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE + L1 reconstruction (on a sampled latent) + `kl_weight` · KL; returns (loss, mse).

    L1 keeps edges and thin dark lines (hat brims, stripes) that MSE alone blurs.
    """
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    mse = F.mse_loss(reconstruction, pixels)
    loss = mse + F.l1_loss(reconstruction, pixels) + kl_weight * posterior.kl().mean() / pixels[0].numel()
    return loss, mse.detach()


def train_vae(vae: AutoencoderKL, images: torch.Tensor, config: ToyTrainConfig, run: "RunFiles") -> None:
    """Train the autoencoder on `images` (uint8 `[N, 3, 32, 32]`), resuming from `run` if possible."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    start = run.resume("vae", {"vae": vae, "optimizer": optimizer})
    vae.train()
    for step in range(start + 1, config.vae_steps + 1):
        _, generator = step_generators(config.seed, VAE_STAGE, step)
        indices = torch.randint(len(images), (config.batch_size,), generator=generator)
        pixels = images[indices].float() / 127.5 - 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config, config.vae_learning_rate, config.vae_steps)
        loss, mse = vae_step(vae, pixels, generator, config.vae_kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.log_every == 0 or step == config.vae_steps:
            run.log({"stage": "vae", "step": step, "loss": loss.item(), "mse": mse.item()})
        if step % config.checkpoint_every == 0 or step == config.vae_steps:
            run.checkpoint("vae", step, {"vae": vae, "optimizer": optimizer})
    vae.eval()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std `[N, 4, 8, 8]` of every image (encoded once for the whole stage 2)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        dist = vae.encode(images[start : start + batch_size].float() / 127.5 - 1.0).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def standardise_latents(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-channel affine map into the VAE's 1×1 convs so that its latents have mean 0, std 1.

    The autoencoder's latent channels came out with means of ±1 and stds from 0.3 to 0.8; from
    pure noise, a small denoiser then fails to set the image's mean and draws speckles (the
    low-frequency problem of SD's "offset noise"). Changing `quant_conv` (which outputs mean and
    log-variance) and `post_quant_conv` (the decoder's input) keeps reconstructions identical
    and SD1.5's code path (a global `scaling_factor` only).

    Args:
        vae (`AutoencoderKL`): modified in place.
        mean, std (`torch.Tensor`): the encoded training set, `[N, C, h, w]` (`encode_all`).

    Returns:
        `(mean, std)` of the same images in the new latent space.
    """
    centre = mean.mean(dim=(0, 2, 3))
    spread = mean.std(dim=(0, 2, 3))
    c = vae.config.latent_channels
    encoder_out, decoder_in = vae.quant_conv, vae.post_quant_conv
    # encoder: mean' = (mean − centre) / spread, log-variance' = log-variance − 2 log spread
    encoder_out.weight[:c] /= spread.view(-1, 1, 1, 1)
    encoder_out.bias[:c] = (encoder_out.bias[:c] - centre) / spread
    encoder_out.bias[c:] -= 2 * spread.log()
    # decoder: W (z' · spread + centre) + b
    decoder_in.bias += decoder_in.weight[:, :, 0, 0] @ centre
    decoder_in.weight *= spread.view(1, -1, 1, 1)
    shape = (1, -1, 1, 1)
    return (mean - centre.view(shape)) / spread.view(shape), std / spread.view(shape)


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean squared error (pixels in [-1, 1]) of decoding each image's latent mean."""
    pixels = images.float() / 127.5 - 1.0
    return F.mse_loss(vae.decode(vae.encode(pixels).latent_dist.mean).sample, pixels).item()


# --- stage 2: text encoder + UNet ----------------------------------------------------------


class EMA:
    """Exponential moving average of a list of modules' parameters (with the usual warm-up)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.modules = modules
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early, when weights move fast
        for module, shadow in zip(self.modules, self.shadow):
            torch._foreach_lerp_(list(shadow.parameters()), list(module.parameters()), 1 - decay)


def denoiser_batch(bundle, scenes, latents, config, step, stage: int = DENOISER_STAGE) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """The scaled latents and captions of one step (captions dropped to `""` at `cfg_dropout`)."""
    rng, generator = step_generators(config.seed, stage, step)
    indices = rng.integers(len(scenes), size=config.batch_size)
    mean, std = latents
    noise = torch.randn(mean[indices].shape, generator=generator)
    scaled = (mean[indices] + std[indices] * noise) * bundle.vae.config.scaling_factor
    captions = ["" if rng.random() < config.cfg_dropout else random_caption(scenes[i], rng) for i in indices]
    return scaled, captions, generator


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights giving the implied clean latent's error the weight `min(SNR + 1, γ)`.

    For epsilon that is `min(SNR + 1, γ) / SNR`, with SNR floored at `SNR_FLOOR` (t ≈ 920 here):
    the schedule's last steps have SNR → 0, where the weight would reach 1e8. For v it is
    `min(SNR + 1, γ) / (SNR + 1)`, in (0, 1]: no floor needed.
    """
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    if scheduler.config.prediction_type == "v_prediction":
        snr_plus_one = 1 / (1 - alpha_bar)
        return snr_plus_one.clamp(max=gamma) / snr_plus_one
    snr = (alpha_bar / (1 - alpha_bar)).clamp(min=SNR_FLOOR)
    return (snr + 1).clamp(max=gamma) / snr


def noised_batch(scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator, pure_noise_fraction: float, pure_noise_from: int) -> NoisedBatch:
    """Noise `latents` at uniform timesteps, the first `pure_noise_fraction` of them at t ≥ `pure_noise_from`."""
    total = scheduler.config.num_train_timesteps
    k = round(len(latents) * pure_noise_fraction)
    if k == 0:
        return add_noise(scheduler, latents, generator, (0, total))
    noisiest = add_noise(scheduler, latents[:k], generator, (pure_noise_from, total))
    rest = add_noise(scheduler, latents[k:], generator, (0, total))
    return NoisedBatch(*(torch.cat([getattr(noisiest, f), getattr(rest, f)]) for f in ("noisy_latents", "timesteps", "target")))


def weighted_denoising_loss(unet: UNet2DConditionModel, batch: NoisedBatch, conditioning: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of each sample's MSE times its weight (plain MSE when `weights` is None)."""
    prediction = unet(batch.noisy_latents, batch.timesteps, conditioning).sample
    per_sample = F.mse_loss(prediction.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_sample.mean() if weights is None else (weights * per_sample).mean()


@dataclass(frozen=True)
class DenoiserStage:
    """One text encoder + UNet training stage: its name (checkpoint, log), data-seed id, length,
    peak learning rate and share of each batch at the noisiest timesteps."""

    name: str
    seed_id: int
    steps: int
    learning_rate: float
    pure_noise_fraction: float = 0.0


def train_denoiser(bundle: ModelBundle, scenes, latents, config: ToyTrainConfig, run: "RunFiles", stage: DenoiserStage | None = None) -> EMA:
    """Train text encoder + UNet jointly on the cached latents; returns the EMA weights (stage 2 by default)."""
    stage = stage or DenoiserStage("denoiser", DENOISER_STAGE, config.steps, config.learning_rate)
    modules = [bundle.text_encoder, bundle.unet]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate)
    ema = EMA(modules, config.ema_decay)
    state = {"text_encoder": bundle.text_encoder, "unet": bundle.unet, "optimizer": optimizer,
             "ema_text_encoder": ema.shadow[0], "ema_unet": ema.shadow[1]}
    start = run.resume(stage.name, state)
    started, losses = time.time(), []
    for step in range(start + 1, stage.steps + 1):
        scaled, captions, generator = denoiser_batch(bundle, scenes, latents, config, step, stage.seed_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config, stage.learning_rate, stage.steps)
        noised = noised_batch(bundle.noise_scheduler, scaled, generator, stage.pure_noise_fraction, config.pure_noise_from)
        weights = snr_weights(bundle.noise_scheduler, noised.timesteps, config.snr_gamma) if config.snr_gamma > 0 else None
        conditioning = encode_tokens(bundle.text_encoder, tokenize(bundle.tokenizer, captions))
        loss = weighted_denoising_loss(bundle.unet, noised, conditioning, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # early joint training spikes without it
        optimizer.step()
        ema.update(step)
        losses.append(loss.item())
        if step % config.log_every == 0 or step == stage.steps:
            run.log({"stage": stage.name, "step": step, "loss": float(np.mean(losses)),
                     "lr": optimizer.param_groups[0]["lr"], "s_per_step": (time.time() - started) / len(losses)})
            started, losses = time.time(), []
        if step % config.checkpoint_every == 0 or step == stage.steps:
            run.checkpoint(stage.name, step, state)
            run.export(bundle, ema, step, stage.name)
    return ema


def train_positions(bundle: ModelBundle, stage_2: EMA, scenes, latents, config: ToyTrainConfig, run: "RunFiles") -> EMA:
    """Stage 3: fine-tune the stage-2 model (its EMA weights) to v-prediction with pure-noise samples."""
    with torch.no_grad():
        for module, shadow in zip((bundle.text_encoder, bundle.unet), stage_2.shadow):
            module.load_state_dict(shadow.state_dict())
    bundle.noise_scheduler = DDPMScheduler.from_config(POSITION_SCHEDULER_CONFIG)
    stage = DenoiserStage("position", POSITION_STAGE, config.position_steps, config.position_learning_rate, config.pure_noise_fraction)
    return train_denoiser(bundle, scenes, latents, config, run, stage)


# --- files of a run ------------------------------------------------------------------------


class RunFiles:
    """The output folder: `log.jsonl`, resumable `checkpoint_<stage>.pt`, the exported `model/`."""

    def __init__(self, out: Path, config: ToyTrainConfig):
        self.out = out
        self.config = config
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2))

    def log(self, record: dict) -> None:
        logger.info("%s", record)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(self, stage: str, step: int, state: dict) -> None:
        tmp = self.out / f"checkpoint_{stage}.pt.tmp"
        torch.save({"step": step, **{k: v.state_dict() for k, v in state.items()}}, tmp)
        tmp.replace(self.out / f"checkpoint_{stage}.pt")  # atomic: a crash never leaves half a file

    def resume(self, stage: str, state: dict) -> int:
        """Load the stage's checkpoint into `state` if there is one; returns its step (0 if none)."""
        path = self.out / f"checkpoint_{stage}.pt"
        if not path.exists():
            return 0
        saved = torch.load(path, weights_only=True)  # our own file, tensors only
        for key, module in state.items():
            module.load_state_dict(saved[key])
        logger.info("resumed %s from step %d", stage, saved["step"])
        return saved["step"]

    def export(self, bundle: ModelBundle, ema: EMA, step: int, stage: str = "denoiser") -> Path:
        """Save the bundle with the EMA weights as the diffusers folder `model/`."""
        exported = ModelBundle(bundle.tokenizer, ema.shadow[0], ema.shadow[1], bundle.vae, bundle.noise_scheduler)
        folder = exported.save_pretrained(self.out / "model")
        # transformers 5 saves only tokenizer.json; 4.x's CLIPTokenizer reads vocab.json + merges.txt.
        write_clip_vocab(folder / "tokenizer", vocabulary())
        (folder / "training.json").write_text(json.dumps({"stage": stage, "step": step, "config": asdict(self.config)}, indent=2))
        return folder


# --- the whole run -------------------------------------------------------------------------


def train(out: Path, config: ToyTrainConfig) -> Path:
    """Render the scenes, train the VAE, set its latent scale, train the denoiser, export `out/model`."""
    run = RunFiles(out, config)
    bundle = build_untrained_bundle(config.seed)
    scenes = random_scenes(config.num_scenes, config.seed)
    images = render_batch(scenes)
    train_vae(bundle.vae, images, config, run)
    bundle.vae.requires_grad_(False)
    latents = standardise_latents(bundle.vae, *encode_all(bundle.vae, images))
    # SD's recipe: scale latents to unit variance so the noise schedule fits them (≈ 1 here).
    bundle.vae.register_to_config(scaling_factor=float(1.0 / latents[0].std()))
    held_out = render_batch(random_scenes(256, config.seed + 1, HELD_OUT_CHARACTERS))
    run.log({"stage": "vae_eval", "mse_held_in": reconstruction_mse(bundle.vae, images[:256]),
             "mse_held_out": reconstruction_mse(bundle.vae, held_out), "scaling_factor": bundle.vae.config.scaling_factor})
    ema = train_denoiser(bundle, scenes, latents, config, run)
    if config.position_steps:
        train_positions(bundle, ema, scenes, latents, config, run)
    return out / "model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="run folder (rerun the command to resume)")
    defaults = ToyTrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = ToyTrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # tiny models on shared cores: more threads mostly wait on each other
    folder = train(args.out, config)
    logger.info("model written to %s", folder)


if __name__ == "__main__":
    main()
