"""The toy world: procedural 32×32 images of "characters" and the captions that describe them.

A character is a body shape (round / square / triangular), a colour (six) and an accessory
(none / a hat / stripes); a scene puts it at a size (small / big) in one cell of a 3×3 grid
on a plain light background. Drawing is analytic with 4×4 supersampling, so every image is a
pure function of its scene, and a scene a pure function of its seed.

Captions mirror the notes' prompts (`a toy illustration of a small red round character on the
left`), always with the class word `character`; random captions leave attributes out, so that
"no position word" comes to mean "anywhere". Some characters are HELD OUT of pretraining: they
are the ones users teach with pivotal tuning (`HELD_OUT_CHARACTERS`).
"""

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

from ..dataset import ImageDataset
from ..errors import InvalidInputError

IMAGE_SIZE = 32
BACKGROUND = (236, 236, 236)  # plain light grey: the oracle finds the foreground by distance to it
ACCESSORY_COLOUR = (30, 30, 30)  # near black: hats and stripes are told apart from the body by darkness
SUPERSAMPLING = 4  # sub-pixels per pixel side: antialiased edges without a drawing library

SHAPES = ("round", "square", "triangular")
# Hues ≈ 0°, 27°, 60°, 130°, 225°, 280°: far enough apart that a mean hue names the colour.
PALETTE = {
    "red": (220, 40, 40),
    "orange": (240, 120, 20),
    "yellow": (220, 220, 30),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (150, 60, 210),
}
COLOURS = tuple(PALETTE)
ACCESSORIES = ("plain", "hat", "stripes")
ACCESSORY_PHRASES = {"plain": "plain", "hat": "with a hat", "stripes": "with stripes"}

# Body side in pixels; the gap (8 vs 12) leaves the size oracle a 2-pixel margin each way.
SIZES = {"small": 8, "big": 12}
# Hat = a 1-pixel brim then a crown, both above the body: (brim width, crown width, crown height).
HAT_GEOMETRY = {"small": (8, 4, 2), "big": (10, 6, 3)}
HAT_BRIM_HEIGHT = 1
STRIPE_PERIOD, STRIPE_ROWS = 5, (2, 3)  # dark rows 2 and 3 of every 5, counted from the body top

# Centres of the 3×3 grid cells (pixels): the whole character's bounding box is centred there.
CELL_CENTRES = (9, 16, 23)
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")
POSITION_PHRASES = {
    ("top", "left"): "in the top left",
    ("top", "centre"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "centre"): "in the centre",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
POSITIONS = tuple(f"{r} {c}" for r, c in POSITION_PHRASES)  # "top left", "middle centre", …
CORNERS = ("top left", "top right", "bottom left", "bottom right")
MAX_JITTER = 1  # pixels a scene may move from its cell centre, each axis

CLASS_WORD = "character"
PREFIX = "a toy illustration of"
# Probability that a random caption names each attribute (the rest leave it to chance).
MENTION_PROBABILITY = {"size": 0.7, "colour": 0.8, "shape": 0.8, "accessory": 0.7, "position": 0.7}
PREFIX_PROBABILITY = 0.7
BARE_CLASS_PROBABILITY = 0.05  # captions that are just "a character"


@dataclass(frozen=True)
class Character:
    """What identifies a character: body shape, colour and accessory.

    Args:
        shape (`str`): one of `SHAPES`.
        colour (`str`): one of `COLOURS`.
        accessory (`str`): one of `ACCESSORIES` (`plain` = none).
    """

    shape: str
    colour: str
    accessory: str

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS), ("accessory", self.accessory, ACCESSORIES)):
            if value not in allowed:
                raise InvalidInputError(f"character `{name}` must be one of {allowed}, got {value!r}.")

    def describe(self) -> str:
        """The full noun phrase, e.g. `red round character with a hat`."""
        accessory = "" if self.accessory == "plain" else " " + ACCESSORY_PHRASES[self.accessory]
        return f"{self.colour} {self.shape} {CLASS_WORD}{accessory}"


@dataclass(frozen=True)
class Scene:
    """One image: a character at a size in a grid cell, moved by a small offset.

    Args:
        character (`Character`): who is drawn.
        size (`str`): `small` or `big`.
        position (`str`): one of `POSITIONS`, e.g. `"top left"` or `"middle centre"`.
        offset (`tuple[int, int]`): (dx, dy) pixels from the cell centre, each within ±`MAX_JITTER`.
    """

    character: Character
    size: str
    position: str
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self):
        if self.size not in SIZES:
            raise InvalidInputError(f"scene `size` must be one of {tuple(SIZES)}, got {self.size!r}.")
        if self.position not in POSITIONS:
            raise InvalidInputError(f"scene `position` must be one of {POSITIONS}, got {self.position!r}.")


