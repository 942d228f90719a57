"""Training images: a folder searched recursively, made square (squashed, as the LiFT authors, or
centre-cropped), optional colour jitter.

Choices a user may want to know:

* Files are found by extension (jpg, jpeg, png, webp, bmp; any case), so ImageNet's class-folder
  layout works as is. Other files are ignored and counted.
* A quick header check (``PIL.Image.open``) at start-up drops files that are not images at all.
  Files that pass it but fail to decode later (truncated, corrupt) are skipped when loaded: the
  sample is replaced by the next readable file so every batch keeps its size (a rank with a short
  or empty batch would stall DistributedDataParallel), and the file's path is reported so the
  trainer can count it. A full decode of every file up front would take hours on ImageNet.
* ``resize="squash"`` (the default) resizes the whole image to ``imsize x imsize`` with bilinear
  filtering, ignoring its aspect ratio: what the authors' ``transforms.Resize((S, S))`` does to a
  PIL image. ``resize="crop"`` keeps the aspect ratio: the shorter side goes to ``imsize``
  (bicubic), then the centre square is cut out.
* Colour jitter (brightness, contrast, saturation, hue = 0.2) is drawn from a generator seeded by
  ``(seed, epoch, index)``, so augmentation is identical whatever the worker count, and a resumed
  run sees the same augmented images as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
JITTER = 0.2
# Broad on purpose: PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError,
# struct.error...) for damaged files, and a bad file must never stop a run.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError,
                 EOFError, IndexError, TypeError)


class DataError(ValueError):
    """The image folder cannot be used; the message says why and what to do."""

    user_facing = True


@dataclasses.dataclass
class ImageScan:
    """Result of searching an image folder.

    Attributes:
        paths: readable-looking image files, sorted (the order defines dataset indices).
        unreadable: files with an image extension that PIL cannot identify.
        ignored: files without an image extension.
    """

    paths: list[Path]
    unreadable: list[Path]
    ignored: int


def scan_image_folder(root: str | Path, check_headers: bool = True) -> ImageScan:
    """Find images under ``root`` recursively, or raise :class:`DataError` if there are none."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; pass --data with a folder of images "
                        f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}), searched recursively")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file, not a folder; pass the folder that holds the images")
    candidates, ignored = [], 0
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                candidates.append(Path(dirpath) / name)
            elif not name.startswith("."):
                ignored += 1
    candidates.sort()
    paths, unreadable = [], []
    for path in candidates:
        if not check_headers or _header_ok(path):
            paths.append(path)
        else:
            unreadable.append(path)
    if not paths:
        found = f"{len(unreadable)} unreadable image files and {ignored} other files" if candidates or ignored \
            else "nothing"
        raise DataError(f"no readable images under {root} (found {found}); expected files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)} (any case), in any sub-folders")
    return ImageScan(paths, unreadable, ignored)


def _header_ok(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - reading the header is the check
        return True
    except DECODE_ERRORS:
        return False


RESIZE_MODES = ("squash", "crop")


def load_square_image(path: Path, imsize: int, resize: str = "squash") -> Image.Image:
    """Decode ``path`` as RGB and make it ``imsize x imsize`` (see the module docstring for ``resize``)."""
    if resize not in RESIZE_MODES:
        raise DataError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    with Image.open(path) as image:
        image = image.convert("RGB")  # forces a full decode, so truncated files fail here
    if resize == "squash":
        return image.resize((imsize, imsize), Image.Resampling.BILINEAR)
    width, height = image.size
    scale = imsize / min(width, height)
    new_w, new_h = max(imsize, round(width * scale)), max(imsize, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - imsize) // 2, (new_h - imsize) // 2
    return image.crop((left, top, left + imsize, top + imsize))


class ImageFolderDataset(Dataset):
    """Square RGB images.

    Each item is ``(image, skipped)``: image is a uint8 tensor [3, imsize, imsize] (RGB 0..255;
    uint8 keeps worker-to-trainer transfers small, and the trainer converts and normalises with the
    backbone's mean/std on the device, see ``Preprocessing.normalize``) and
    ``skipped`` is a list of path strings that failed to decode and were replaced.
    """

    def __init__(self, paths: list[Path], imsize: int, augment: bool = False, seed: int = 0,
                 resize: str = "squash"):
        if not paths:
            raise DataError("the dataset has no images")
        if resize not in RESIZE_MODES:
            raise DataError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.paths = list(paths)
        self.imsize = imsize
        self.resize = resize
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``; call before iterating a new DataLoader."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]]:
        from torchvision.transforms.functional import pil_to_tensor

        skipped = []
        for attempt in range(len(self.paths)):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                image = load_square_image(path, self.imsize, self.resize)
                break
            except DECODE_ERRORS:
                skipped.append(str(path))
        else:
            raise DataError("none of the images in the folder could be decoded")
        if self.augment:
            image = self._jitter(image, index)
        return pil_to_tensor(image), skipped

    def _jitter(self, image: Image.Image, index: int) -> Image.Image:
        from torchvision.transforms import ColorJitter

        jitter = ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER, hue=JITTER)
        with torch.random.fork_rng(devices=[]):
            # ColorJitter draws from torch's global RNG; seed it per sample so the draw depends only
            # on (seed, epoch, index), not on worker count or on what ran before. It runs on the PIL
            # image (uint8 in, uint8 out), which is cheaper than on float tensors.
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF)
            return jitter(image)


def collate_images(batch: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    """Stack a batch: ([B,3,S,S] uint8, list of skipped paths)."""
    images = torch.stack([item[0] for item in batch])
    skipped = [path for item in batch for path in item[1]]
    return images, skipped


class ShardSampler(Sampler[int]):
    """Shuffled, rank-sharded indices for one epoch, optionally skipping the first indices.

    Wraps :class:`torch.utils.data.DistributedSampler` (which also serves the single-process case
    with ``num_replicas=1``) so the order depends only on ``(seed, epoch)``; ``skip`` drops the
    indices a resumed run already consumed in this epoch, without loading them.
    """

    def __init__(self, dataset_size: int, num_replicas: int, rank: int, seed: int, epoch: int, skip: int = 0):
        from torch.utils.data import DistributedSampler

        self._inner = DistributedSampler(range(dataset_size), num_replicas=num_replicas, rank=rank,
                                         shuffle=True, seed=seed, drop_last=False)
        self._inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self._inner)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self._inner) - self.skip)
