"""Previews during training: every N steps, a few images of the model as it is now (token + LoRA so far).

They let a user watch the character appear and stop before the LoRA learns the training images'
positions. A preview samples with its own seeded generators and no gradients, so a run with
previews trains bit-identically to one without (tested). The grid goes to the step callback's logs
(`logs["preview"]`, which ComfyUI's progress bar shows) and, where a folder is given, to
`FOLDER/step_NNNN.png`.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checks import check_positive_int
from ..errors import InvalidInputError, OutputExistsError
from ..models.bundle import ModelBundle
from ..placeholder import PlaceholderToken, fill_placeholder
from ..safe_write import atomic_write
from .sampling import SamplingConfig, image_grid, sample_images


@dataclass
class PreviewConfig:
    """What a preview shows and how often.

    Args:
        every (`int`): a preview every this many steps (and at the last step).
        prompts (`list[str]`): prompts with `{}` where the token goes (or the token written out).
        seeds (`list[int]`): one image per prompt and seed, the same seeds at every preview.
        sampling (`SamplingConfig`): steps, guidance and resolution of the preview images (fewer steps
            than an evaluation: a preview is for looking, and costs `len(prompts) × len(seeds)` samplings).
    """

    every: int
    prompts: list[str] = field(default_factory=lambda: ["an anime illustration of {}"])
    seeds: list[int] = field(default_factory=lambda: [0])
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(steps=20))

    def __post_init__(self):
        check_positive_int("preview_every", self.every)
        self.prompts = [p.strip() for p in self.prompts if p and p.strip()]
        if not self.prompts:
            raise InvalidInputError("`preview_prompts` needs at least one prompt (with {} for the token).")
        if not self.seeds:
            raise InvalidInputError("`preview_seeds` needs at least one seed.")

    @property
    def images_per_preview(self) -> int:
        return len(self.prompts) * len(self.seeds)


class Previews:
    """Makes the previews of one run.

    Args:
        config (`PreviewConfig`): what and how often.
        folder (`Path`, *optional*): write each grid here as `step_NNNN.png` (the CLI); None: only the logs.
        overwrite (`bool`): replace grids of an earlier run in `folder`.
    """

    def __init__(self, config: PreviewConfig, folder: str | Path | None = None, overwrite: bool = False, prefix: str = ""):
        self.config, self.overwrite, self.prefix = config, overwrite, prefix
        self.folder = None if folder is None else Path(folder)
        self.written: list[Path] = []

    def phase(self, prefix: str) -> "Previews":
        """The previews of one phase of a longer run (`ti_step_0100.png`, `lora_step_0100.png`), sharing `written`."""
        other = Previews(self.config, self.folder, self.overwrite, prefix)
        other.written = self.written
        return other

    def path_for(self, step: int) -> Path:
        return self.folder / f"{self.prefix}step_{step:04d}.png"

    def check(self, total: int) -> None:
        """Before training: make the folder; refuse to replace an earlier run's grids without `overwrite`."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        steps = sorted({*range(self.config.every, total + 1, self.config.every), total})
        existing = [self.path_for(s) for s in steps if self.path_for(s).exists()]
        if existing and not self.overwrite:
            raise OutputExistsError(f"{len(existing)} preview file(s) exist already in {self.folder}, e.g. {existing[0].name}: "
                                    "choose another folder, move them, or allow overwriting.")

    def due(self, step: int, total: int) -> bool:
        return step % self.config.every == 0 or step == total

    def make(self, step: int, bundle: ModelBundle, token: PlaceholderToken) -> torch.Tensor:
        """The grid `[H, W, 3]` (prompts in rows, seeds in columns) of the model at `step`; written to the folder."""
        config = self.config
        prompts = [fill_placeholder(p, token.placeholder) if "{}" in p else p for p in config.prompts]
        was_training = bundle.unet.training
        bundle.unet.eval()
        try:
            with torch.no_grad():
                result = sample_images(bundle, prompts, config.seeds, config.sampling, token=token)
        finally:
            bundle.unet.train(was_training)
        grid = image_grid(result.images, len(prompts), len(config.seeds), row_labels=config.prompts,
                          col_labels=[f"seed {s}" for s in config.seeds] if len(config.seeds) > 1 else None)
        if self.folder is not None:
            path = self.path_for(step)
            image = Image.fromarray((np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8))
            self.written.append(atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), overwrite=self.overwrite))
        return torch.from_numpy(np.ascontiguousarray(grid))
