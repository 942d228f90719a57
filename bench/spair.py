"""SPair-71k keypoint-correspondence PCK: the LiFT authors' evaluation protocol, and a cosine variant.

On-disk layout read here (the dataset as distributed)::

    ROOT/PairAnnotation/{trn,val,test}/<pair_id>-<src>-<trg>:<category>.json
    ROOT/JPEGImages/<category>/<name>.jpg
    ROOT/ImageAnnotation/<category>/<name>.json      (not needed; the pair files are self-contained)

Each pair file holds ``src_imname``, ``trg_imname``, ``category``, ``src_imsize``/``trg_imsize``
(``[width, height, depth]``), ``src_bndbox``/``trg_bndbox`` (``[x1, y1, x2, y2]`` pixels), and
``src_kps``/``trg_kps`` (lists of ``[x, y]``; only keypoints visible in *both* images are listed,
aligned by ``kps_ids``). Entries that are ``null`` or have a negative coordinate are treated as
invisible and dropped from both lists, so files from other SPair-style tools are read too.

Two protocols (``protocol=``), which share the geometry:

1. both images: long side resized to ``size`` with Lanczos, short side to ``round(size*short/long)``,
   zero-padded to a ``size`` x ``size`` square with the image centred (offset ``(size-new)//2``);
   keypoints move the same way: ``x' = x * scale + offset_x``;
2. it is correct at ``alpha`` when its distance to the true target keypoint is ``< alpha * T``,
   ``T = max(x2-x1, y2-y1)`` of the target box times the target's resize scale; PCK per category is
   over all its keypoints.

``authors`` (the default) is the LiFT authors' ``eval_spair.py``, step for step, which the paper's
SPair numbers come from:

* features are L2-normalised per cell, *then* bilinearly upsampled to the square, and not
  normalised again; a source keypoint takes the row ``size * floor(y') + int(x')`` of the flattened
  map, and its match is the target pixel of the largest plain dot product (first one on ties). The
  interpolated unit vectors are shorter between cells, so predictions land on the pixels next to
  cell centres (or in the border band outside the outermost centres, where upsampling repeats the
  outer cells);
* pairs: per category, the pair files sorted by name, then ``N`` draws *with replacement*
  (``numpy.random.RandomState(seed).choice(len, N)``, default N = 100, the authors'
  ``--pairs_per_category``), one random stream over the categories in sorted order (the authors
  walk them in ``os.listdir`` order, which differs between file systems; sorted is the reproducible
  reading). ``N = 0`` takes every pair once;
* keypoints, errors and thresholds in float32, as their tensors are (an integer keypoint can land on
  another query pixel in float64).

``cosine`` is the variant this project used first: features bilinearly upsampled, then normalised
per pixel (true cosine similarity of the upsampled features; predictions can land anywhere), and
``--max-pairs N`` a seeded sample without replacement (all pairs by default).

``overall`` averages the categories (as the paper's tables), ``all_keypoints`` pools every keypoint.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lift_serve.bench.eval_common import EvalError, FeatureFn, load_rgb

ALPHAS = (0.1, 0.05, 0.01)
PROTOCOLS = ("authors", "cosine")
AUTHORS_PAIRS_PER_CATEGORY = 100
SPLIT_DIRS = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}


@dataclasses.dataclass(frozen=True)
class SPairPair:
    """One annotated pair; coordinates in each ORIGINAL image's pixels.

    Attributes:
        name: annotation file stem.
        category: object class.
        src_image, trg_image: image paths.
        src_kps, trg_kps: [K, 2] float (x, y) of the keypoints visible in both images, row i of one
            corresponding to row i of the other.
        src_bbox, trg_bbox: (x1, y1, x2, y2).
    """

    name: str
    category: str
    src_image: Path
    trg_image: Path
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: tuple[float, float, float, float]
    trg_bbox: tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class PaddedSquare:
    """The resize-and-pad of one image: maps the image, its points and its lengths together.

    Original frame: pixels of the image as stored. Square frame: the ``size`` x ``size`` model input.
    """

    size: int
    scale: float
    new_width: int
    new_height: int
    offset_x: int
    offset_y: int

    @classmethod
    def for_image(cls, width: int, height: int, size: int) -> PaddedSquare:
        scale = size / max(width, height)
        if width >= height:
            new_w, new_h = size, int(round(size * height / width))
        else:
            new_w, new_h = int(round(size * width / height)), size
        return cls(size, scale, new_w, new_h, (size - new_w) // 2, (size - new_h) // 2)

    def apply_image(self, image) -> np.ndarray:
        """PIL RGB image -> uint8 [size, size, 3], zero padding around the centred image."""
        from PIL import Image

        resized = np.asarray(image.resize((self.new_width, self.new_height), Image.Resampling.LANCZOS))
        canvas = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        canvas[self.offset_y:self.offset_y + self.new_height, self.offset_x:self.offset_x + self.new_width] = resized
        return canvas

    def apply_coords(self, points: np.ndarray) -> np.ndarray:
        """[K, 2] (x, y) original pixels -> [K, 2] square-frame pixels."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return points * self.scale + np.array([self.offset_x, self.offset_y], dtype=np.float64)

    def apply_length(self, length: float) -> float:
        return float(length) * self.scale

    def apply_coords_float32(self, points: np.ndarray) -> np.ndarray:
        """:meth:`apply_coords` in float32, as eval_spair.py computes it (a float32 tensor scaled in
        place, then shifted): an integer keypoint such as 90 * 0.7 can land on 63.0 in float32 but on
        62.99999999999999 in float64, i.e. on another query pixel."""
        points = np.asarray(points, dtype=np.float32).reshape(-1, 2) * np.float32(self.scale)
        return points + np.array([self.offset_x, self.offset_y], dtype=np.float32)


