"""The documented limits: the largest settings the faces accept, and the image sizes the loader accepts.

A setting whose cost grows with its value (memory with the resolution, time with the steps) has an upper
bound, far above any usual run, so that a typo (`--steps 10000000`, `--resolution 100000`) is refused
before anything loads instead of asking the allocator for 180 GB or showing an ETA of years. The nodes
use them as their widgets' maxima; the CLI refuses above them unless `--no-limits` is given (a deliberate
choice: the core itself takes any value). README "Limits" lists them.
"""

# Training and sampling settings.
MAX_RESOLUTION = 2048  # px per side: twice SDXL's native 1024; memory grows with its square
MAX_STEPS = 100_000  # optimiser steps: 30-100 times a usual run (1000-3000 steps)
MAX_SAMPLE_STEPS = 1000  # the schedules have 1000 timesteps; more sampling steps only revisit them
MAX_BATCH_SIZE = 64  # images per micro-batch (and generated together)
MAX_GRADIENT_ACCUMULATION = 1024  # micro-batches per optimiser step (time grows with steps x this)
MAX_RANK = 256  # LoRA rank: a rank-256 SD1.5 LoRA file is already hundreds of MB
MAX_REG_SAMPLES = 64  # regularisation prompts per application, a UNet pass each

# Seeds: what torch's generators take, and ComfyUI's seed widgets (0 … 2^64 - 1).
MAX_SEED = 2**64 - 1

# Training images (`dataset.py`).
MAX_IMAGE_PIXELS = 64_000_000  # 64 Mpx (8000 x 8000): 192 MB decoded as RGB; larger is refused
# PIL's own decompression-bomb error starts at 2 x its `Image.MAX_IMAGE_PIXELS` (179 Mpx), above ours,
# so ours is the one users meet; a header claiming more than PIL's is refused as too large too.
MAX_UPSCALE = 4  # an image whose shorter side is under resolution / 4 is refused, not blown up 4x+
