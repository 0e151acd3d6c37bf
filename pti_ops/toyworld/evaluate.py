"""How well a toy-world model follows prompts, measured by the oracle.

    python -m pti_ops.toyworld.evaluate [--model toy] [--prompts 200] [--grid grid.png]

Prompts are the full captions of random scenes (fixed seed); one image per prompt; the oracle
reads each image and the report gives, per attribute, the fraction of images that show what
the prompt asked for, plus `all` (every attribute at once), for held-in characters (what the
model was trained on) and, for reference, held-out ones (compositions it never saw).

`position_word_use` is the sensitive check behind docs/toyworld.md's position study: the
denoising loss of training scenes with their own captions against the same captions naming
another cell, at the noisiest timesteps (equal losses = the position words are not used).
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models import ModelBundle, load_bundle
from ..training.diffusion_loss import add_noise, denoising_loss
from ..training.text_conditioning import encode_prompts
from ..metrics.sampling import SamplingConfig, decode_latents, denoise, initial_noise
from .oracle import ATTRIBUTES, read_images
from .world import (
    HELD_IN_CHARACTERS,
    HELD_OUT_CHARACTERS,
    POSITIONS,
    Character,
    Scene,
    full_caption,
    random_scenes,
    render_batch,
)

logger = logging.getLogger(__name__)

EVALUATION_SEED = 1234  # scenes of the evaluation prompts (the training scenes use seed 0)
EVALUATION_STEPS, EVALUATION_GUIDANCE = 30, 3.0  # DDIM steps and guidance of the reported numbers
# Attributes that must all be right at once: the character's identity (what pivotal tuning
# teaches), everything but the position, everything.
GROUPS = {
    "identity": ("shape", "colour", "accessory"),
    "all_but_position": ("shape", "colour", "accessory", "size"),
    "all": ATTRIBUTES,
}


def evaluation_scenes(n: int, characters: tuple[Character, ...] = HELD_IN_CHARACTERS, seed: int = EVALUATION_SEED):
    """`n` fixed random scenes of `characters`, whose full captions are the evaluation prompts."""
    return random_scenes(n, seed, characters)


def generate(bundle: ModelBundle, prompts: list[str], config: SamplingConfig, seed: int = 0) -> torch.Tensor:
    """uint8 `[len(prompts), 3, H, W]`: image i from prompt i and the starting noise of seed `seed + i`.

    Unlike `sampling.sample_images` (every prompt from the same seeds, to compare prompts), each
    prompt gets its own noise, so that a statistic over many prompts is not one noise's.
    """
    images = []
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start : start + config.batch_size]
        noise = torch.cat([initial_noise(bundle, seed + start + i) for i in range(len(chunk))])
        images.append(decode_latents(bundle, denoise(bundle, chunk, noise, config)))
    return (torch.cat(images) * 255 + 0.5).to(torch.uint8).permute(0, 3, 1, 2)


def prompt_accuracy(bundle: ModelBundle, scenes, config: SamplingConfig, seed: int = 0) -> tuple[dict[str, float], torch.Tensor]:
    """Per-attribute accuracy of one generation per scene's full caption (and of `GROUPS`), and the images.

    Args:
        bundle (`ModelBundle`): the model.
        scenes (`list[Scene]`): what to ask for (each prompt names all five attributes).
        config (`SamplingConfig`): the sampler's settings.
        seed (`int`): seed of the first image's noise (see `generate`).
    """
    images = generate(bundle, [full_caption(s) for s in scenes], config, seed)
    readings = read_images(images)
    hits = {name: [] for name in ATTRIBUTES}
    for scene, reading in zip(scenes, readings):
        truth = {"shape": scene.character.shape, "colour": scene.character.colour,
                 "accessory": scene.character.accessory, "size": scene.size, "position": scene.position}
        for name in ATTRIBUTES:
            hits[name].append(getattr(reading, name) == truth[name])
    scores = {name: float(np.mean(h)) for name, h in hits.items()}
    for name, group in GROUPS.items():
        scores[name] = float(np.mean(np.all([hits[n] for n in group], axis=0)))
    return scores, images


@torch.no_grad()
def position_word_use(bundle: ModelBundle, n: int = 256, timestep_ranges=((900, 975), (975, 1000)), seed: int = 5) -> dict[str, dict[str, float]]:
    """Loss with the true caption vs. the same caption naming another cell, per timestep range.

    Same scenes, noise and timesteps for both; only the position words differ.
    """
    rng = np.random.default_rng(seed)
    scenes = random_scenes(n, seed)
    wrong = [Scene(s.character, s.size, str(rng.choice([p for p in POSITIONS if p != s.position])), s.offset) for s in scenes]
    pixels = render_batch(scenes).float().to(bundle.device) / 127.5 - 1
    latents = bundle.vae.encode(pixels.to(bundle.vae.dtype)).latent_dist.mean * bundle.vae.config.scaling_factor
    conditionings = {name: encode_prompts(bundle.tokenizer, bundle.text_encoder, [full_caption(s) for s in group])
                     for name, group in (("true", scenes), ("wrong", wrong))}
    report = {}
    for t_min, t_max in timestep_ranges:
        noised = add_noise(bundle.noise_scheduler, latents, torch.Generator().manual_seed(seed), (t_min, t_max))
        report[f"{t_min}-{t_max}"] = {name: denoising_loss(bundle.unet, noised, c).item() for name, c in conditionings.items()}
    return report


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 10, zoom: int = 3) -> Path:
    """Write uint8 `[N, 3, H, W]` images as one PNG grid (row-major), each pixel `zoom`× larger."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.full((3, rows * h, columns * w), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)
    picture.save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="`toy` (shipped) or a diffusers folder")
    parser.add_argument("--prompts", type=int, default=200, help="held-in prompts (one image each)")
    parser.add_argument("--steps", type=int, default=EVALUATION_STEPS)
    parser.add_argument("--guidance", type=float, default=EVALUATION_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, help="also write the held-in images as a PNG grid")
    parser.add_argument("--position-words", action="store_true", help="also measure `position_word_use`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    bundle = load_bundle(args.model)
    config = SamplingConfig(steps=args.steps, cfg_scale=args.guidance, sampler="ddim", batch_size=50)
    held_in, images = prompt_accuracy(bundle, evaluation_scenes(args.prompts), config, args.seed)
    held_out, _ = prompt_accuracy(bundle, evaluation_scenes(max(1, args.prompts // 4), HELD_OUT_CHARACTERS), config, args.seed)
    if args.grid:
        save_grid(images, args.grid)
    report = {"held_in": held_in, "held_out": held_out, "prompts": args.prompts, "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed}
    if args.position_words:
        report["position_word_use"] = position_word_use(bundle)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