# -- reading ------------------------------------------------------------------------------------


def _visible_pairs(src: list, trg: list, where: Path) -> tuple[np.ndarray, np.ndarray]:
    if len(src) != len(trg):
        raise EvalError(f"{where}: src_kps has {len(src)} entries but trg_kps has {len(trg)}")
    keep_src, keep_trg = [], []
    for a, b in zip(src, trg, strict=True):
        if a is None or b is None or min(a[:2]) < 0 or min(b[:2]) < 0:
            continue  # invisible in one of the images
        keep_src.append([float(a[0]), float(a[1])])
        keep_trg.append([float(b[0]), float(b[1])])
    return np.array(keep_src, dtype=np.float64).reshape(-1, 2), np.array(keep_trg, dtype=np.float64).reshape(-1, 2)


def parse_pair_file(path: Path, root: Path) -> SPairPair:
    try:
        data = json.loads(path.read_text())
        category = data["category"]
        src_kps, trg_kps = _visible_pairs(data["src_kps"], data["trg_kps"], path)
        return SPairPair(
            name=path.stem, category=category,
            src_image=root / "JPEGImages" / category / data["src_imname"],
            trg_image=root / "JPEGImages" / category / data["trg_imname"],
            src_kps=src_kps, trg_kps=trg_kps,
            src_bbox=tuple(float(v) for v in data["src_bndbox"][:4]),
            trg_bbox=tuple(float(v) for v in data["trg_bndbox"][:4]),
        )
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path} is not valid JSON: {exc}") from None
    except KeyError as exc:
        raise EvalError(f"{path} lacks the SPair field {exc}; is this an SPair-71k PairAnnotation file?") from None


def read_spair_pairs(
    root: str | Path,
    split: str = "test",
    categories: Sequence[str] | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    protocol: str = "authors",
) -> list[SPairPair]:
    """Pairs of one split, grouped by category (sorted), sampled as ``protocol`` does.

    ``authors``: ``max_pairs`` (None = 100) draws with replacement per category from one seeded
    NumPy stream, 0 = every pair once. ``cosine``: ``max_pairs`` (None = all) without replacement.
    """
    root = Path(root)
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if split not in SPLIT_DIRS:
        raise EvalError(f"unknown split {split!r}; choose one of {sorted(SPLIT_DIRS)}")
    folder = root / "PairAnnotation" / SPLIT_DIRS[split]
    if not folder.is_dir():
        raise EvalError(
            f"{folder} does not exist; --root must be the SPair-71k folder that holds PairAnnotation/ and "
            "JPEGImages/ (download SPair-71k.tar.gz from https://cvlab.postech.ac.kr/research/SPair-71k/)"
        )
    by_category: dict[str, list[SPairPair]] = {}
    for path in sorted(folder.glob("*.json")):
        pair = parse_pair_file(path, root)
        by_category.setdefault(pair.category, []).append(pair)
    if not by_category:
        raise EvalError(f"no pair annotations (*.json) in {folder}")
    if categories:
        unknown = sorted(set(categories) - set(by_category))
        if unknown:
            raise EvalError(f"categories {unknown} have no pairs in {folder}; available: {sorted(by_category)}")
        by_category = {c: by_category[c] for c in categories}
    if protocol == "authors":
        return _authors_sample(by_category, AUTHORS_PAIRS_PER_CATEGORY if max_pairs is None else max_pairs, seed)
    if max_pairs is not None and max_pairs < 1:
        raise EvalError("--max-pairs must be >= 1")
    pairs = []
    for category in sorted(by_category):
        chosen = by_category[category]
        if max_pairs is not None and len(chosen) > max_pairs:
            rng = random.Random(f"{seed}:{category}")
            chosen = [chosen[i] for i in sorted(rng.sample(range(len(chosen)), max_pairs))]
        pairs.extend(chosen)
    return pairs


