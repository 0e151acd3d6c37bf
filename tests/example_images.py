"""A small procedurally drawn character, so the demo and the tests need no image files.

The character is a round body with eyes and a pointed hat, drawn in a few poses (shifts,
scales, hat colours fixed) on a plain background — enough for a smoke run of the method.
"""

from pathlib import Path

from PIL import Image, ImageDraw

BODY_COLOUR = (220, 60, 50)
HAT_COLOUR = (40, 60, 200)
BACKGROUND = (235, 235, 225)


def draw_character(size: int, centre: tuple[float, float], scale: float, background=BACKGROUND) -> Image.Image:
    """One image of the character, `centre` and `scale` as fractions of `size`."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = centre[0] * size, centre[1] * size, scale * size
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=BODY_COLOUR)
    eye = max(1.0, r * 0.18)
    for dx in (-0.35, 0.35):
        ex, ey = cx + dx * r, cy - 0.15 * r
        draw.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(255, 255, 255))
    draw.polygon([(cx - 0.8 * r, cy - 0.7 * r), (cx + 0.8 * r, cy - 0.7 * r), (cx, cy - 1.9 * r)], fill=HAT_COLOUR)
    return image


def write_example_images(folder: str | Path, count: int = 6, size: int = 64) -> list[Path]:
    """Write `count` PNG images of the character into `folder` (created); return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        # Poses spread over a small range so the set is varied but clearly one character.
        centre = (0.35 + 0.3 * ((i * 37) % 10) / 10, 0.5 + 0.2 * ((i * 53) % 10) / 10)
        scale = 0.18 + 0.06 * ((i * 71) % 10) / 10
        path = folder / f"character_{i:02d}.png"
        draw_character(size, centre, scale).save(path)
        paths.append(path)
    return paths


def write_shaped_images(folder: str | Path, sizes: list[tuple[int, int]], alpha_left: bool = False) -> list[Path]:
    """One PNG of the character per `(width, height)` in `sizes` (mixed aspect ratios, for buckets).

    With `alpha_left`, each is RGBA with its left half fully transparent (an alpha-channel mask).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height) in enumerate(sizes):
        side = max(width, height)
        image = draw_character(side, (0.5, 0.5), 0.2).crop(((side - width) // 2, (side - height) // 2,
                                                           (side - width) // 2 + width, (side - height) // 2 + height))
        if alpha_left:
            image = image.convert("RGBA")
            alpha = Image.new("L", (width, height), 255)
            alpha.paste(0, (0, 0, width // 2, height))
            image.putalpha(alpha)
        path = folder / f"shaped_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def write_png_header(path: str | Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` pixels but holds no image data: what a decompression bomb
    or a forged header looks like to a loader, written in microseconds (nothing that large is allocated)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def write_animated(path: str | Path, colours=((255, 0, 0), (0, 255, 0)), size: int = 48) -> Path:
    """An animated image (WebP, PNG = APNG, or GIF by the suffix) with one plain frame per colour."""
    frames = [Image.new("RGB", (size, size), colour) for colour in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return Path(path)