# Held out of pretraining: one per shape and accessory, colours spread over the palette.
HELD_OUT_CHARACTERS = (
    Character("round", "purple", "hat"),
    Character("square", "orange", "stripes"),
    Character("triangular", "blue", "hat"),
    Character("square", "green", "plain"),
)
ALL_CHARACTERS = tuple(Character(s, c, a) for s, c, a in product(SHAPES, COLOURS, ACCESSORIES))
HELD_IN_CHARACTERS = tuple(c for c in ALL_CHARACTERS if c not in HELD_OUT_CHARACTERS)


def position_phrase(position: str) -> str:
    """Words for a grid cell, e.g. `"top left"` → `"in the top left"`."""
    row, column = position.split()
    return POSITION_PHRASES[(row, column)]


def vocabulary() -> list[str]:
    """Every word a world caption can use (the tokenizer makes each a single token)."""
    words = set(f"{PREFIX} {CLASS_WORD}".split()) | set(SHAPES) | set(COLOURS) | set(SIZES)
    for phrase in list(ACCESSORY_PHRASES.values()) + list(POSITION_PHRASES.values()):
        words |= set(phrase.split())
    return sorted(words)


# --- drawing -------------------------------------------------------------------------------


def _subpixel_grid() -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centre coordinates `(x, y)` in pixel units, each `[H*S, W*S]`."""
    coords = (np.arange(IMAGE_SIZE * SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    return np.meshgrid(coords, coords)


def shape_mask(shape: str, centre_x: float, centre_y: float, side: float) -> np.ndarray:
    """Supersampled boolean mask of a body of `side` pixels centred at (`centre_x`, `centre_y`).

    Args:
        shape (`str`): `round` (disc), `square`, or `triangular` (upright, apex at the top).
    """
    x, y = _subpixel_grid()
    half = side / 2
    inside_box = (np.abs(x - centre_x) <= half) & (np.abs(y - centre_y) <= half)
    if shape == "square":
        return inside_box
    if shape == "round":
        return (x - centre_x) ** 2 + (y - centre_y) ** 2 <= half**2
    if shape == "triangular":
        depth = (y - (centre_y - half)) / side  # 0 at the apex, 1 at the base
        return inside_box & (np.abs(x - centre_x) <= half * depth)
    raise InvalidInputError(f"shape must be one of {SHAPES}, got {shape!r}.")


def _rect_mask(left: float, top: float, right: float, bottom: float) -> np.ndarray:
    x, y = _subpixel_grid()
    return (x >= left) & (x < right) & (y >= top) & (y < bottom)


def hat_height(size: str) -> int:
    """Pixels a hat adds above a body of this size."""
    return HAT_BRIM_HEIGHT + HAT_GEOMETRY[size][2]


def body_centre(scene: Scene) -> tuple[float, float]:
    """Centre of the body: the whole character (hat included) is centred on its grid cell."""
    row, column = scene.position.split()
    cx = CELL_CENTRES[COLUMNS.index(column)] + scene.offset[0]
    cy = CELL_CENTRES[ROWS.index(row)] + scene.offset[1]
    if scene.character.accessory == "hat":
        cy += hat_height(scene.size) // 2  # whole pixels, so the hat's edges stay sharp
    return float(cx), float(cy)


def render(scene: Scene) -> np.ndarray:
    """The image of `scene`, uint8 `[32, 32, 3]` (HWC)."""
    side = SIZES[scene.size]
    cx, cy = body_centre(scene)
    canvas = np.empty((IMAGE_SIZE * SUPERSAMPLING,) * 2 + (3,), dtype=np.float32)
    canvas[:] = BACKGROUND
    body = shape_mask(scene.character.shape, cx, cy, side)
    canvas[body] = PALETTE[scene.character.colour]
    top = cy - side / 2
    if scene.character.accessory == "stripes":
        _, y = _subpixel_grid()
        stripe_rows = np.isin(np.floor(y - top).astype(int) % STRIPE_PERIOD, STRIPE_ROWS)
        canvas[body & stripe_rows] = ACCESSORY_COLOUR
    elif scene.character.accessory == "hat":
        brim_w, crown_w, crown_h = HAT_GEOMETRY[scene.size]
        brim = _rect_mask(cx - brim_w / 2, top - HAT_BRIM_HEIGHT, cx + brim_w / 2, top)
        crown = _rect_mask(cx - crown_w / 2, top - HAT_BRIM_HEIGHT - crown_h, cx + crown_w / 2, top - HAT_BRIM_HEIGHT)
        canvas[brim | crown] = ACCESSORY_COLOUR
    # Average each S×S block of sub-pixels into one pixel (antialiasing).
    s = SUPERSAMPLING
    pixels = canvas.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s, 3).mean(axis=(1, 3))
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """uint8 `[N, 3, 32, 32]` images of `scenes` (the layout of `ImageDataset.images`)."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).contiguous()


