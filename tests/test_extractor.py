import json

import pytest
import torch
from lift_serve.model.backbone import BackboneSpec
from lift_serve.model.checkpoint import CheckpointMeta, load_lift_checkpoint, save_lift_checkpoint
from lift_serve.model.extractor import DenseExtractor


@pytest.mark.parametrize("iterations,grid", [(0, (4, 6)), (1, (8, 12)), (2, (16, 24))])
def test_output_sizes_lift_and_bilinear(tiny_backbone, tiny_lift, iterations, grid):
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        lifted = DenseExtractor(tiny_backbone, tiny_lift, iterations)(image)
        bilinear = DenseExtractor(tiny_backbone, None, iterations, upsample="bilinear")(image)
    assert lifted.shape == bilinear.shape == (1, 32, *grid)
    assert DenseExtractor(tiny_backbone, tiny_lift, iterations).stride == 16 / 2**iterations


def test_an_exact_output_size_resizes_the_steps_output(tiny_backbone, tiny_lift):
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        steps = DenseExtractor(tiny_backbone, tiny_lift, 2)(image)  # 16 x 24
        exact = DenseExtractor(tiny_backbone, tiny_lift, 2, out_size=(20, 30))
        expected = torch.nn.functional.interpolate(steps, size=(20, 30), mode="bilinear", align_corners=False,
                                                   antialias=True)
        torch.testing.assert_close(exact(image), expected)
    assert exact.output_size(64, 96) == (20, 30)
    with pytest.raises(ValueError, match="out_size must be a"):
        DenseExtractor(tiny_backbone, tiny_lift, 1, out_size=(0, 3))


def test_no_lift_means_backbone_only(tiny_backbone):
    extractor = DenseExtractor(tiny_backbone, None, 2)
    image = torch.randn(1, 3, 64, 64)
    assert extractor.lift_iterations == 0
    assert torch.equal(extractor(image), tiny_backbone(image))


def test_second_lift_round_sees_upsampled_image(tiny_backbone, tiny_lift):
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        once = DenseExtractor(tiny_backbone, tiny_lift, 1)(image)
        up = torch.nn.functional.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
        twice = DenseExtractor(tiny_backbone, tiny_lift, 2)(image)
        assert torch.allclose(twice, tiny_lift(up, once), atol=1e-6)


def test_preprocessing_comes_from_timm_config(tiny_backbone):
    pre = DenseExtractor(tiny_backbone).preprocessing
    assert pre.mean == tuple(tiny_backbone.vit.pretrained_cfg["mean"])
    assert pre.multiple == 16
    pixels = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    expected = (1.0 - pre.mean[0]) / pre.std[0]
    assert pre.normalize(pixels)[0, 0, 0, 0].item() == pytest.approx(expected)


def test_mismatched_lift_is_refused(tiny_backbone):
    from lift_serve.model.lift import LiFT

    with pytest.raises(ValueError, match="does not fit the backbone"):
        DenseExtractor(tiny_backbone, LiFT(64, 16))


def test_our_checkpoint_round_trip_and_sha_check(tmp_path, tiny_spec, tiny_lift):
    meta = CheckpointMeta(backbone=tiny_spec.to_dict(), channels=32, patch_size=16,
                          mean=[0.5] * 3, std=[0.5] * 3, epochs=1, loss="cosine")
    path = save_lift_checkpoint(tmp_path / "lift.safetensors", tiny_lift, meta)
    loaded, loaded_meta = load_lift_checkpoint(path)
    assert loaded_meta.backbone == tiny_spec.to_dict() and len(loaded_meta.sha256) == 64
    image, feats = torch.randn(1, 3, 64, 64), torch.randn(1, 32, 4, 4)
    assert torch.equal(loaded(image, feats), tiny_lift(image, feats))
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256"):
        load_lift_checkpoint(path)


def test_checkpoint_for_other_channels_is_refused(tmp_path, tiny_spec, tiny_lift):
    meta = CheckpointMeta(backbone=tiny_spec.to_dict(), channels=32, patch_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    path = save_lift_checkpoint(tmp_path / "lift.safetensors", tiny_lift, meta)
    with pytest.raises(ValueError, match="channels 32.*has 384"):
        load_lift_checkpoint(path, channels=384, patch_size=16)


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(ValueError, match="lift train"):
        load_lift_checkpoint(tmp_path / "nope.safetensors")


def test_damaged_checkpoint_files_are_checkpoint_errors(tmp_path, tiny_spec, tiny_lift):
    from lift_serve.model.checkpoint import CheckpointError, sidecar_path

    meta = CheckpointMeta(backbone=tiny_spec.to_dict(), channels=32, patch_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    path = save_lift_checkpoint(tmp_path / "lift.safetensors", tiny_lift, meta)
    side = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps(side | {"sha256": None}))  # no hash recorded: nothing else catches it
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read .* as safetensors"):
        load_lift_checkpoint(path)
    pth = tmp_path / "authors.pth"
    torch.save({"up1.up.weight": torch.zeros(2), "epoch": 3}, pth)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_lift_checkpoint(pth, channels=32, patch_size=16)
    # A file that is no PyTorch file at all (e.g. a JPEG named .pth): one line, not torch's essay
    # about weights_only.
    pth.write_bytes(b"\xff\xd8\xff\xe0 not a checkpoint " * 20)
    with pytest.raises(CheckpointError) as caught:
        load_lift_checkpoint(pth, channels=32, patch_size=16)
    message = str(caught.value)
    assert message.startswith(f"cannot read {pth} as a state dict (") and "\n" not in message
    assert "weights_only" not in message and message.endswith("or a .safetensors file")


def test_missing_checkpoint_is_named_before_sidecar_or_backbone(tmp_path):
    from lift_serve.model.checkpoint import CheckpointError
    from lift_serve.model.factory import load_backbone_and_lift

    # Ours: used to complain about a missing .json sidecar. Authors': used to build the backbone
    # first (a hub download, or a hub error) before noticing the weights are not there.
    for name in ("lift.safetensors", "lift.pth"):
        with pytest.raises(CheckpointError, match=rf"LiFT checkpoint .*{name} does not exist"):
            load_backbone_and_lift(BackboneSpec(weights=str(tmp_path / "no_vit.pth")), tmp_path / name)
