"""The one object that maps between an uploaded image, the model input and the feature grid.

Three coordinate frames, all continuous with ``(0, 0)`` at the top-left corner, ``x`` to the right
and ``y`` down (pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``; its centre is ``(i+0.5, j+0.5)``):

* **original**: the uploaded image after EXIF orientation, ``width x height`` pixels. Clicks and
  match coordinates are in this frame; a valid point has ``0 <= x < width`` and ``0 <= y < height``.
* **input**: the model input, ``input_height x input_width`` (one of the bundle's sizes). The image
  occupies the top-left ``content_width x content_height`` pixels of it:
  ``u = x * content_width / width``, ``v = y * content_height / height``.
* **feature grid**: ``grid_height x grid_width`` cells of ``stride`` input pixels; cell
  ``(row, col)`` covers input ``[col*stride, (col+1)*stride) x [row*stride, (row+1)*stride)`` and its
  centre is ``((col+0.5)*stride, (row+0.5)*stride)``.

Resize policies (``LIFT_RESIZE_POLICY``):

* ``square`` (default): pick the bundle size closest in aspect ratio (then in area) and resize the
  whole image to it, ignoring its aspect ratio; ``content = input``, every cell sees the image.
* ``keep_aspect``: pick the bundle size that the image fills most after an aspect-preserving scale
  (then closest in area), scale the image to fit inside it (``content`` = the scaled image, each side
  rounded to whole pixels, so x and y scales may differ by < 1 pixel) and pad the bottom and right
  with black. Padding cells (centre outside the content) are excluded from matches; similarity maps
  are cropped to the content before being drawn over the image.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

RESIZE_POLICIES = ("square", "keep_aspect")


def choose_input_size(width: int, height: int, sizes, policy: str) -> tuple[int, int]:
    """The bundle size ``(height, width)`` an image of ``width x height`` is resized to (see module doc)."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if not sizes:
        raise ValueError("the bundle offers no input sizes")
    aspect = width / height

    def area_distance(size):
        return abs(math.log(size[0] * size[1] / (width * height)))

    if policy == "square":
        def key(size):
            return (round(abs(math.log(size[1] / size[0] / aspect)), 9), area_distance(size))
    else:
        def key(size):
            scale = min(size[0] / height, size[1] / width)
            filled = (height * scale) * (width * scale) / (size[0] * size[1])
            return (round(-filled, 9), area_distance(size))
    best = min(sizes, key=key)
    return int(best[0]), int(best[1])


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """How one image of a given size is fed to the model and how its points map to feature cells.

    Build it with :meth:`plan`; all mappings between frames (module doc) go through its methods.
    """

    width: int  # original image, after EXIF orientation
    height: int
    input_height: int  # model input
    input_width: int
    content_width: int  # image region inside the input (top-left anchored)
    content_height: int
    stride: float  # input pixels per feature cell
    policy: str

    @classmethod
    def plan(cls, width: int, height: int, sizes, policy: str, stride: float) -> ImageGeometry:
        """Geometry for an original ``width x height`` image, bundle ``sizes`` [(h, w)] and ``stride``."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        input_height, input_width = choose_input_size(width, height, sizes, policy)
        if policy == "square":
            content_width, content_height = input_width, input_height
        else:
            scale = min(input_height / height, input_width / width)
            content_width = min(input_width, max(1, round(width * scale)))
            content_height = min(input_height, max(1, round(height * scale)))
        return cls(width, height, input_height, input_width, content_width, content_height, float(stride), policy)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def grid_height(self) -> int:
        return int(round(self.input_height / self.stride))

    @property
    def grid_width(self) -> int:
        return int(round(self.input_width / self.stride))

    @property
    def content_grid(self) -> tuple[int, int]:
        """``(rows, cols)``: the top-left cells whose centres lie on the image (all cells for ``square``)."""
        rows = math.ceil(self.content_height / self.stride - 0.5)
        cols = math.ceil(self.content_width / self.stride - 0.5)
        return max(1, min(rows, self.grid_height)), max(1, min(cols, self.grid_width))

    @property
    def content_box(self) -> tuple[float, float, float, float]:
        """The image's extent on the feature grid in cell units ``(left, top, right, bottom)``.

        A ``[grid_height, grid_width]`` map resized with Pillow's ``box=`` set to this lands exactly
        on the original image (Pillow treats cell ``(r, c)`` as the square ``[c, c+1) x [r, r+1)``).
        """
        return (0.0, 0.0, self.content_width / self.stride, self.content_height / self.stride)

    @property
    def scale_x(self) -> float:
        """Input pixels per original pixel along x."""
        return self.content_width / self.width

    @property
    def scale_y(self) -> float:
        return self.content_height / self.height

    # -- image -----------------------------------------------------------------------------------
    def _is_reduction(self, size: tuple[int, int]) -> bool:
        """A JPEG decoded at 1/2, 1/4 or 1/8 scale (``decode_image(at_least=...)``), still at least the
        content's size."""
        return any(size == (math.ceil(self.width / s), math.ceil(self.height / s)) for s in (2, 4, 8)) and \
            size[0] >= self.content_width and size[1] >= self.content_height

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The model input for ``image`` (RGB, ``width x height``, or a JPEG decode reduced by 2, 4 or
        8 to no less than the content's size): uint8 ``[input_height, input_width, 3]``.

        Pillow's bicubic resize filters over the whole footprint when shrinking (antialiased).
        """
        if image.size != (self.width, self.height) and not self._is_reduction(image.size):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]}, "
                             f"geometry planned for {self.width}x{self.height}")
        resized = image if image.size == (self.content_width, self.content_height) else image.resize(
            (self.content_width, self.content_height), Image.Resampling.BICUBIC)
        pixels = np.asarray(resized, dtype=np.uint8)
        if (self.content_width, self.content_height) == (self.input_width, self.input_height):
            return np.ascontiguousarray(pixels)
        canvas = np.zeros((self.input_height, self.input_width, 3), np.uint8)
        canvas[: self.content_height, : self.content_width] = pixels
        return canvas

    # -- points ----------------------------------------------------------------------------------
    def contains(self, x: float, y: float) -> bool:
        return 0 <= x < self.width and 0 <= y < self.height

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Original ``(x, y)`` -> input ``(u, v)``."""
        return x * self.scale_x, y * self.scale_y

    def from_input(self, u: float, v: float) -> tuple[float, float]:
        """Input ``(u, v)`` -> original ``(x, y)``."""
        return u / self.scale_x, v / self.scale_y

    def to_cell(self, x: float, y: float) -> tuple[int, int]:
        """The feature cell ``(row, col)`` containing original point ``(x, y)``.

        With ``keep_aspect``, a point in a last partial cell whose centre lies on the padding maps to
        its neighbour centred on the image (:attr:`content_grid`), whose descriptor sees the image
        rather than mostly black padding.

        Raises:
            ValueError: the point is outside the image (message names the image size).
        """
        if not self.contains(x, y):
            raise ValueError(
                f"point ({x:g}, {y:g}) is outside the image, which is {self.width}x{self.height} pixels "
                f"(width x height): need 0 <= x < {self.width} and 0 <= y < {self.height}"
            )
        u, v = self.to_input(x, y)
        rows, cols = self.content_grid
        return min(int(v // self.stride), rows - 1), min(int(u // self.stride), cols - 1)

    def cell_center(self, row: float, col: float) -> tuple[float, float]:
        """Centre of feature cell ``(row, col)`` in original pixels ``(x, y)``."""
        return self.from_input((col + 0.5) * self.stride, (row + 0.5) * self.stride)

    def cell_centers(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`cell_center`: ``[N]`` rows and cols -> ``[N, 2]`` original ``(x, y)``."""
        x = (np.asarray(cols, np.float64) + 0.5) * self.stride / self.scale_x
        y = (np.asarray(rows, np.float64) + 0.5) * self.stride / self.scale_y
        return np.stack([x, y], axis=-1)

    def describe(self) -> dict:
        """JSON-ready summary: sizes as ``{"width", "height"}`` objects, stride in input pixels."""
        return {
            "image_size": {"width": self.width, "height": self.height},
            "input_size": {"width": self.input_width, "height": self.input_height},
            "content_size": {"width": self.content_width, "height": self.content_height},
            "grid_size": {"width": self.grid_width, "height": self.grid_height},
            "stride": self.stride,
            "resize_policy": self.policy,
            "cell_center": "x = (col + 0.5) * stride * image_width / content_width, likewise y with rows",
        }