# --- random scenes and captions ------------------------------------------------------------


def random_scene(rng: np.random.Generator, characters: tuple[Character, ...] = HELD_IN_CHARACTERS) -> Scene:
    """A uniformly random scene of one of `characters` (held-in ones by default)."""
    character = characters[rng.integers(len(characters))]
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    offset = tuple(int(v) for v in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2))
    return Scene(character, size, position, offset)


def random_scenes(n: int, seed: int, characters: tuple[Character, ...] = HELD_IN_CHARACTERS) -> list[Scene]:
    """`n` random scenes, a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, characters) for _ in range(n)]


def full_caption(scene: Scene, prefix: bool = True) -> str:
    """The caption naming every attribute, e.g. `a toy illustration of a small red round character on the left`."""
    return _compose(scene, dict.fromkeys(MENTION_PROBABILITY, True), prefix)


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of `scene` that names a random subset of its attributes (never a wrong one)."""
    prefix = bool(rng.random() < PREFIX_PROBABILITY)
    if rng.random() < BARE_CLASS_PROBABILITY:
        return f"{PREFIX} a {CLASS_WORD}" if prefix else f"a {CLASS_WORD}"
    mention = {name: bool(rng.random() < p) for name, p in MENTION_PROBABILITY.items()}
    return _compose(scene, mention, prefix)


def _compose(scene: Scene, mention: dict[str, bool], prefix: bool) -> str:
    """`[prefix] a [size] [accessory=plain] [colour] [shape] character [with …] [position]`."""
    c = scene.character
    words = [PREFIX] if prefix else []
    words.append("a")
    if mention["size"]:
        words.append(scene.size)
    if mention["accessory"] and c.accessory == "plain":
        words.append("plain")
    if mention["colour"]:
        words.append(c.colour)
    if mention["shape"]:
        words.append(c.shape)
    words.append(CLASS_WORD)
    if mention["accessory"] and c.accessory != "plain":
        words.append(ACCESSORY_PHRASES[c.accessory])
    if mention["position"]:
        words.append(position_phrase(scene.position))
    return " ".join(words)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a world prompt asks for: `{"size": "small", "colour": "red", …}` (named ones only)."""
    padded = f" {' '.join(prompt.lower().split())} "
    asked = {}
    for name, values in (("size", tuple(SIZES)), ("colour", COLOURS), ("shape", SHAPES)):
        found = [v for v in values if f" {v} " in padded]
        if found:
            asked[name] = found[0]
    for accessory, phrase in ACCESSORY_PHRASES.items():
        if f" {phrase} " in padded:
            asked["accessory"] = accessory
    # No position phrase is a substring of another, so the first match is the only one.
    for (row, column), phrase in POSITION_PHRASES.items():
        if f" {phrase} " in padded:
            asked["position"] = f"{row} {column}"
            break
    return asked


# --- a held-out character's training set ---------------------------------------------------


def character_images(character: Character, n: int = 8, corner: str = "top left", seed: int = 0, size: str = "big") -> torch.Tensor:
    """`n` images of `character`, all in the same grid cell (so that learning positions shows).

    Args:
        character (`Character`): usually one of `HELD_OUT_CHARACTERS`.
        n (`int`): number of images.
        corner (`str`): the grid cell, one of `POSITIONS` (a corner by default).
        seed (`int`): fixes the small offsets that make the images differ.
        size (`str`): `small` or `big`.

    Returns:
        uint8 `[n, 3, 32, 32]`.
    """
    if n < 1:
        raise InvalidInputError(f"`n` must be at least 1, got {n}.")
    if corner not in POSITIONS:
        raise InvalidInputError(f"`corner` must be one of {POSITIONS}, got {corner!r}.")
    rng = np.random.default_rng(seed)
    offsets = [tuple(int(v) for v in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2)) for _ in range(n)]
    return render_batch([Scene(character, size, corner, off) for off in offsets])


def character_dataset(character: Character, n: int = 8, corner: str = "top left", seed: int = 0, size: str = "big") -> ImageDataset:
    """`character_images` as an `ImageDataset` (template captions), ready for `run_inversion`."""
    images = character_images(character, n, corner, seed, size)
    return ImageDataset(images, [f"{character.shape}_{character.colour}_{character.accessory}_{i:02d}" for i in range(n)])
