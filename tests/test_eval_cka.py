"""`lift eval cka`: linear CKA properties and the scale evaluation end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lift_serve.bench.cka import evaluate_cka, grid_rows, linear_cka, scaled_size
from lift_serve.bench.eval_common import Method, TorchFeatureSource
from PIL import Image

from tests.conftest import tiny_spec_dict


def test_cka_of_a_map_with_itself_is_one_and_unrelated_maps_score_low():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    assert linear_cka(x, x) == pytest.approx(1.0)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)  # invariant to rotation, scale, shift
    assert linear_cka(x, rng.normal(size=(500, 16))) < 0.1
    assert 0.1 < linear_cka(x, x + rng.normal(size=(500, 16))) < 0.9
    with pytest.raises(ValueError):
        linear_cka(x, x[:10])


def test_grid_rows_and_scaled_sizes():
    features = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    rows = grid_rows(features, (4, 4))
    assert rows.shape == (16, 2)
    np.testing.assert_array_equal(rows[:, 0], features[0].ravel())
    assert grid_rows(features, (2, 2)).shape == (4, 2)
    assert [scaled_size(224, s, 16) for s in (1, 0.75, 0.5, 0.01)] == [224, 160, 112, 16]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(2):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC).save(folder / f"p{i}.png")
    return folder


def test_scale_evaluation_reference_is_one(photo_dir, tiny_backbone):
    from lift_serve.bench.eval_common import list_images, load_rgb, square_crop
    from lift_serve.model.backbone import BackboneSpec

    source = TorchFeatureSource(BackboneSpec.from_dict(tiny_spec_dict()), None)
    images = [square_crop(load_rgb(p), 64) for p in list_images(photo_dir)]
    methods = [Method("backbone"), Method("bilinear", 1)]
    results = evaluate_cka(images, {m: source.feature_fn(m) for m in methods}, [0.5], 16,
                           source.feature_fn(Method("backbone")), progress=False)
    assert results["input_sizes"] == {"1": 64, "0.5": 32}
    assert results["backbone"]["self"]["1"] == pytest.approx(1.0)
    assert results["backbone"]["vs_backbone"]["1"] == pytest.approx(1.0)
    assert results["bilinear:1"]["grid"] == [8, 8]
    assert results["bilinear:1"]["self"]["1"] == pytest.approx(1.0)
    assert 0.0 < results["backbone"]["self"]["0.5"] < 0.999


def test_cli_writes_json_and_plot(photo_dir, tiny_lift, tmp_path, capsys):
    from lift_serve.model.checkpoint import CheckpointMeta, save_lift_checkpoint

    from lift_serve.cli import main

    ckpt = save_lift_checkpoint(tmp_path / "lift.safetensors", tiny_lift,
                                CheckpointMeta(backbone=tiny_spec_dict(), channels=32, patch_size=16,
                                               mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    out = tmp_path / "cka.json"
    assert main(["eval", "cka", "--images", str(photo_dir), "--size", "64", "--scales", "1,0.5",
                 "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"input_sizes", "backbone", "bilinear:1", "lift:1"}
    assert report["results"]["lift:1"]["self"]["1"] == pytest.approx(1.0)
    assert "| LiFT |" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main(["eval", "cka", "--images", str(photo_dir), "--scales", "1,-2", "--out", str(out)]) == 2
