"""`lift eval spair` on a synthetic dataset in SPair-71k's on-disk layout.

The fixture draws keypoint k as a square of colour PALETTE[k]; a planted "perfect" feature function
finds those squares from pixels alone, so it scores 100 % only if the harness resizes, pads and maps
keypoints consistently with the images it feeds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from lift_serve.bench.eval_common import EvalError, load_rgb
from lift_serve.bench.spair import PALETTE, PaddedSquare, evaluate_spair, make_synthetic_spair, read_spair_pairs

from tests.conftest import tiny_spec_dict


def palette_features(image: np.ndarray) -> np.ndarray:
    """uint8 [S,S,3] -> [K+1,S,S]: one-hot K at a 3x3 plateau around each colour square's centroid."""
    k_count = len(PALETTE)
    size = image.shape[0]
    features = np.zeros((k_count + 1, size, size), np.float32)
    features[k_count] = 1.0  # background channel
    for k, colour in enumerate(PALETTE):
        mask = np.all(np.abs(image.astype(int) - colour) < 60, axis=-1)
        if mask.sum() < 4:
            continue
        rows, cols = np.nonzero(mask)
        r, c = int(round(rows.mean())), int(round(cols.mean()))
        features[:, r - 1:r + 2, c - 1:c + 2] = 0.0
        features[k, r - 1:r + 2, c - 1:c + 2] = 1.0
    return features


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory):
    return make_synthetic_spair(tmp_path_factory.mktemp("spair"), categories=("cat", "dog"), pairs_per_category=2)


def test_fixture_has_the_real_layout(spair_root):
    files = sorted((spair_root / "PairAnnotation" / "test").glob("*.json"))
    assert len(files) == 4
    assert all(":" in f.stem for f in files)  # <id>-<src>-<trg>:<category>.json
    data = json.loads(files[0].read_text())
    for field in ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "kps_ids", "src_bndbox",
                  "trg_bndbox", "src_imsize", "trg_imsize"):
        assert field in data
    assert (spair_root / "JPEGImages" / data["category"] / data["src_imname"]).is_file()
    # one keypoint is invisible in the target: listed as null in its image annotation, absent from the pair
    trg_ann = json.loads((spair_root / "ImageAnnotation" / data["category"]
                          / data["trg_imname"].replace(".jpg", ".json")).read_text())
    assert None in trg_ann["kps"].values()
    assert len(data["src_kps"]) == len(PALETTE) - 1


def test_perfect_matcher_scores_100_and_wrong_one_0(spair_root):
    pairs = read_spair_pairs(spair_root, "test", protocol="cosine")
    assert [len(p.src_kps) for p in pairs] == [5, 5, 5, 5]
    perfect = evaluate_spair(pairs, palette_features, 224, progress=False, protocol="cosine")
    for row in [*perfect["per_category"].values(), perfect["overall"], perfect["all_keypoints"]]:
        assert (row["pck@0.1"], row["pck@0.05"], row["pck@0.01"]) == (100.0, 100.0, 100.0)
    assert perfect["all_keypoints"]["keypoints"] == 20

    def constant(image):  # every target pixel equally similar -> argmax is pixel (0, 0), far from all keypoints
        return np.ones((8, 7, 7), np.float32)

    wrong = evaluate_spair(pairs, constant, 224, progress=False, protocol="cosine")
    assert (wrong["overall"]["pck@0.1"], wrong["overall"]["pck@0.05"], wrong["overall"]["pck@0.01"]) == (0, 0, 0)


def test_known_offset_gives_known_pck(tmp_path):
    """Shift one category's target annotations by 8 px: in the 224 frame that is 16 px, between
    0.05 x 216 = 10.8 and 0.1 x 216 = 21.6 px, so that category scores 100 / 0 / 0."""
    root = make_synthetic_spair(tmp_path, categories=("cat", "dog"), pairs_per_category=1)
    for path in (root / "PairAnnotation" / "test").glob("*:dog.json"):
        data = json.loads(path.read_text())
        data["trg_kps"] = [[x + 8, y] for x, y in data["trg_kps"]]
        path.write_text(json.dumps(data))
    result = evaluate_spair(read_spair_pairs(root, "test", protocol="cosine"), palette_features, 224, progress=False,
                            protocol="cosine")
    dog, cat = result["per_category"]["dog"], result["per_category"]["cat"]
    assert (dog["pck@0.1"], dog["pck@0.05"], dog["pck@0.01"]) == (100.0, 0.0, 0.0)
    assert cat["pck@0.01"] == 100.0
    assert result["overall"]["pck@0.05"] == pytest.approx(50.0)