def _authors_sample(by_category: dict[str, list[SPairPair]], draws: int, seed: int) -> list[SPairPair]:
    """eval_spair.py's sampling: ``np.random.seed(seed)`` once, then for each category
    ``np.random.choice(len(pairs), draws)`` (with replacement, even with fewer pairs than draws)."""
    if draws < 0:
        raise EvalError("--max-pairs must be >= 0 (0 = every pair once) under --protocol authors")
    rng = np.random.RandomState(seed)  # the legacy global stream that np.random.seed/choice use
    pairs = []
    for category in sorted(by_category):
        chosen = by_category[category]
        if draws:
            chosen = [chosen[i] for i in rng.choice(len(chosen), draws)]
        pairs.extend(chosen)
    return pairs


# -- matching and scoring -----------------------------------------------------------------------


def dense_unit_features(features: np.ndarray, size: int):
    """[C, h, w] -> torch [C, size*size]: features bilinearly upsampled to the square, then scaled to
    unit length per pixel, so dot products are the cosine similarities of the upsampled features.
    (Normalising before upsampling would not: interpolated unit vectors are shorter between cells,
    which biases the argmax toward cell centres.)"""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None]
    tensor = F.normalize(F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False), dim=1)
    return tensor[0].reshape(tensor.shape[1], size * size)


