"""Oracle: read a toy-world image's attributes back from its pixels, no learned judge.

The background colour is known, so the foreground is every pixel far from it; the character is
the largest connected part of the foreground. From it:
- position: centre of its bounding box (hat included) → nearest grid cell;
- colour: saturation-weighted circular mean hue of its coloured pixels → nearest palette hue;
- body: the character from its top row down (rows above are a hat), the top chosen by `fit_body`;
- size: the side of the body (stripes included) from its area and its shape;
- shape: the best intersection-over-union among the three body templates drawn at that box;
- accessory: dark pixels above the body (hat) or inside it (stripes), relative to its area.
`score_images` compares readings with the attributes a prompt asks for (see `world.parse_prompt`).
"""

from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import product

import numpy as np
import torch
from scipy import ndimage

from .world import (
    BACKGROUND,
    CELL_CENTRES,
    COLUMNS,
    IMAGE_SIZE,
    PALETTE,
    ROWS,
    SHAPES,
    SIZES,
    SUPERSAMPLING,
    parse_prompt,
    shape_mask,
)

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel is foreground
# A pixel is accessory ink (hat, stripes) when its brightest channel is below this fraction of
# the body colour's: relative, so that ink blurred into a generated body still counts as ink.
DARK_RELATIVE = 0.6
BODY_VALUE_PERCENTILE = 90  # percentile of body pixels giving its colour's brightness and distance
HALF_COVERAGE = 0.5
MIN_SATURATION = 0.3  # HSV saturation from which a pixel counts as body colour
SIZE_THRESHOLD = (SIZES["small"] + SIZES["big"]) / 2  # body side in pixels between small and big
# Dark area relative to the body area that counts as an accessory; renders give ~0.2 (hat)
# and ~0.35 (stripes), "plain" gives 0.
MIN_ACCESSORY_FRACTION = 0.06
SHAPE_FILL = {"round": np.pi / 4, "square": 1.0, "triangular": 0.5}  # body area / side²
TEMPLATE_SHIFTS = (-0.5, 0.0, 0.5)  # pixels: template centres tried around the body's box centre
TEMPLATE_SIDES = (-1, 0, 1)  # pixels added to the box side for the templates tried
ATTRIBUTES = ("shape", "colour", "accessory", "size", "position")


@dataclass
class Reading:
    """What the oracle reads from one image (`None` where no character was found).

    Args:
        shape, colour, accessory, size, position (`str`): attribute values, named as in `world`.
        centre (`tuple[float, float]`): (x, y) pixel centre of the character's bounding box.
        side (`float`): the body's side in pixels, from its area and shape.
    """

    shape: str | None = None
    colour: str | None = None
    accessory: str | None = None
    size: str | None = None
    position: str | None = None
    centre: tuple[float, float] | None = None
    side: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _hsv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value (0–255) of float RGB pixels `[..., 3]`."""
    top, bottom = pixels.max(-1), pixels.min(-1)
    chroma = top - bottom
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = np.moveaxis(pixels, -1, 0)
    hue = np.select(
        [top == r, top == g],
        [((g - b) / safe) % 6, (b - r) / safe + 2],
        (r - g) / safe + 4,
    ) * 60.0
    saturation = np.where(top > 0, chroma / np.where(top > 0, top, 1.0), 0.0)
    return hue, saturation, top


def background_distance(image: np.ndarray) -> np.ndarray:
    """RGB distance `[H, W]` of each pixel of a float `[H, W, 3]` image from the background colour."""
    return np.linalg.norm(image - np.asarray(BACKGROUND, dtype=np.float32), axis=-1)


def character_mask(distance: np.ndarray) -> np.ndarray:
    """Boolean `[H, W]`: the largest foreground part; gaps of one pixel (a hat on an apex) are bridged.

    Args:
        distance (`np.ndarray`): `background_distance` of the image.
    """
    foreground = distance > FOREGROUND_DISTANCE
    labels, count = ndimage.label(ndimage.binary_dilation(foreground), structure=np.ones((3, 3)))
    if count == 0:
        return foreground
    largest = 1 + int(np.argmax(ndimage.sum(np.ones_like(labels), labels, index=range(1, count + 1))))
    return foreground & (labels == largest)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive, of a non-empty mask."""
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max(), cols.min(), cols.max()