def test_null_keypoints_are_dropped_and_selection_is_seeded(tmp_path):
    root = make_synthetic_spair(tmp_path, categories=("cat", "dog", "bus"), pairs_per_category=3)
    path = sorted((root / "PairAnnotation" / "test").glob("*:bus.json"))[0]
    data = json.loads(path.read_text())
    data["src_kps"][0] = None
    path.write_text(json.dumps(data))
    pairs = read_spair_pairs(root, "test", categories=["bus"], protocol="cosine")
    assert sorted(len(p.src_kps) for p in pairs) == [4, 5, 5]
    first = read_spair_pairs(root, "test", max_pairs=2, seed=1, protocol="cosine")
    assert [p.name for p in first] == [p.name for p in read_spair_pairs(root, "test", max_pairs=2, seed=1,
                                                                        protocol="cosine")]
    assert len(first) == 6
    with pytest.raises(EvalError, match="no pairs"):
        read_spair_pairs(root, "test", categories=["horse"])
    with pytest.raises(EvalError, match="PairAnnotation"):
        read_spair_pairs(tmp_path / "missing", "test")


def test_padded_square_geometry():
    landscape = PaddedSquare.for_image(200, 100, 224)
    assert (landscape.new_width, landscape.new_height, landscape.offset_x, landscape.offset_y) == (224, 112, 0, 56)
    np.testing.assert_allclose(landscape.apply_coords([[100, 50]]), [[112, 112]])
    portrait = PaddedSquare.for_image(50, 100, 224)
    assert (portrait.offset_x, portrait.offset_y) == (56, 0)
    assert portrait.apply_length(10) == pytest.approx(22.4)


