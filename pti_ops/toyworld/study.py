"""Oracle measurements of a pivotal-tuning result in the toy world.

What the notes want to see, measured exactly instead of with CLIP scores:
- reconstruction: the share of generations of the placeholder prompt that show the taught
  character (its shape, colour and accessory all read back by the oracle);
- editability: the share of edit prompts (another size, another position) obeyed while the
  character stays recognisable; `edit_obeyed` counts the edit alone (size and position as asked,
  whatever the character looks like) and `edit_identity` the character alone;
- locality: the oracle accuracy of held-in prompts without the placeholder (they must not get
  worse) and the ε-prediction drift from the base model on them;
- position learning: the spread of the character's centre across seeds for the placeholder
  prompt without a position word (it collapses when the model learns the training corner).
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from ..training.adapters import adapters_disabled, lora_layers
from ..models.bundle import ModelBundle
from ..metrics.scores import locality_eps_mse
from ..metrics.sampling import SamplingConfig, sample_images
from .oracle import centre_spread, read_images, score_readings
from .world import CLASS_WORD, HELD_IN_CHARACTERS, PREFIX, Character, full_caption, parse_prompt, random_scenes

RECONSTRUCTION_PROMPT = PREFIX + " a {}"
EDIT_PROMPTS = (
    PREFIX + " a small {}",
    PREFIX + " a {} in the bottom right",
    PREFIX + " a small {} on the right",
)
IDENTITY = ("shape", "colour", "accessory")


@dataclass
class StudySettings:
    """How a result is measured: prompts, seeds and the sampler (the same for every compared model).

    Args:
        seeds (`list[int]`): starting noises; every prompt is sampled once per seed.
        sample_steps (`int`): DDIM steps.
        guidance (`float`): classifier-free guidance scale.
        locality_prompts (`int`): held-in prompts (full captions) checked for locality.
    """

    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    sample_steps: int = 20
    guidance: float = 3.0
    locality_prompts: int = 6

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(steps=self.sample_steps, cfg_scale=self.guidance, sampler="ddim", batch_size=16)

    def held_in_prompts(self) -> list[str]:
        scenes = random_scenes(self.locality_prompts, seed=4321, characters=HELD_IN_CHARACTERS)
        return [full_caption(scene) for scene in scenes]


def _generate(bundle: ModelBundle, prompts: list[str], settings: StudySettings) -> torch.Tensor:
    """uint8 `[len(prompts) · len(seeds), 3, H, W]` generations, prompt-major."""
    images = sample_images(bundle, prompts, settings.seeds, settings.sampling()).images
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 3, 1, 2)


def identity_score(readings, character: Character) -> float:
    """Share of readings showing `character` (shape, colour and accessory all right)."""
    asked = {name: getattr(character, name) for name in IDENTITY}
    return score_readings(readings, asked)["all"]


def measure(bundle: ModelBundle, placeholder: str, character: Character, settings: StudySettings,
            with_locality: bool = True) -> tuple[dict, dict]:
    """Oracle metrics of `bundle` (placeholder and LoRA already applied) and the images they came from.

    Returns:
        `(metrics, images)`: `metrics` maps names to floats; `images` maps "reconstruction" and
        "edit" to uint8 image batches (rows = prompts, in seed order) for grids.
    """
    seeds = len(settings.seeds)
    recon_images = _generate(bundle, [RECONSTRUCTION_PROMPT.format(placeholder)], settings)
    recon = read_images(recon_images)
    edit_prompts = [p.format(placeholder) for p in EDIT_PROMPTS]
    edit_images = _generate(bundle, edit_prompts, settings)
    edit = read_images(edit_images)
    obeyed, edit_only = [], []
    for i, prompt in enumerate(p.format(CLASS_WORD) for p in EDIT_PROMPTS):
        readings = edit[i * seeds:(i + 1) * seeds]
        asked = {k: v for k, v in parse_prompt(prompt).items() if k in ("size", "position")}
        edit_only.append(score_readings(readings, asked)["all"])
        obeyed.append(score_readings(readings, {**asked, **{name: getattr(character, name) for name in IDENTITY}})["all"])
    metrics = {
        "reconstruction": identity_score(recon, character),
        "editability": float(np.mean(obeyed)),
        "edit_obeyed": float(np.mean(edit_only)),
        "edit_identity": identity_score(edit, character),
        "position_spread_px": centre_spread(recon),
    }
    if with_locality:
        metrics.update(locality(bundle, settings))
    return metrics, {"reconstruction": recon_images, "edit": edit_images}


def locality(bundle: ModelBundle, settings: StudySettings) -> dict:
    """Oracle accuracy of held-in prompts, and ε drift from the base model when adapters are present."""
    prompts = settings.held_in_prompts()
    images = _generate(bundle, prompts, settings)
    readings = read_images(images)
    seeds = len(settings.seeds)
    accuracy = np.mean([score_readings(readings[i * seeds:(i + 1) * seeds], parse_prompt(p))["all"] for i, p in enumerate(prompts)])
    out = {"held_in_accuracy": float(accuracy)}
    if lora_layers(bundle):
        out["locality_eps_mse"] = float(locality_eps_mse(bundle, prompts))
        with adapters_disabled(bundle):
            base_readings = read_images(_generate(bundle, prompts, settings))
        out["held_in_accuracy_base"] = float(np.mean(
            [score_readings(base_readings[i * seeds:(i + 1) * seeds], parse_prompt(p))["all"] for i, p in enumerate(prompts)]))
    return out
