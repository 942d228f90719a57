"""Bytes <-> arrays: image decoding with safety limits, and NumPy / PNG encoding.

Decoding is synchronous and CPU-bound; the routes call it in a worker thread so the event loop
stays free. Problems raise :class:`ImageError`, a domain error carrying the status a client should see
(``service.errors`` answers it):

* 400 ``empty_image``: zero bytes;
* 415 ``not_an_image``: Pillow does not recognise the bytes as any image format;
* 413 ``image_too_large``: the header declares more than ``max_pixels`` pixels (checked *before* the
  pixels are decompressed, so a small file declaring huge dimensions costs nothing);
* 400 ``corrupt_image``: recognised (by Pillow, or by the format's leading bytes) but undecodable,
  e.g. a truncated JPEG.

Any Pillow mode becomes 8-bit RGB: EXIF orientation is applied first; 16-bit integer images
(``I;16*``, and ``I`` taken as 16-bit) are scaled by 255/65535; float images (``F``) in [0, 1] are
scaled by 255, other float ranges are min-max stretched; images with alpha (``LA``, ``RGBA``, ``PA``,
``P`` with transparency) are composited over white; ``CMYK``, ``YCbCr``, ``L``, ``1``, ``P`` use
Pillow's conversion. Animated or multi-page files contribute their first frame.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps


class ImageError(ValueError):
    """An upload that cannot be used as an image: a domain error carrying the HTTP status it is
    answered with (400 corrupt or empty, 413 too large, 415 not an image or unsupported mode)
    and a stable code; ``service.errors`` turns it into the JSON error answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

