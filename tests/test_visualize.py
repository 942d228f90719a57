"""PCA pictures of dense features: the basis by hand, and ``/v1/visualize`` on the tiny bundle."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from service_helpers import encode, metric, noise


def test_the_basis_is_the_top_three_principal_directions():
    from lift_serve.service.pca import fit_basis

    rng = np.random.default_rng(0)
    features = (rng.standard_normal((6, 5, 7)) * np.arange(1, 7)[:, None, None]).astype(np.float32)
    basis = fit_basis(features, (5, 7))
    cells = features.reshape(6, 35).T.astype(np.float64)
    centred = cells - cells.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)  # rows of vt: principal directions
    for k in range(3):
        expected = vt[k] * np.sign(vt[k][np.abs(vt[k]).argmax()])  # largest loading positive
        np.testing.assert_allclose(basis.components[k], expected, atol=1e-5)
    np.testing.assert_allclose(basis.explained, singular[:3] ** 2 / (singular**2).sum(), rtol=1e-5)
    projected = centred @ basis.components.T.astype(np.float64)
    np.testing.assert_allclose(basis.low, np.percentile(projected, 1, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(basis.high, np.percentile(projected, 99, axis=0), rtol=1e-4, atol=1e-5)
    colours = basis.colours(features)
    by_hand = np.clip(np.rint((projected - basis.low) / (basis.high - basis.low) * 255), 0, 255)
    np.testing.assert_array_equal(colours.reshape(35, 3), by_hand.astype(np.uint8))


def test_only_the_cells_on_the_image_are_fitted():
    from lift_serve.service.pca import fit_basis

    features = np.random.default_rng(1).standard_normal((4, 6, 6)).astype(np.float32)
    padded = features.copy()
    padded[:, 4:, :] = 1e6  # padding rows of keep_aspect: must not pull the basis
    np.testing.assert_allclose(fit_basis(padded, (4, 6)).components, fit_basis(features[:, :4], (4, 6)).components,
                               atol=1e-6)


def _colours(picture: Image.Image) -> int:
    return len(np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0))


def _png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_visualize_paints_each_cell_at_the_images_size(client):
    image = encode(noise(60, 90, seed=21))
    r = client.post("/v1/visualize?iterations=1", content=image, headers={"content-type": "image/png"})
    picture = _png(r)
    assert picture.mode == "RGB" and picture.size == (90, 60)
    # 64x96 model input at stride 8: 8 x 12 cells, each one block of colour.
    assert _colours(picture) <= 8 * 12
    explained = [float(v) for v in r.headers["x-pca-explained-variance"].split(",")]
    assert len(explained) == 3 and explained == sorted(explained, reverse=True) and sum(explained) <= 1
    fid = r.headers["x-feature-id"]
    assert r.headers["x-basis-feature-id"] == fid
    # By id: the same picture, no backbone pass.
    images = metric(client.get("/metrics").text, "lift_images_total")
    again = client.post(f"/v1/visualize?feature_id={fid}")
    assert again.content == r.content
    assert metric(client.get("/metrics").text, "lift_images_total") == images


def test_a_basis_from_another_image_colours_both_alike(client):
    a, b = encode(noise(64, 64, seed=22)), encode(noise(64, 64, seed=23))
    id_a = client.post("/v1/features", content=a, headers={"content-type": "image/png"}).headers["x-feature-id"]
    own = client.post("/v1/visualize", content=b, headers={"content-type": "image/png"})
    shared = client.post(f"/v1/visualize?basis_id={id_a}", content=b, headers={"content-type": "image/png"})
    assert shared.headers["x-basis-feature-id"] == id_a and own.headers["x-basis-feature-id"] != id_a
    assert _png(shared).size == _png(own).size and shared.content != own.content
    basis = client.post(f"/v1/visualize?format=json&feature_id={id_a}").json()["basis"]
    assert np.array(basis["components"]).shape == (3, 32) and len(basis["low"]) == len(basis["high"]) == 3


def test_compare_shows_the_backbone_next_to_the_density(client):
    image = encode(noise(64, 64, seed=24))
    both = _png(client.post("/v1/visualize?compare=true&iterations=1", content=image,
                            headers={"content-type": "image/png"}))
    assert both.size == (64 + 8 + 64, 64)
    left, right = both.crop((0, 0, 64, 64)), both.crop((72, 0, 136, 64))
    assert _colours(left) <= 4 * 4 < _colours(right)  # 4x4 backbone cells vs 8x8


@pytest.mark.parametrize(("query", "code"), [("method=tsne", "invalid_parameter"), ("colour=1", "unknown_parameter"),
                                              ("stride=10", "invalid_parameter")])
def test_bad_visualize_parameters_are_422(client, query, code):
    r = client.post(f"/v1/visualize?{query}", content=encode(noise(64, 64, seed=25)),
                    headers={"content-type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["code"] == code
