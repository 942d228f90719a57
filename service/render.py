"""Pictures for people: similarity heat maps and side-by-side match drawings (Pillow + NumPy).

Placement on the original image is the geometry object's job (:class:`service.geometry.ImageGeometry`);
this module only colours and draws.
"""

from __future__ import annotations

import numpy as np
from lift_serve.service.geometry import ImageGeometry
from PIL import Image, ImageDraw

# A perceptually ordered dark-blue -> teal -> yellow ramp: position in [0, 1] -> RGB.
_RAMP_POSITIONS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_COLOURS = np.array([
    [20, 12, 80],
    [40, 90, 160],
    [30, 160, 140],
    [150, 210, 70],
    [255, 240, 40],
], dtype=np.float64)


def _palette() -> bytes:
    return colourize(np.linspace(0.0, 1.0, 256)).tobytes()


def colourize(values: np.ndarray) -> np.ndarray:
    """``[H, W]`` values in [0, 1] -> ``[H, W, 3]`` uint8 RGB on the ramp above."""
    v = np.clip(values, 0.0, 1.0)
    channels = [np.interp(v, _RAMP_POSITIONS, _RAMP_COLOURS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


_PALETTE = _palette()  # 256 RGB entries of the ramp, for palette PNGs


# Drawings never exceed these, whatever the images' sizes and aspect ratios: a heat map at the
# original size up to MAX_DRAWING_PIXELS (beyond, scaled down to fit), a match drawing at most
# MAX_DRAWING_SIDE wide and high.
MAX_DRAWING_PIXELS = 16_000_000
MAX_DRAWING_SIDE = 4096


def drawing_size(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` of a drawing of an image: its own size, scaled down to MAX_DRAWING_PIXELS
    and MAX_DRAWING_SIDE (aspect ratio kept, each side at least 1)."""
    scale = min(1.0, (MAX_DRAWING_PIXELS / (width * height)) ** 0.5, MAX_DRAWING_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def map_to_image(sim: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Resample a ``[grid_height, grid_width]`` cell map onto the original image (its drawing size,
    :func:`drawing_size`): ``[height, width]`` float32.

    Bilinear between cell centres; the part of the grid under padding (``keep_aspect``) is cropped.
    """
    grid = Image.fromarray(np.ascontiguousarray(sim, dtype=np.float32), mode="F")
    resized = grid.resize(drawing_size(geometry.width, geometry.height), Image.Resampling.BILINEAR,
                          box=geometry.content_box)
    return np.asarray(resized, dtype=np.float32)


def colour_range(sim: np.ndarray, geometry: ImageGeometry, scale: str = "auto") -> tuple[float, float]:
    """The similarities at the two ends of the colour ramp: the map's own range over the image's
    cells (``auto``), or the whole cosine range -1 to 1 (``absolute``, the same colours for every map)."""
    if scale == "absolute":
        return -1.0, 1.0
    rows, cols = geometry.content_grid
    return float(sim[:rows, :cols].min()), float(sim[:rows, :cols].max())


def heatmap_png_image(sim: np.ndarray, geometry: ImageGeometry, image: Image.Image | None,
                      alpha: float, span: tuple[float, float] | None = None) -> Image.Image:
    """The similarity map as a picture at the original image's size.

    Colours span ``span`` = (low, high), from :func:`colour_range` (default: its ``auto``, the map's
    own range over the image's cells, lowest similarity -> dark blue, the queried point's 1 ->
    yellow; ``absolute``: cosine -1 -> dark blue, 1 -> yellow, comparable between maps), quantised
    to 256 levels. Without ``image``: a palette (``P``) image, which encodes to PNG about three times
    faster than RGB. With ``image``: RGB, ``alpha`` * heat + (1 - ``alpha``) * image.
    """
    full = map_to_image(sim, geometry)
    lo, hi = span if span is not None else colour_range(sim, geometry)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    levels = np.clip(np.rint((full - lo) * scale), 0, 255).astype(np.uint8) if scale else np.full(full.shape, 255,
                                                                                                   np.uint8)
    heat = Image.frombytes("P", (full.shape[1], full.shape[0]), levels.tobytes())
    heat.putpalette(_PALETTE)
    if image is None:
        return heat
    if image.size != heat.size:
        image = image.resize(heat.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat.convert("RGB"), alpha)


def match_png_image(image_a: Image.Image, image_b: Image.Image, points_a: np.ndarray, points_b: np.ndarray,
                    scores: np.ndarray, height: int = 480) -> Image.Image:
    """Both images side by side at a common ``height`` with a line per match.

    Args:
        points_a, points_b: ``[N, 2]`` ``(x, y)`` in each ORIGINAL image's pixels.
        scores: ``[N]`` cosine similarities; line colour goes from blue (lowest) to yellow (highest).
    """
    height = max(16, min(height, max(image_a.height, image_b.height)))
    # Very wide images (a 1,000,000 x 1 strip) would make a canvas of gigapixels: shrink the common
    # height until the side-by-side width fits MAX_DRAWING_SIDE.
    total = image_a.width * height / image_a.height + image_b.width * height / image_b.height
    if total > MAX_DRAWING_SIDE:
        height = max(1, int(height * MAX_DRAWING_SIDE / total))
    scale_a, scale_b = height / image_a.height, height / image_b.height
    wa, wb = max(1, round(image_a.width * scale_a)), max(1, round(image_b.width * scale_b))
    if wa + wb > MAX_DRAWING_SIDE:  # rounding, or a side already at its 1-pixel minimum
        if wa >= wb:
            wa = max(1, MAX_DRAWING_SIDE - wb)
        else:
            wb = max(1, MAX_DRAWING_SIDE - wa)
    canvas = Image.new("RGB", (wa + wb, height))
    canvas.paste(image_a.convert("RGB").resize((wa, height), Image.Resampling.BILINEAR), (0, 0))
    canvas.paste(image_b.convert("RGB").resize((wb, height), Image.Resampling.BILINEAR), (wa, 0))
    draw = ImageDraw.Draw(canvas)
    if len(scores):
        lo, hi = float(np.min(scores)), float(np.max(scores))
        colours = colourize((np.asarray(scores) - lo) / (hi - lo) if hi > lo else np.ones(len(scores)))
        # Worst first so the best matches are drawn on top.
        for i in np.argsort(scores):
            xa, ya = points_a[i][0] * wa / image_a.width, points_a[i][1] * height / image_a.height
            xb, yb = wa + points_b[i][0] * wb / image_b.width, points_b[i][1] * height / image_b.height
            colour = tuple(int(c) for c in colours[i])
            draw.line([(xa, ya), (xb, yb)], fill=colour, width=1)
            for x, y in ((xa, ya), (xb, yb)):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
    return canvas
