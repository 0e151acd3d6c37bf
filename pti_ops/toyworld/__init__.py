"""The toy world: a procedural world of 32×32 "characters", a small text-to-image model of it
shipped in `model/` (load it with `load_bundle("toy")`), and an oracle that reads attributes
back from pixels, so that pivotal tuning can be run and measured on a CPU in minutes.

- `world`: characters, scenes, the renderer, captions, held-out characters, training sets.
- `oracle`: attribute readings of images and prompt-following scores.
- `train`: the script that trained the shipped model (`python -m pti_ops.toyworld.train`).
- `demo`, `benchmark`: the demo and the benchmark (`python -m pti_ops demo`, `… benchmark toyworld`).
- `evaluate`: oracle accuracy of a model's generations (`python -m pti_ops.toyworld.evaluate`),
  sampled with the package's general sampler (`pti_ops.metrics.sampling`).
"""

from .benchmark import BenchmarkConfig, run_benchmark, write_results
from .demo import DemoConfig, run_demo
from .oracle import (
    Reading,
    centre_spread,
    read_image,
    read_images,
    score_images,
    score_prompt,
    score_readings,
)
from .world import (
    HELD_IN_CHARACTERS,
    HELD_OUT_CHARACTERS,
    Character,
    Scene,
    character_dataset,
    character_images,
    full_caption,
    parse_prompt,
    random_caption,
    random_scenes,
    render,
    render_batch,
)

__all__ = [
    "BenchmarkConfig",
    "DemoConfig",
    "run_benchmark",
    "run_demo",
    "write_results",
    "Character",
    "Scene",
    "HELD_IN_CHARACTERS",
    "HELD_OUT_CHARACTERS",
    "render",
    "render_batch",
    "random_scenes",
    "full_caption",
    "random_caption",
    "parse_prompt",
    "character_images",
    "character_dataset",
    "Reading",
    "read_image",
    "read_images",
    "score_images",
    "score_readings",
    "score_prompt",
    "centre_spread",
]
