import numpy as np
import pytest
from lift_serve.service.matching import mutual_nearest_neighbors, similarity_map


def _random_map(seed, c=16, h=5, w=7):
    return np.random.default_rng(seed).standard_normal((c, h, w)).astype(np.float32)


def test_identical_maps_match_every_cell_to_itself():
    f = _random_map(0)
    matches = mutual_nearest_neighbors(f, f)
    assert len(matches) == 35
    assert all((m.row_a, m.col_a) == (m.row_b, m.col_b) for m in matches)
    assert all(abs(m.score - 1) < 1e-5 for m in matches)


def test_shifted_map_matches_land_on_shifted_cells_sorted_and_capped():
    f = _random_map(1)
    shifted = np.roll(f, shift=2, axis=2)
    matches = mutual_nearest_neighbors(f, shifted * 3.0, max_matches=10, min_score=0.5)
    assert len(matches) == 10
    assert all(m.col_b == (m.col_a + 2) % 7 and m.row_b == m.row_a for m in matches)
    scores = [m.score for m in matches]
    assert scores == sorted(scores, reverse=True)


def test_min_score_filters_everything_for_unrelated_maps():
    assert mutual_nearest_neighbors(_random_map(2), _random_map(3), min_score=0.99) == []


def test_similarity_of_a_cell_with_itself_is_one():
    f = _random_map(4)
    sim = similarity_map(f[:, 2, 3], f)
    assert sim.shape == (5, 7)
    assert abs(sim[2, 3] - 1) < 1e-6 and sim.max() <= 1 + 1e-6


@pytest.mark.parametrize("weights_shape", [(70,), (3, 70)])
def test_channel_contract_widens_float16_a_few_channels_at_a_time(weights_shape):
    from lift_serve.service.matching import channel_contract

    rng = np.random.default_rng(0)
    features = rng.standard_normal((70, 5, 6)).astype(np.float16)
    weights = rng.standard_normal(weights_shape).astype(np.float32)
    expected = np.tensordot(weights, features.astype(np.float32), axes=(len(weights_shape) - 1, 0))
    found = channel_contract(weights, features)
    assert found.dtype == np.float32 and found.shape == expected.shape
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(channel_contract(weights, features.astype(np.float32)), expected)
