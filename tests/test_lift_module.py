import pytest
import torch
from lift_serve.model.checkpoint import CheckpointError, load_state_dict_checked
from lift_serve.model.lift import LiFT, count_trainable_parameters


def test_parameter_count_matches_paper():
    # The paper's "1.2 M" for ViT-S/16; the authors' module has exactly 1,187,280.
    assert count_trainable_parameters(LiFT(384, 16)) == pytest.approx(1.19e6, rel=0.01)


@pytest.mark.parametrize("channels,patch", [(768, 16), (384, 8), (768, 8)])
def test_other_variants_build_and_run(channels, patch):
    lift = LiFT(channels, patch).eval()
    out = lift(torch.randn(1, 3, 4 * patch, 2 * patch), torch.randn(1, channels, 4, 2))
    assert out.shape == (1, channels, 8, 4)


def test_patch_14_resamples_the_guide_to_a_patch_16_branch():
    """A patch-14 LiFT is a patch-16 LiFT (same weights) fed the guide bilinearly resampled to 16
    pixels a cell: rebuilt here by hand from the documented rule, on a non-square input."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    lift14 = LiFT(32, 14).eval()
    lift16 = LiFT(32, 16).eval()
    assert set(lift14.state_dict()) == set(lift16.state_dict())
    lift16.load_state_dict(lift14.state_dict())
    image, features = torch.randn(2, 3, 14 * 3, 14 * 5), torch.randn(2, 32, 3, 5)
    resampled = F.interpolate(image, size=(16 * 3, 16 * 5), mode="bilinear", align_corners=False, antialias=False)
    out = lift14(image, features)
    assert out.shape == (2, 32, 6, 10)
    torch.testing.assert_close(out, lift16(resampled, features), rtol=0, atol=0)
    assert lift14.config() == {"in_channels": 32, "patch_size": 14}


def test_patch_sizes_out_of_range_are_a_clear_value_error():
    with pytest.raises(ValueError, match="patch size between 1 and 64"):
        LiFT(384, 0)


def test_non_square_input_doubles_each_side():
    lift = LiFT(32, 16).eval()
    out = lift(torch.randn(2, 3, 224, 320), torch.randn(2, 32, 14, 20))
    assert out.shape == (2, 32, 28, 40)


def test_image_not_multiple_of_patch_names_the_multiple():
    lift = LiFT(32, 16).eval()
    with pytest.raises(ValueError, match="multiples of the patch size 16.*240x224"):
        lift(torch.randn(1, 3, 230, 224), torch.randn(1, 32, 14, 14))


def test_state_dict_round_trip_gives_identical_output():
    torch.manual_seed(0)
    a = LiFT(32, 16)
    # move BatchNorm statistics away from their defaults so that buffers matter
    a.train()(torch.randn(2, 3, 64, 64), torch.randn(2, 32, 4, 4))
    a.eval()
    b = LiFT(32, 16).eval()
    load_state_dict_checked(b, a.state_dict(), "test")
    image, feats = torch.randn(1, 3, 64, 96), torch.randn(1, 32, 4, 6)
    assert torch.equal(a(image, feats), b(image, feats))


def test_module_prefix_loads(tmp_path):
    from lift_serve.model.checkpoint import load_lift_checkpoint

    a = LiFT(32, 16).eval()
    path = tmp_path / "authors.pth"
    torch.save({f"module.{k}": v for k, v in a.state_dict().items()}, path)
    b, meta = load_lift_checkpoint(path, channels=32, patch_size=16)
    assert meta is None
    image, feats = torch.randn(1, 3, 64, 64), torch.randn(1, 32, 4, 4)
    assert torch.equal(a(image, feats), b(image, feats))


def test_wrong_shape_names_key_and_both_shapes():
    state = LiFT(64, 16).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(LiFT(32, 16), state, "ckpt.pth")
    message = str(info.value)
    assert "up1.up.weight: expected shape (64, 32, 2, 2), found (96, 48, 2, 2)" in message


def test_missing_and_unexpected_keys_are_named():
    state = LiFT(32, 16).state_dict()
    state.pop("outc.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing key outc.bias.*unexpected key extra.weight"):
        load_state_dict_checked(LiFT(32, 16), state, "x")