def upsampled_unit_cells(features: np.ndarray, size: int):
    """[C, h, w] -> torch [C, size*size], the authors' order: each cell scaled to unit length, then
    bilinearly upsampled to the square (``align_corners=False``), not normalised again."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None]
    tensor = F.interpolate(F.normalize(tensor, dim=1), size=(size, size), mode="bilinear", align_corners=False)
    return tensor[0].reshape(tensor.shape[1], size * size)


def transfer_keypoints(src_features: np.ndarray, trg_features: np.ndarray, src_points: np.ndarray,
                       size: int, protocol: str = "authors") -> np.ndarray:
    """Match source keypoints to the most similar target pixel.

    Args:
        src_features, trg_features: [C, h, w] features of the two square inputs.
        src_points: [K, 2] (x, y) in the square frame of the source.
        size: side of the square frame.
        protocol: ``authors`` (normalise cells, upsample, dot product; query row
            ``size*floor(y) + int(x)``) or ``cosine`` (upsample, normalise; query pixel clipped).

    Returns:
        [K, 2] integer (x, y) target pixels in the square frame.
    """
    if protocol == "authors":
        src = upsampled_unit_cells(src_features, size)
        trg = upsampled_unit_cells(trg_features, size)
        rows = np.floor(src_points[:, 1]).astype(np.int64) * size + src_points[:, 0].astype(np.int64)
        # The authors index without a check; keypoints of a real image always fall inside, and a
        # clip keeps a malformed annotation from crashing the run.
        queries = src[:, np.clip(rows, 0, size * size - 1)].T
        best = (queries @ trg).argmax(dim=1).numpy()
        return np.stack([best % size, best // size], axis=1).astype(np.float64)
    if protocol != "cosine":
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    src = dense_unit_features(src_features, size)
    trg = dense_unit_features(trg_features, size)
    cols = np.clip(np.floor(src_points[:, 0]).astype(np.int64), 0, size - 1)
    rows = np.clip(np.floor(src_points[:, 1]).astype(np.int64), 0, size - 1)
    queries = src[:, rows * size + cols].T  # [K, C]
    best = (queries @ trg).argmax(dim=1).numpy()
    return np.stack([best % size, best // size], axis=1).astype(np.float64)


def _empty_counts(alphas: Sequence[float]) -> dict[str, Any]:
    return {"pairs": 0, "keypoints": 0, "correct": {a: 0 for a in alphas}}


def evaluate_spair(
    pairs: Iterable[SPairPair],
    feature_fn: FeatureFn,
    size: int = 224,
    alphas: Sequence[float] = ALPHAS,
    progress: bool = True,
    protocol: str = "authors",
) -> dict[str, Any]:
    """PCK of ``feature_fn`` on ``pairs`` under ``protocol`` (see the module docstring). A pair drawn
    more than once (the authors' sampling is with replacement) counts each time, computed once.

    Returns:
        ``{"per_category": {cat: {"pairs", "keypoints", "pck@0.1", ...}}, "overall": {...mean over
        categories...}, "all_keypoints": {...pooled...}}``, PCK in percent.
    """
    from tqdm import tqdm

    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    pairs = list(pairs)
    counts: dict[str, dict[str, Any]] = {}
    scored: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
    for pair in tqdm(pairs, desc="SPair pairs", unit="pair", disable=not progress):
        entry = counts.setdefault(pair.category, _empty_counts(alphas))
        entry["pairs"] += 1
        if not len(pair.src_kps):
            continue
        key = (pair.category, pair.name)
        if key not in scored:
            scored[key] = _pair_errors(pair, feature_fn, size, protocol)
        errors, threshold = scored[key]
        entry["keypoints"] += len(errors)
        for alpha in alphas:
            # float32 under the authors' protocol (threshold and alpha as their float32 tensors)
            limit = np.float32(alpha) * threshold if protocol == "authors" else alpha * threshold
            entry["correct"][alpha] += int((errors < limit).sum())
    return summarize(counts, alphas)


def _pair_errors(pair: SPairPair, feature_fn: FeatureFn, size: int, protocol: str) -> tuple[np.ndarray, float]:
    """Per-keypoint transfer errors (square-frame pixels) of one pair, and its PCK length T."""
    src_image, trg_image = load_rgb(pair.src_image), load_rgb(pair.trg_image)
    src_geo = PaddedSquare.for_image(*src_image.size, size)
    trg_geo = PaddedSquare.for_image(*trg_image.size, size)
    src_features = feature_fn(src_geo.apply_image(src_image))
    trg_features = feature_fn(trg_geo.apply_image(trg_image))
    x1, y1, x2, y2 = pair.trg_bbox
    if protocol == "authors":  # keypoints, errors and the threshold in float32, as eval_spair.py
        predicted = transfer_keypoints(src_features, trg_features, src_geo.apply_coords_float32(pair.src_kps), size,
                                       protocol)
        errors = np.linalg.norm(predicted.astype(np.float32) - trg_geo.apply_coords_float32(pair.trg_kps), axis=1)
        return errors, np.float32(trg_geo.apply_length(max(x2 - x1, y2 - y1)))
    predicted = transfer_keypoints(src_features, trg_features, src_geo.apply_coords(pair.src_kps), size, protocol)
    errors = np.linalg.norm(predicted - trg_geo.apply_coords(pair.trg_kps), axis=1)
    return errors, trg_geo.apply_length(max(x2 - x1, y2 - y1))


def summarize(counts: dict[str, dict[str, Any]], alphas: Sequence[float]) -> dict[str, Any]:
    def pck(correct: int, total: int) -> float:
        return 100.0 * correct / total if total else 0.0

    per_category = {}
    for category in sorted(counts):
        entry = counts[category]
        row = {"pairs": entry["pairs"], "keypoints": entry["keypoints"]}
        row.update({f"pck@{a}": pck(entry["correct"][a], entry["keypoints"]) for a in alphas})
        per_category[category] = row
    scored = [c for c in per_category if per_category[c]["keypoints"]]
    overall = {"categories": len(scored), "pairs": sum(e["pairs"] for e in counts.values())}
    overall.update({f"pck@{a}": float(np.mean([per_category[c][f"pck@{a}"] for c in scored])) if scored else 0.0
                    for a in alphas})
    total = sum(e["keypoints"] for e in counts.values())
    pooled = {"keypoints": total}
    pooled.update({f"pck@{a}": pck(sum(e["correct"][a] for e in counts.values()), total) for a in alphas})
    return {"per_category": per_category, "overall": overall, "all_keypoints": pooled}


# -- a synthetic dataset in the same layout -----------------------------------------------------

PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255))


def make_synthetic_spair(root: str | Path, split: str = "test", seed: int = 0,
                         categories: Sequence[str] = ("cat", "dog"), pairs_per_category: int = 2) -> Path:
    """Write a tiny SPair-71k look-alike under ``root`` (same folders, file names and JSON fields).

    Each image is a plain grey JPEG (112x80 or 80x112, so both padding directions occur) with
    keypoint ``k`` drawn as a 6x6 square of colour ``PALETTE[k]``, so a test can find keypoints from
    pixels alone. The last keypoint is invisible in every target: absent from the pair lists and
    ``null`` in the target's ImageAnnotation. Bounding boxes span the image less a 2 px margin.
    Returns ``root``.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    split_dir = root / "PairAnnotation" / SPLIT_DIRS[split]
    split_dir.mkdir(parents=True, exist_ok=True)
    pair_id = 0
    for category in categories:
        (root / "JPEGImages" / category).mkdir(parents=True, exist_ok=True)
        (root / "ImageAnnotation" / category).mkdir(parents=True, exist_ok=True)
        for _ in range(pairs_per_category):
            pair_id += 1
            names, kps, boxes, sizes = [], [], [], []
            for side in ("src", "trg"):
                width, height = (112, 80) if (pair_id + (side == "trg")) % 2 else (80, 112)
                points = _spread_points(rng, width, height, len(PALETTE))
                pixels = np.full((height, width, 3), 128, dtype=np.uint8)
                for (x, y), colour in zip(points, PALETTE, strict=True):
                    pixels[y - 3:y + 3, x - 3:x + 3] = colour
                name = f"{category}_{pair_id:04d}_{side}"
                Image.fromarray(pixels).save(root / "JPEGImages" / category / f"{name}.jpg", quality=100,
                                              subsampling=0)
                box = [2, 2, width - 2, height - 2]
                visible = [[int(x), int(y)] for x, y in points]
                if side == "trg":
                    visible[-1] = None  # last keypoint hidden in the target
                image_json = {"filename": f"{name}.jpg", "src_database": "synthetic", "category": category,
                              "image_width": width, "image_height": height, "bndbox": box,
                              "kps": {str(i): v for i, v in enumerate(visible)}}
                (root / "ImageAnnotation" / category / f"{name}.json").write_text(json.dumps(image_json))
                names.append(f"{name}.jpg")
                kps.append(visible)
                boxes.append(box)
                sizes.append([width, height, 3])
            mutual = [i for i in range(len(PALETTE)) if kps[0][i] is not None and kps[1][i] is not None]
            pair_json = {
                "pair_id": pair_id, "filename": f"{pair_id:06d}", "src_imname": names[0], "trg_imname": names[1],
                "src_imsize": sizes[0], "trg_imsize": sizes[1], "src_bndbox": boxes[0], "trg_bndbox": boxes[1],
                "category": category, "src_pose": 0, "trg_pose": 0, "src_trncn": 0, "trg_trncn": 0,
                "src_occl": 0, "trg_occl": 0, "src_kps": [kps[0][i] for i in mutual],
                "trg_kps": [kps[1][i] for i in mutual], "kps_ids": [str(i) for i in mutual],
                "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0, "mirror": 0,
            }
            stem = f"{pair_id:06d}-{Path(names[0]).stem}-{Path(names[1]).stem}:{category}"
            (split_dir / f"{stem}.json").write_text(json.dumps(pair_json))
    return root


def _spread_points(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[int, int]]:
    """``count`` integer points at least 16 px apart and 8 px inside the image."""
    points: list[tuple[int, int]] = []
    while len(points) < count:
        x, y = int(rng.integers(8, width - 8)), int(rng.integers(8, height - 8))
        if all((x - a) ** 2 + (y - b) ** 2 >= 16**2 for a, b in points):
            points.append((x, y))
    return points