# The formats Pillow may open, nothing else: Image.open tries only these plugins, so a file in any
# other format (EPS/PS/PDF, which Pillow renders by starting Ghostscript, among them) is never
# handed to a decoder and is answered 415 naming these.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "PPM")
ACCEPTED_TEXT = "JPEG, PNG, WebP, TIFF, BMP, GIF or PPM"
# A progressive JPEG is decoded once per scan: 2,000 scans in 330 KB took 83 s. Ordinary encoders
# write 1 (baseline) to about 12 (progressive) scans and a few dozen segments; the limits below keep
# the worst accepted file to a few seconds of decoding (bench/decode_bench.py measures it), and are
# checked by walking the marker structure before Pillow reads anything (Pillow's own header parser
# is a Python loop over segments, so a file of millions of empty segments would be slow to open).
MAX_JPEG_SCANS = 64
MAX_JPEG_SEGMENTS = 1024
# After a scan header, entropy-coded data runs to the next marker: FF followed by anything but
# 00 (a stuffed FF), FF (fill) or D0-D7 (restart markers, which belong to the scan).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# EXIF orientations 5..8 rotate by 90 degrees: width and height swap.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
# Orientation -> the transpose that undoes it (as ImageOps.exif_transpose), applied by one code path
# for the header's size and the pixels, whatever type the tag was stored as.
_UNDO_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                     6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
# Leading bytes of common formats: such a file that Pillow cannot open is damaged (400), not a non-image (415).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"RIFF")


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded. Sizes are after EXIF orientation."""

    width: int
    height: int
    format: str
    mode: str


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(400, "empty_image", "the image is empty (0 bytes); send the file's contents")
    if data.startswith(b"\xff\xd8"):
        _check_jpeg_structure(data)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check (Image.MAX_IMAGE_PIXELS) is replaced by the explicit one below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(413, "image_too_large", f"the image declares more pixels than the limit of "
                           f"{max_pixels}; send a smaller image") from None
    except Exception:
        if data.startswith(_SIGNATURES):
            raise ImageError(400, "corrupt_image", "the file starts like an image but its header cannot be read; "
                               "it is truncated or damaged — send the complete file") from None
        raise ImageError(
            415, "not_an_image",
            f"the {len(data)} bytes sent are not an image in a format this server accepts ({ACCEPTED_TEXT}); "
            "send an image file in one of those") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            413, "image_too_large",
            f"the image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels} "
            "(LIFT_MAX_PIXELS); send a smaller image")
    if width < 1 or height < 1:
        raise ImageError(400, "corrupt_image", f"the image declares an empty size {width}x{height}")
    return image


def _check_jpeg_structure(data: bytes) -> None:
    """Refuse (413) a JPEG of more than ``MAX_JPEG_SCANS`` scans or ``MAX_JPEG_SEGMENTS`` segments,
    counted by walking its markers: segment lengths are followed, so bytes inside APP/COM segments
    (an EXIF thumbnail's own scans among them) are not mistaken for markers. A damaged structure
    ends the walk quietly: the decoder then reports the file as corrupt."""
    scans = segments = 0
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:  # end of image
            return
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # restart / TEM: no length
            position += 2
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageError(413, "too_many_segments",
                             f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments (ordinary files have a few "
                             "dozen); re-save it with an ordinary encoder")
        (length,) = struct.unpack_from(">H", data, position + 2)
        position += 2 + length
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageError(413, "too_many_scans",
                                 f"the JPEG has more than {MAX_JPEG_SCANS} scans (ordinary files have 1 to about 12); "
                                 "each scan is a full decoding pass: re-save it as a baseline JPEG")
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                return
            position = found.start()


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8, read robustly: stored as a number, an ASCII digit ('6', seen in the
    wild) or a one-element sequence; anything else or out of range counts as 1 (as stored)."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
        if isinstance(value, bytes):
            value = value.decode("ascii", "ignore")
        if isinstance(value, tuple | list) and len(value) == 1:
            value = value[0]
        value = int(str(value).strip().strip("\x00")) if isinstance(value, str) else int(value)
    except Exception:  # a malformed EXIF block should not reject an otherwise fine image
        return 1
    return value if 1 <= value <= 8 else 1


def read_header(data: bytes, max_pixels: int) -> ImageHeader:
    """Image size (after EXIF orientation), format and mode from the header only."""
    image = _open(data, max_pixels)
    width, height = image.size
    # Pillow's TIFF reader already reports the oriented size (and transposes on load): swap only for others.
    if image.format != "TIFF" and _orientation(image) in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(width, height, image.format or "unknown", image.mode)


def decode_image(data: bytes, max_pixels: int, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` into an 8-bit RGB Pillow image, EXIF orientation applied (see module doc).

    ``at_least`` ``(width, height)`` (after orientation): a JPEG may be decoded at 1/2, 1/4 or 1/8 of
    its size in the DCT domain (Pillow's ``draft``), as long as the result is at least that large:
    the model input needs no more, and a 12-megapixel photo decodes several times faster. The
    caller resizes from there (:meth:`ImageGeometry.prepare` accepts such a reduction). Overlays
    and drawings decode without it.
    """
    image = _open(data, max_pixels)
    try:
        image.seek(0)
        orientation = _orientation(image)
        if at_least is not None and image.format == "JPEG":
            width, height = at_least
            if orientation in (5, 6, 7, 8):  # stored on its side: the request turns with it
                width, height = height, width
            image.draft(image.mode, (max(1, width), max(1, height)))
        image.load()
        if image.format == "TIFF":  # Pillow's TIFF reader orients on load; as read_header assumes
            image = ImageOps.exif_transpose(image) if orientation != 1 else image
        elif orientation in _UNDO_ORIENTATION:
            image = image.transpose(_UNDO_ORIENTATION[orientation])
        return to_rgb(image)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(413, "image_too_large", "the decoded image does not fit in the memory this server has "
                         "for it; send a smaller image (fewer pixels)") from None
    except Exception as exc:
        raise ImageError(
            400, "corrupt_image",
            f"the {image.format or 'image'} file could not be decoded ({str(exc)[:120]}); it may be truncated "
            "or damaged — send the complete file") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> ``RGB`` (rules in the module doc)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # Integer arithmetic, round(v * 255 / 65535) = (v + 128) // 257 exactly (v / 257 has no ties):
        # a 16-bit file peaks at about 7 bytes a pixel of NumPy memory here, not 26 as through float64.
        values = np.asarray(image)
        if mode == "I":
            values = np.clip(values, 0, 65535)
        values = values.astype(np.uint32)  # in place from here: one 4-byte copy at a time
        values += 128
        values //= 257
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0 and hi <= 1:
            return _gray_to_rgb(values * 255.0)
        return _gray_to_rgb((values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values))
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except Exception:
        raise ImageError(415, "unsupported_image_mode", f"images in Pillow mode {mode!r} cannot be converted "
                           "to RGB; send an 8-bit RGB image") from None


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes (NumPy format, readable with ``np.load(io.BytesIO(data))``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_json(content) -> bytes:
    """JSON bytes of ``content``, NumPy arrays included, through orjson: written from the array
    itself, 38x faster than ``json.dumps(array.tolist())`` for a 384 x 56 x 56 float32 array in one
    measurement. Floats are the shortest text that reads back as the same value in the array's own
    precision (``np.array(values, dtype)`` gives the array back bit for bit)."""
    import orjson

    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of an RGB image (``[H, W, 3]`` uint8 or Pillow). Light compression: speed over size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
