"""Aspect-ratio buckets, kohya-style: each image trains at the bucket of nearest aspect ratio.

The buckets are the sizes of about the training resolution's pixel area (R × R) whose sides are
multiples of a step, R/2 to 2R long (kohya's `make_bucket_resolutions`, whose defaults at 512 px
are 256 to 1024 in steps of 64). An image goes to the bucket of nearest aspect ratio, is resized
to cover it and the excess of its longer side is centre-cropped: the only crop is the bucket's
rounding of the aspect ratio. Sizes are `(height, width)` pairs, as SDXL's time ids.
"""

import math

from .errors import InvalidInputError

# kohya's `bucket_reso_steps`: SD1.5's UNet needs sides of multiples of 64 px, SDXL's of 32.
DEFAULT_BUCKET_STEP = 64
# Below this resolution (test-sized models) the step shrinks with it, or there would be one bucket.
FULL_STEP_FROM = 256
# The VAE's downsampling of SD-family models: a bucket side must at least hold whole latent cells.
MIN_BUCKET_STEP = 8

Size = tuple[int, int]


def default_bucket_step(resolution: int, multiple: int = MIN_BUCKET_STEP) -> int:
    """64 px from 256 px up; below, resolution / 8 in multiples of 8; rounded up to a multiple of `multiple`.

    Args:
        resolution (`int`): the training resolution.
        multiple (`int`): what the model needs its sides to be multiples of (`bundle.resolution_multiple`).
    """
    step = DEFAULT_BUCKET_STEP if resolution >= FULL_STEP_FROM else max(MIN_BUCKET_STEP, resolution // 64 * 8)
    return math.ceil(step / multiple) * multiple


def check_bucket_step(step: int, resolution: int) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= resolution:
        raise InvalidInputError(
            f"`bucket_step` must be a whole number of pixels from 1 to the resolution {resolution}, got {step!r}."
        )
    return step


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """Every bucket `(height, width)` for `resolution`, sorted: the square and the pairs about its area."""
    area = resolution * resolution
    low = math.ceil(resolution / 2 / step) * step
    high = 2 * resolution
    square = max(step, resolution // step * step)
    sizes = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes.add((height, width))
            sizes.add((width, height))
    return sorted(sizes)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest that of `size` `(height, width)`.

    Nearest in log aspect ratio, so a portrait image and the same image turned landscape land in
    transposed buckets; between equally near buckets, the larger.
    """
    height, width = size
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - aspect), -b[0] * b[1], b))


def histogram(sizes: list[Size]) -> dict[Size, int]:
    """Images per bucket, largest count first (then by size)."""
    counts: dict[Size, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def describe_histogram(sizes: list[Size]) -> str:
    """`"3 aspect-ratio buckets (width x height): 32x32: 2 images, 40x24: 1 image, …"`."""
    counts = histogram(sizes)
    parts = [f"{w}x{h}: {n} image{'s' if n > 1 else ''}" for (h, w), n in counts.items()]
    return f"{len(counts)} aspect-ratio bucket{'s' if len(counts) > 1 else ''} (width x height): " + ", ".join(parts)