def test_cli_writes_json_and_plot(spair_root, tmp_path, tiny_lift):
    from lift_serve.model.checkpoint import CheckpointMeta, save_lift_checkpoint

    from lift_serve.cli import main

    spec = tiny_spec_dict()
    ckpt = save_lift_checkpoint(tmp_path / "lift.safetensors", tiny_lift,
                                CheckpointMeta(backbone=spec, channels=32, patch_size=16,
                                               mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    out = tmp_path / "spair.json"
    code = main(["eval", "spair", "--root", str(spair_root), "--size", "64", "--mode", "lift",
                 "--checkpoint", str(ckpt), "--categories", "cat", "--max-pairs", "0", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["config"]["method"] == "lift:1"
    assert set(report["results"]["per_category"]) == {"cat"}
    assert report["results"]["all_keypoints"]["keypoints"] == 10
    assert 0 <= report["results"]["overall"]["pck@0.1"] <= 100
    assert out.with_suffix(".png").stat().st_size > 1000
    # a bad size is refused with a message, not a traceback
    assert main(["eval", "spair", "--root", str(spair_root), "--size", "60", "--mode", "backbone",
                 "--checkpoint", str(ckpt), "--out", str(out), "--no-plot", "--no-progress"]) == 2


def test_bundle_and_pytorch_sources_agree(spair_root, tiny_bundle, tmp_path):
    from lift_serve.bench.eval_common import BundleFeatureSource, Method, TorchFeatureSource

    from lift_serve.cli import main

    bundle = BundleFeatureSource(tiny_bundle)
    torch_source = TorchFeatureSource(None, tiny_bundle.parent / f"{tiny_bundle.name}_lift.safetensors")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for method in (Method("backbone"), Method("bilinear", 1), Method("lift", 1)):
        ours, theirs = torch_source.feature_fn(method), bundle.feature_fn(method)
        # same features (PCK itself may differ: flat fixture backgrounds make near-ties in the argmax)
        np.testing.assert_allclose(theirs(image), ours(image), atol=1e-3, rtol=1e-3)
    with pytest.raises(EvalError, match="LiFT iterations"):
        bundle.feature_fn(Method("lift", 2))
    out = tmp_path / "b.json"
    assert main(["eval", "spair", "--root", str(spair_root), "--size", "64", "--bundle", str(tiny_bundle),
                 "--out", str(out), "--no-plot", "--no-progress"]) == 0
    assert json.loads(out.read_text())["source"]["source"] == "bundle"
    # 224 is not an exported size: refused with a message naming the supported sizes
    assert main(["eval", "spair", "--root", str(spair_root), "--size", "224", "--bundle", str(tiny_bundle),
                 "--out", str(out), "--no-plot", "--no-progress"]) == 2


def test_match_is_the_argmax_of_cosine_over_upsampled_features():
    # The cosine protocol: upsample the raw features to the square, then take the target pixel of highest
    # cosine similarity. Normalising per cell before upsampling gives a different argmax when cell
    # norms differ (interpolated unit vectors shrink between cells).
    import torch
    import torch.nn.functional as F
    from lift_serve.bench.spair import transfer_keypoints

    rng = np.random.default_rng(0)
    size, grid = 32, 4
    norms = rng.uniform(0.1, 10.0, (1, grid, grid))
    src = (rng.normal(size=(8, grid, grid)) * norms).astype(np.float32)
    trg = (rng.normal(size=(8, grid, grid)) * norms[:, ::-1]).astype(np.float32)
    points = rng.uniform(0, size, (40, 2))
    predicted = transfer_keypoints(src, trg, points, size, protocol="cosine")

    def up(f):
        return F.interpolate(torch.from_numpy(f)[None], size=(size, size), mode="bilinear", align_corners=False)[0]

    up_src, up_trg = up(src), up(trg)
    for (x, y), (px, py) in zip(points, predicted, strict=True):
        query = up_src[:, int(y), int(x)][:, None, None]
        cosine = F.cosine_similarity(query, up_trg, dim=0)
        # Pixels beyond the outer cell centres repeat the border values: equal-cosine ties are fine.
        assert cosine[int(py), int(px)] >= cosine.max() - 1e-5


def _backbone_features(backbone):
    import torch
    from lift_serve.model.extractor import Preprocessing

    prep = Preprocessing(backbone.mean, backbone.std, backbone.patch_size)

    def features(image: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = prep.normalize(torch.from_numpy(image).permute(2, 0, 1)[None])
            return backbone(x)[0].numpy()

    return features


def _on_cell_centre_or_border(coords: np.ndarray, stride: int, size: int) -> np.ndarray:
    """Cell c's centre is pixel coordinate stride*(c + 0.5) - 0.5; the two pixels beside it are within 0.5.
    Border pixels lie outside the outermost centres, where bilinear upsampling repeats the outer cell
    (equal scores up to rounding, so any pixel of that band can win)."""
    centres = stride * (np.arange(size // stride) + 0.5) - 0.5
    near_centre = np.abs(coords[..., None] - centres).min(axis=-1) <= 0.5
    return near_centre | (coords < centres[0]) | (coords > centres[-1])


def _authors_scores(src_f, trg_f, point, size):
    """eval_spair.py's similarity row, by hand: cells normalised, upsampled, dot products."""
    import torch
    import torch.nn.functional as F

    def up(f):
        return F.interpolate(F.normalize(torch.from_numpy(f)[None], dim=1), size=size, mode="bilinear")[0]

    query = up(src_f)[:, int(np.floor(point[1])), int(point[0])]
    return torch.einsum("c,chw->hw", query, up(trg_f)).numpy()


@pytest.mark.parametrize("size", [64, 128])
def test_authors_protocol_predicts_cell_centres_or_border_pixels(tmp_path, tiny_backbone, size):
    """eval_spair.py normalises cells before upsampling and takes raw dot products: along each axis
    the score is linear between neighbouring cell centres, so its maximum sits beside a centre (or in
    the clamped border band). The cosine variant lands anywhere."""
    from lift_serve.bench.spair import transfer_keypoints

    root = make_synthetic_spair(tmp_path, categories=("cat", "dog"), pairs_per_category=3, seed=2)
    features = _backbone_features(tiny_backbone)
    stride = size // (size // 16)
    off_grid = 0
    predictions = 0
    for pair in read_spair_pairs(root, "test", max_pairs=0, protocol="authors"):
        src_geo = PaddedSquare.for_image(*load_rgb(pair.src_image).size, size)
        trg_geo = PaddedSquare.for_image(*load_rgb(pair.trg_image).size, size)
        src_f = features(src_geo.apply_image(load_rgb(pair.src_image)))
        trg_f = features(trg_geo.apply_image(load_rgb(pair.trg_image)))
        # every source pixel as a query, not only the few annotated keypoints
        ys, xs = np.mgrid[0:size:3, 0:size:3]
        points = np.stack([xs.ravel() + 0.3, ys.ravel() + 0.6], axis=1)
        authors = transfer_keypoints(src_f, trg_f, points, size, protocol="authors")
        on_grid = _on_cell_centre_or_border(authors, stride, size).all(axis=1)
        # A winner elsewhere can only be a rounding tie (two cells scoring alike make the score flat
        # between them): the best centre/border pixel then scores the same.
        for index in np.nonzero(~on_grid)[0]:
            scores = _authors_scores(src_f, trg_f, points[index], size)
            allowed = np.outer(*[_on_cell_centre_or_border(np.arange(size), stride, size)] * 2)
            x, y = authors[index].astype(int)
            assert scores[allowed].max() >= scores[y, x] - 1e-5 * abs(scores[y, x])
        cosine = transfer_keypoints(src_f, trg_f, points, size, protocol="cosine")
        off_grid += int((~_on_cell_centre_or_border(cosine, stride, size)).sum())
        predictions += cosine.size
    assert off_grid > 0.05 * predictions  # the check above can fail: the other protocol breaks it


def test_authors_sampling_is_eval_spairs(tmp_path):
    """np.random.seed(seed) once, then per category (sorted) np.random.choice(len(pairs), N): with
    replacement, N draws even from fewer pairs."""
    root = make_synthetic_spair(tmp_path, categories=("cat", "dog", "bus"), pairs_per_category=3)
    drawn = read_spair_pairs(root, "test", max_pairs=5, seed=4, protocol="authors")
    names = {c: sorted(p.stem for p in (root / "PairAnnotation" / "test").glob(f"*:{c}.json"))
             for c in ("bus", "cat", "dog")}
    np.random.seed(4)
    expected = [names[c][i] for c in ("bus", "cat", "dog") for i in np.random.choice(len(names[c]), 5)]
    assert [p.name for p in drawn] == expected
    assert len(read_spair_pairs(root, "test", protocol="authors")) == 3 * 100
    assert len(read_spair_pairs(root, "test", max_pairs=0, protocol="authors")) == 9


def test_cli_records_the_protocol(spair_root, tmp_path, tiny_bundle):
    from lift_serve.cli import main

    for protocol, pairs in (("authors", 200), ("cosine", 4)):
        out = tmp_path / f"{protocol}.json"
        args = ["eval", "spair", "--root", str(spair_root), "--size", "64", "--bundle", str(tiny_bundle),
                "--out", str(out), "--no-plot", "--no-progress"]
        assert main(args + (["--protocol", protocol] if protocol == "cosine" else [])) == 0
        report = json.loads(out.read_text())
        assert report["protocol"] == report["config"]["protocol"] == protocol
        assert report["results"]["overall"]["pairs"] == pairs


def test_authors_protocol_keeps_eval_spairs_float32_keypoints():
    """eval_spair.py scales keypoints as a float32 tensor in place: 90 px on a 320 px side times
    224/320 is exactly 63.0 there (query column 63), 62.99999999999999 in float64 (column 62)."""
    import torch

    geometry = PaddedSquare.for_image(320, 240, 224)
    theirs = torch.tensor([[90.0, 104.0]])  # their preprocess_kps_pad: kps[:, [0, 1]] *= scale; kps[:, 1] += offset_y
    theirs[:, [0, 1]] *= 224 / max(320, 240)
    theirs[:, 1] += int((224 - int(np.around(224 * 240 / 320))) / 2)
    ours = geometry.apply_coords_float32([[90, 104]])
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert int(ours[0, 0]) == 63 and int(geometry.apply_coords([[90, 104]])[0, 0]) == 62