def nearest_colour(hue: float) -> str:
    """The palette colour whose hue is circularly nearest to `hue` (degrees)."""
    palette_hues = {name: _hsv(np.asarray(rgb, dtype=np.float32))[0] for name, rgb in PALETTE.items()}
    return min(palette_hues, key=lambda n: min(abs(hue - palette_hues[n]), 360 - abs(hue - palette_hues[n])))


def _read_colour(coloured: np.ndarray, saturation: np.ndarray, hue: np.ndarray) -> str:
    weights = saturation[coloured]
    angles = np.deg2rad(hue[coloured])
    mean = np.rad2deg(np.arctan2((weights * np.sin(angles)).sum(), (weights * np.cos(angles)).sum())) % 360
    return nearest_colour(float(mean))


@lru_cache(maxsize=4096)
def _template(shape: str, centre_x: float, centre_y: float, side: float) -> np.ndarray:
    """Pixel mask `[H, W]` of a body template: sub-pixel coverage of at least one half."""
    n = IMAGE_SIZE
    coverage = shape_mask(shape, centre_x, centre_y, side).reshape(n, SUPERSAMPLING, n, SUPERSAMPLING)
    return coverage.mean(axis=(1, 3)) >= 0.5


def match_shape(body: np.ndarray, top: int, bottom: int, left: int, right: int) -> tuple[str, float]:
    """The shape whose template overlaps the body best, and that intersection-over-union.

    Each template is tried at ±half a pixel and ±1 pixel of side around the box, because a
    generated body's box is easily a pixel off (blurred edges, a brim merged into the top).
    """
    side = max(bottom - top + 1, right - left + 1)
    centre_x, centre_y = (left + right + 1) / 2, (top + bottom + 1) / 2
    best, best_iou = SHAPES[0], -1.0
    for shape, dx, dy, ds in product(SHAPES, TEMPLATE_SHIFTS, TEMPLATE_SHIFTS, TEMPLATE_SIDES):
        template = _template(shape, centre_x + dx, centre_y + dy, side + ds)
        iou = (template & body).sum() / max(1, (template | body).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, float(best_iou)


def body_top_candidates(mask: np.ndarray, dark: np.ndarray, coloured: np.ndarray) -> set[int]:
    """Rows where the body may start: its first coloured row, or its first row not mostly ink.

    The first is right for stripes under a thin apex (a mostly-ink row inside the body), the
    second for a hat whose blurred brim has some body colour; `fit_body` keeps the better fit.
    """
    candidates = {int(np.nonzero(coloured.any(axis=1))[0][0])}
    for row in range(mask.shape[0]):
        count = mask[row].sum()
        if count and 2 * dark[row].sum() < count:
            candidates.add(row)
            break
    return candidates


def fit_body(mask: np.ndarray, dark: np.ndarray, coloured: np.ndarray) -> tuple[np.ndarray, int, str]:
    """(body mask, body top row, shape): the top candidate whose body a template fits best."""
    fits = []
    for top in sorted(body_top_candidates(mask, dark, coloured)):
        body = mask.copy()
        body[:top] = False  # the body is what lies from its top row down (a hat is above)
        shape, iou = match_shape(body, *_bbox(body))
        fits.append((iou, -top, body, top, shape))
    _, _, body, top, shape = max(fits, key=lambda f: f[:2])
    return body, top, shape


def _read_accessory(dark: np.ndarray, body_top: int, body_area: int) -> str:
    above = dark[:body_top].sum() / body_area  # a hat sits on the body
    inside = dark[body_top:].sum() / body_area  # stripes cross it
    if max(above, inside) < MIN_ACCESSORY_FRACTION:
        return "plain"
    return "hat" if above >= inside else "stripes"


def _nearest_cell(centre: float, names: tuple[str, ...]) -> str:
    return names[int(np.argmin([abs(centre - c) for c in CELL_CENTRES]))]


def _pixel_classes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(character mask, ink, body colour, hue, saturation) of a float `[H, W, 3]` image, or None."""
    distance = background_distance(image)
    mask = character_mask(distance)
    hue, saturation, value = _hsv(image)
    saturated = mask & (saturation >= MIN_SATURATION)
    if saturated.sum() < 2:
        return None
    dark = mask & (value < DARK_RELATIVE * np.percentile(value[saturated], BODY_VALUE_PERCENTILE))
    coloured = saturated & ~dark
    if coloured.sum() < 2:
        return None
    # Keep pixels at least half as far from the background as the body colour: an edge pixel
    # counts when half covered, as in the templates, and a blurred halo does not widen the body.
    mask &= distance >= HALF_COVERAGE * np.percentile(distance[coloured], BODY_VALUE_PERCENTILE)
    return mask, dark & mask, coloured & mask, hue, saturation


def as_pixels(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 `[H, W, 3]` in 0–255 from uint8 (0–255) or float (0–1) pixels, `[H, W, 3]` or `[3, H, W]`."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    scale = 255.0 if np.issubdtype(image.dtype, np.floating) else 1.0  # sampler output is float in [0, 1]
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.moveaxis(image, 0, -1)
    return np.asarray(image, dtype=np.float32) * scale


def read_image(image: np.ndarray | torch.Tensor) -> Reading:
    """The attributes of one image.

    Args:
        image: a world image, rendered or generated: uint8 in 0–255 or float in 0–1, channels
            first or last (`render` output, `ImageDataset.images[i]`, `SampleResult.images[i]`).
    """
    image = as_pixels(image)
    classes = _pixel_classes(image)
    if classes is None or classes[2].sum() < 2:
        return Reading()
    mask, dark, coloured, hue, saturation = classes
    body, top, shape = fit_body(mask, dark, coloured)
    # Side from the area (not the box): a blurred apex or corner moves the box, not the area much.
    side = float(np.sqrt(body.sum() / SHAPE_FILL[shape]))
    m_top, m_bottom, m_left, m_right = _bbox(mask)
    centre = ((m_left + m_right + 1) / 2, (m_top + m_bottom + 1) / 2)
    return Reading(
        shape=shape,
        colour=_read_colour(coloured, saturation, hue),
        accessory=_read_accessory(dark, top, int(body.sum())),
        size="big" if side > SIZE_THRESHOLD else "small",
        position=f"{_nearest_cell(centre[1], ROWS)} {_nearest_cell(centre[0], COLUMNS)}",
        centre=centre,
        side=side,
    )


def read_images(images: torch.Tensor) -> list[Reading]:
    """`read_image` over a batch (`[N, 3, H, W]` or `[N, H, W, 3]`, see `read_image`)."""
    return [read_image(img) for img in images]


def score_readings(readings: list[Reading], asked: dict[str, str]) -> dict[str, float]:
    """Fraction of readings matching each asked attribute, and `all` (every asked one at once).

    Args:
        readings (`list[Reading]`): from `read_images`.
        asked (`dict`): attribute → value, e.g. `world.parse_prompt(prompt)`; attributes not
            asked are not scored (no position word means "anywhere").
    """
    scores = {name: float(np.mean([getattr(r, name) == value for r in readings])) for name, value in asked.items()}
    scores["all"] = float(np.mean([all(getattr(r, n) == v for n, v in asked.items()) for r in readings]))
    return scores


def score_images(images: torch.Tensor, asked: dict[str, str]) -> dict[str, float]:
    """`score_readings(read_images(images), asked)`."""
    return score_readings(read_images(images), asked)


def score_prompt(images: torch.Tensor, prompt: str) -> dict[str, float]:
    """How well `images` (a batch, see `read_image`) show what a world prompt asks for (`score_readings`)."""
    return score_readings(read_images(images), parse_prompt(prompt))


def centre_spread(readings: list[Reading]) -> float:
    """RMS distance (pixels) of the characters' centres from their mean: small when positions collapse."""
    centres = np.array([r.centre for r in readings if r.centre is not None], dtype=np.float64)
    if len(centres) < 2:
        return 0.0
    return float(np.sqrt(((centres - centres.mean(0)) ** 2).sum(-1).mean()))
