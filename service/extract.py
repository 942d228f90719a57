"""Features of a folder of images, straight through the runtime (no HTTP): ``lift extract``.

The images are found recursively (by extension), sorted, and each is brought to the model input as
the service does (same decoder, resize policy and geometry). Images of one input size are run in
batches; the output mirrors the folder:

* ``--format npy`` (default): one ``.npy`` per image, ``OUT/<relative path>.npy``, ``[C, h, w]``;
* ``--format safetensors``: shards ``OUT/features-00000.safetensors`` of ``--shard-size`` images,
  one tensor per image keyed by its relative path.

``OUT/index.jsonl`` gets one line per image written (file, output, shape, stride, sizes, the
image's sha256), ``OUT/errors.jsonl`` one per image the last run skipped (unreadable, not an image,
too large) with the reason (they are tried again on the next run), and ``OUT/extract.json`` the
settings. Everything is written to a temporary name and renamed, and an image counts as done once
its line is in the index, so an interrupted run resumes where it stopped; a run with other
settings into the same folder is refused.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lift_serve.service.cache import content_hash
from lift_serve.service.codec import ImageError, decode_image, read_header
from lift_serve.service.density import resolve_density
from lift_serve.service.errors import ServiceError
from lift_serve.service.geometry import ImageGeometry
from lift_serve.service.resample import resample_features

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm"}
SETTINGS_FILE, INDEX_FILE, ERRORS_FILE = "extract.json", "index.jsonl", "errors.jsonl"


class ExtractError(RuntimeError):
    user_facing = True


@dataclass(frozen=True)
class ExtractOptions:
    iterations: int | None = None
    stride: float | None = None
    dtype: str = "float16"
    format: str = "npy"
    shard_size: int = 256
    batch_size: int = 8
    resize_policy: str = "square"
    max_pixels: int = 40_000_000


def find_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ExtractError(f"--images {root} is not a directory")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: that image is done again
            continue
    return records


class Extractor:
    """One extraction run of ``runtime`` over ``images_dir`` into ``out_dir``."""

    def __init__(self, runtime, images_dir: Path, out_dir: Path, options: ExtractOptions, bundle: str):
        if options.format not in ("npy", "safetensors"):
            raise ExtractError(f"--format must be npy or safetensors, got {options.format!r}")
        if options.dtype not in ("float16", "float32"):
            raise ExtractError(f"--dtype must be float16 or float32, got {options.dtype!r}")
        if options.batch_size < 1 or options.shard_size < 1:
            raise ExtractError("--batch-size and --shard-size must be >= 1")
        self.runtime, self.images_dir, self.out_dir, self.options = runtime, images_dir, out_dir, options
        self.settings = {"bundle": bundle, "iterations": options.iterations, "stride": options.stride,
                         "dtype": options.dtype, "format": options.format, "shard_size": options.shard_size,
                         "resize_policy": options.resize_policy}

    # -- resume -------------------------------------------------------------------------------------
    def _check_settings(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / SETTINGS_FILE
        if path.is_file():
            before = json.loads(path.read_text())
            if before != self.settings:
                changed = sorted(k for k in self.settings if before.get(k) != self.settings[k])
                raise ExtractError(f"{self.out_dir} holds an extraction with other settings ({', '.join(changed)}); "
                                   "resume with the same options or choose another --out")
        else:
            _atomic_write(path, json.dumps(self.settings, indent=2).encode())

    def done(self) -> set[str]:
        """Relative paths already written (their index line exists and their output is there)."""
        return {r["file"] for r in _read_jsonl(self.out_dir / INDEX_FILE)
                if (self.out_dir / r["output"]).is_file()}

    # -- one image ------------------------------------------------------------------------------------
    def _prepare(self, path: Path):
        data = path.read_bytes()
        header = read_header(data, self.options.max_pixels)
        geometry = ImageGeometry.plan(header.width, header.height, self.runtime.sizes, self.options.resize_policy,
                                      self.runtime.patch_size)
        density = resolve_density(self.runtime, self.options.iterations, self.options.stride,
                                  (geometry.input_height, geometry.input_width))
        pixels = geometry.prepare(decode_image(data, self.options.max_pixels,
                                               at_least=(geometry.content_width, geometry.content_height)))
        return content_hash(data), geometry, density, pixels

    def _finish(self, features: np.ndarray, geometry: ImageGeometry, density) -> tuple[np.ndarray, float]:
        stride = density.stride or self.runtime.stride(density.iterations)
        if density.stride is not None:
            features = resample_features(features, round(geometry.input_height / stride),
                                         round(geometry.input_width / stride))
        return features.astype(self.options.dtype), float(stride)

    # -- the run ------------------------------------------------------------------------------------
    def run(self, progress=None) -> dict:
        """Extract what is not done yet; returns counts. ``progress(n)`` is called per image handled."""
        self._check_settings()
        (self.out_dir / ERRORS_FILE).unlink(missing_ok=True)  # the images this run skipped, and why
        files = find_images(self.images_dir)
        done = self.done()
        todo = [p for p in files if p.relative_to(self.images_dir).as_posix() not in done]
        counts = {"images": len(files), "skipped_done": len(files) - len(todo), "written": 0, "failed": 0}
        shard: dict[str, np.ndarray] = {}
        pending_index: list[dict] = []
        for batch in self._batches(todo, counts, progress):
            coarse_images = np.stack([item[4] for item in batch])
            k = batch[0][3].iterations
            outputs = self.runtime.run(coarse_images, k)
            for (path, digest, geometry, density, _), features in zip(batch, outputs, strict=True):
                rel = path.relative_to(self.images_dir).as_posix()
                array, stride = self._finish(features, geometry, density)
                record = {"file": rel, "shape": list(array.shape), "stride": stride, "dtype": self.options.dtype,
                          "input_size": [geometry.input_height, geometry.input_width],
                          "image_size": [geometry.width, geometry.height],
                          "sha256": digest}
                if self.options.format == "npy":
                    buffer = io.BytesIO()
                    np.save(buffer, array, allow_pickle=False)
                    record["output"] = f"{rel}.npy"
                    _atomic_write(self.out_dir / record["output"], buffer.getvalue())
                    _append(self.out_dir / INDEX_FILE, record)
                else:
                    shard[rel] = array
                    pending_index.append(record)
                    if len(shard) >= self.options.shard_size:
                        self._write_shard(shard, pending_index)
                counts["written"] += 1
                if progress:
                    progress(1)
        if shard:
            self._write_shard(shard, pending_index)
        return counts

    def _write_shard(self, shard: dict[str, np.ndarray], records: list[dict]) -> None:
        from safetensors.numpy import save

        existing = {r["output"] for r in _read_jsonl(self.out_dir / INDEX_FILE)}
        number = 0
        while f"features-{number:05d}.safetensors" in existing or \
                (self.out_dir / f"features-{number:05d}.safetensors").exists():
            number += 1
        name = f"features-{number:05d}.safetensors"
        _atomic_write(self.out_dir / name, save({key: np.ascontiguousarray(v) for key, v in shard.items()}))
        for record in records:
            _append(self.out_dir / INDEX_FILE, {**record, "output": name, "key": record["file"]})
        shard.clear()
        records.clear()

    def _batches(self, todo: list[Path], counts: dict, progress) -> Iterator[list]:
        """Batches of prepared images sharing one input size and step count; bad files are recorded."""
        waiting: dict[tuple, list] = {}
        for path in todo:
            try:
                digest, geometry, density, pixels = self._prepare(path)
            except (ImageError, ServiceError, OSError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                _append(self.out_dir / ERRORS_FILE, {"file": path.relative_to(self.images_dir).as_posix(),
                                                     "error": message})
                counts["failed"] += 1
                if progress:
                    progress(1)
                continue
            key = (geometry.input_height, geometry.input_width, density.iterations)
            group = waiting.setdefault(key, [])
            group.append((path, digest, geometry, density, pixels))
            if len(group) >= self.options.batch_size:
                yield waiting.pop(key)
        yield from (group for group in waiting.values() if group)
