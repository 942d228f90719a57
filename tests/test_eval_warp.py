"""`lift eval warp`: known homographies, determinism, identity = 100 %, the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lift_serve.bench.eval_common import Method, TorchFeatureSource
from lift_serve.bench.warp import (
    WarpConfig,
    apply_homography,
    evaluate_warp,
    homography_from_points,
    make_pairs,
    sample_homography,
    warp_image,
)
from PIL import Image

from tests.conftest import tiny_spec_dict

METHODS = [Method("backbone"), Method("bilinear", 1), Method("lift", 1), Method("lift", 2)]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(3):
        # smooth random colour fields (upsampled noise) look more like photos than white noise
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((80, 60), Image.Resampling.BICUBIC).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny_source(tiny_lift, tmp_path_factory):
    from lift_serve.model.checkpoint import CheckpointMeta, save_lift_checkpoint

    path = save_lift_checkpoint(tmp_path_factory.mktemp("ckpt") / "lift.safetensors", tiny_lift,
                                CheckpointMeta(backbone=tiny_spec_dict(), channels=32, patch_size=16,
                                               mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    return TorchFeatureSource(None, path), path


def test_homography_maps_points_like_the_warped_image():
    h = homography_from_points([[0, 0], [64, 0], [64, 64], [0, 64]], [[4, 2], [60, 6], [58, 62], [3, 57]])
    np.testing.assert_allclose(apply_homography(h, [[64, 0]]), [[60, 6]], atol=1e-9)
    image = np.zeros((64, 64, 3), np.uint8)
    image[30:34, 20:24] = 255  # a 4x4 block centred at (22, 32) in continuous pixel coordinates
    warped = warp_image(image, h).astype(float).sum(axis=2)
    rows, cols = np.mgrid[0:64, 0:64]
    centroid = np.array([(cols * warped).sum(), (rows * warped).sum()]) / warped.sum() + 0.5
    np.testing.assert_allclose(centroid, apply_homography(h, [[22, 32]])[0], atol=0.5)


def test_pairs_are_deterministic_per_seed(photo_dir):
    from lift_serve.bench.eval_common import list_images

    images = list_images(photo_dir)
    a = make_pairs(images, 4, seed=5, size=64, config=WarpConfig())
    b = make_pairs(images, 4, seed=5, size=64, config=WarpConfig())
    c = make_pairs(images, 4, seed=6, size=64, config=WarpConfig())
    for x, y in zip(a, b, strict=True):
        assert x.image == y.image
        np.testing.assert_array_equal(x.target, y.target)
        np.testing.assert_array_equal(x.homography, y.homography)
    assert not np.allclose(a[0].homography, c[0].homography)
    assert not np.allclose(a[0].homography, np.eye(3))
    # pair i does not depend on how many pairs are drawn
    np.testing.assert_array_equal(make_pairs(images, 2, 5, 64, WarpConfig())[1].target, a[1].target)


def test_identity_warp_is_perfect_for_every_method(photo_dir, tiny_source):
    from lift_serve.bench.eval_common import list_images

    source, _ = tiny_source
    pairs = make_pairs(list_images(photo_dir), 2, seed=0, size=64, config=WarpConfig(identity=True))
    assert np.array_equal(sample_homography(np.random.default_rng(0), 64, WarpConfig(identity=True)), np.eye(3))
    results = evaluate_warp(pairs, {m: source.feature_fn(m) for m in METHODS}, 64, (1.0, 4.0), progress=False)
    for method in METHODS:
        entry = results[method.name]
        assert entry["grid"] == [4 * method.scale, 4 * method.scale]
        assert entry["dense_nn"]["points"] == 2 * (4 * method.scale) ** 2
        for matcher in ("dense_nn", "mutual_nn"):
            assert entry[matcher]["pck@1px"] == 100.0
            assert entry[matcher]["points"] > 0


def test_real_warp_is_not_perfect_and_is_reproducible(photo_dir, tiny_source):
    from lift_serve.bench.eval_common import list_images

    source, _ = tiny_source
    images = list_images(photo_dir)
    fns = {m: source.feature_fn(m) for m in METHODS[:2]}
    first = evaluate_warp(make_pairs(images, 2, 1, 64, WarpConfig()), fns, 64, (2.0, 8.0), progress=False)
    again = evaluate_warp(make_pairs(images, 2, 1, 64, WarpConfig()), fns, 64, (2.0, 8.0), progress=False)
    assert first == again
    assert first["backbone"]["dense_nn"]["pck@2px"] < 100.0


def test_cli_writes_json_table_and_plot(photo_dir, tiny_source, tmp_path, capsys):
    from lift_serve.cli import main

    _, ckpt = tiny_source
    out = tmp_path / "warp.json"
    code = main(["eval", "warp", "--images", str(photo_dir), "--pairs", "2", "--seed", "3", "--size", "64",
                 "--checkpoint", str(ckpt), "--thresholds", "4,16", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["backbone", "bilinear:1", "lift:1", "bilinear:2", "lift:2"]
    assert report["config"]["seed"] == 3
    assert "| 2xLiFT | mutual_nn |" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main(["eval", "warp", "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
