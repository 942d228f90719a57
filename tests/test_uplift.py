"""UPLiFT on random weights: the released configurations' state-dict keys and shapes (listed here
from their configuration), and each sub-block against a hand-written reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from lift_serve.model.uplift import UPLiFT, resize_features
from lift_serve.model.upsampler import UPSAMPLERS, build_upsampler


def released_state_dict_shapes(channels: int = 384) -> dict[str, tuple[int, ...]]:
    """The released configurations (uplift_dinov2-s14, uplift_dinov3-splus16): encoder SingleConv
    widths 16, 32, 64, 128, 128 from 3 input channels; decoder DoubleConv 64 wide on [features, E4]
    then on [up, E3], a 2x2 transposed conv between; attender 1x1 conv 64 -> 17."""
    shapes: dict[str, tuple[int, ...]] = {}

    def batch_norm(prefix: str, n: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (n,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    widths = (3, 16, 32, 64, 128, 128)
    for level in range(5):
        prefix, n_in, n = f"encoder.block_{level}.blocks.0.conv", widths[level], widths[level + 1]
        shapes[f"{prefix}.0.weight"] = (n, n_in, 3, 3)
        batch_norm(f"{prefix}.1", n)
        shapes[f"{prefix}.3.weight"] = (n, n, 1, 1)
        shapes[f"{prefix}.3.bias"] = (n,)
    for name, n_in in (("block_0", channels + 128), ("block_1", 64 + 128)):
        prefix = f"decoder.{name}.blocks.0.conv"
        shapes[f"{prefix}.0.weight"] = (64, n_in, 3, 3)
        batch_norm(f"{prefix}.1", 64)
        shapes[f"{prefix}.3.weight"] = (64, 64, 3, 3)
        batch_norm(f"{prefix}.4", 64)
        shapes[f"{prefix}.6.weight"] = (64, 64, 1, 1)
        shapes[f"{prefix}.6.bias"] = (64,)
        if name == "block_0":
            shapes["decoder.up_1.up.weight"] = (64, 64, 2, 2)
            shapes["decoder.up_1.up.bias"] = (64,)
    shapes["attender.conv1.weight"] = (17, 64, 1, 1)
    shapes["attender.conv1.bias"] = (17,)
    return shapes


def randomised(model: UPLiFT, seed: int = 0) -> UPLiFT:
    """Random weights and BatchNorm statistics (defaults would hide the BN arithmetic), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


@pytest.mark.parametrize("patch", [14, 16])
def test_released_configurations_have_the_authors_keys_and_shapes(patch):
    model = UPLiFT(384, patch)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == released_state_dict_shapes()
    assert len(got) == 72
    assert sum(p.numel() for p in model.parameters()) == 789_521
    assert UPSAMPLERS["uplift"] is UPLiFT
    assert isinstance(build_upsampler("uplift", model.config()), UPLiFT)


# -- hand-written references of each sub-block ----------------------------------------------------------
def bn(x, module):
    def per_channel(v):
        return v[None, :, None, None]

    scale = per_channel(module.weight) / torch.sqrt(per_channel(module.running_var) + module.eps)
    return (x - per_channel(module.running_mean)) * scale + per_channel(module.bias)


def pad_or_cut(skip, channels):
    if skip.shape[1] >= channels:
        return skip[:, :channels]
    return torch.cat([skip, skip.new_zeros(skip.shape[0], channels - skip.shape[1], *skip.shape[2:])], dim=1)


def hand_single_conv(x, block):
    conv = block.conv
    y = torch.relu(bn(F.conv2d(x, conv[0].weight, padding=1), conv[1]))
    y = F.conv2d(y, conv[3].weight, conv[3].bias)
    return y + pad_or_cut(x, y.shape[1])


def hand_double_conv(x, block):
    conv = block.conv
    y = torch.relu(bn(F.conv2d(x, conv[0].weight, padding=1), conv[1]))
    y = torch.relu(bn(F.conv2d(y, conv[3].weight, padding=1), conv[4]))
    y = F.conv2d(y, conv[6].weight, conv[6].bias)
    return y + pad_or_cut(x, y.shape[1])


def hand_up(x, up):
    """Transposed conv 2x2/2 written out: each input cell paints a 2x2 block; plus the bilinear
    skip with align_corners=True (output i samples input i * (n - 1) / (2n - 1))."""
    b, c, h, w = x.shape
    weight = up.up.weight  # [in, out, 2, 2]
    painted = torch.einsum("bihw,ioyx->bohywx", x, weight).reshape(b, weight.shape[1], 2 * h, 2 * w)
    painted = painted + up.up.bias[None, :, None, None]

    def axis(n):
        position = torch.arange(2 * n, dtype=torch.float64) * (n - 1) / (2 * n - 1)
        low = position.floor().long().clamp(max=n - 1)
        high = (low + 1).clamp(max=n - 1)
        return low, high, (position - low).float()

    (r0, r1, fr), (c0, c1, fc) = axis(h), axis(w)
    rows = x[:, :, r0] * (1 - fr)[None, None, :, None] + x[:, :, r1] * fr[None, None, :, None]
    skip = rows[..., c0] * (1 - fc) + rows[..., c1] * fc
    return painted + skip


# The 3x3 neighbourhood and the 3x3 at dilation 2, row-major (the logits' order).
NEIGHBOURS = sorted(set(itertools.product((-1, 0, 1), repeat=2)) | set(itertools.product((-2, 0, 2), repeat=2)))


def hand_attender(guide, values, attender):
    """Loop over output cells: softmax of (1x1 conv + first 17 guide channels), then the weighted
    sum of the 17 neighbours of the parent cell, indices clamped (replicated borders)."""
    logits = F.conv2d(guide, attender.conv1.weight, attender.conv1.bias) + guide[:, :17]
    weights = logits.softmax(dim=1)
    b, c, h, w = values.shape
    out = torch.zeros(b, c, 2 * h, 2 * w)
    for row in range(2 * h):
        for col in range(2 * w):
            for d, (dy, dx) in enumerate(NEIGHBOURS):
                source = values[:, :, min(max(row // 2 + dy, 0), h - 1), min(max(col // 2 + dx, 0), w - 1)]
                out[:, :, row, col] += weights[:, d, row, col][:, None] * source
    return out


@pytest.fixture(scope="module")
def model14():
    torch.manual_seed(0)
    return randomised(UPLiFT(96, 14), seed=1)


def test_encoder_blocks_equal_the_hand_computation(model14):
    image = torch.randn(1, 3, 20, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        levels = model14.encoder(image)
        x = image
        for level, got in enumerate(levels):
            x = hand_single_conv(x, getattr(model14.encoder, f"block_{level}").blocks[0])
            torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert [t.shape[1] for t in levels] == [16, 32, 64, 128, 128]


def test_decoder_and_up_blocks_equal_the_hand_computation(model14):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 96, 3, 5, generator=generator)
    e3, e4 = torch.randn(2, 128, 48, 80, generator=generator), torch.randn(2, 128, 48, 80, generator=generator)
    decoder = model14.decoder
    with torch.no_grad():
        z = hand_double_conv(torch.cat([x, e4[:, :, ::16, ::16]], 1), decoder.block_0.blocks[0])  # top-left pixels
        up = hand_up(z, decoder.up_1)
        torch.testing.assert_close(decoder.up_1(z), up, rtol=1e-5, atol=1e-5)
        guide = hand_double_conv(torch.cat([up, e3[:, :, ::8, ::8]], 1), decoder.block_1.blocks[0])
        torch.testing.assert_close(decoder(x, e3, e4), guide, rtol=1e-5, atol=1e-5)


def test_local_attender_equals_the_per_cell_loop(model14):
    generator = torch.Generator().manual_seed(4)
    guide = torch.randn(1, 64, 8, 10, generator=generator)
    values = torch.randn(1, 96, 4, 5, generator=generator)
    with torch.no_grad():
        got = model14.attender(guide, values)
        torch.testing.assert_close(got, hand_attender(guide, values, model14.attender), rtol=1e-5, atol=1e-5)
    # every output vector is a convex mix of input vectors: inside their per-channel range
    assert (got.amax(dim=(2, 3)) <= values.amax(dim=(2, 3)) + 1e-5).all()


def test_steps_compose_the_blocks_with_a_shared_encoder(model14):
    """A patch-14 image goes to the encoder at 16 px a cell; two steps: 4x, each step's attender
    mixing that step's input; an exact output size is a bilinear antialiased resize."""
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, 42, 56, generator=generator)  # 3 x 4 cells of 14 px
    features = torch.randn(1, 96, 3, 4, generator=generator)
    with torch.no_grad():
        scaled = F.interpolate(image, size=(48, 64), mode="bilinear", align_corners=False, antialias=True)
        levels = model14.encoder(scaled)
        x = features
        for _ in range(2):
            h, w = x.shape[-2:]
            e3 = F.interpolate(levels[3], size=(2 * h, 2 * w), mode="nearest")
            e4 = F.interpolate(levels[4], size=(h, w), mode="nearest")
            guide = model14.decoder.block_1(torch.cat([model14.decoder.up_1(model14.decoder.block_0(
                torch.cat([x, e4], 1))), e3], 1))
            x = hand_attender(guide, x, model14.attender)
        got = model14(image, features, steps=2)
        torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
        assert got.shape == (1, 96, 12, 16)
        exact = resize_features(got, (42, 56))
        assert exact.shape == (1, 96, 42, 56)


def test_too_few_channels_are_refused():
    with pytest.raises(ValueError, match="at least 64 feature channels"):
        UPLiFT(32, 16)


def test_the_uplift_objective_is_the_sum_of_every_step_against_the_matching_level():
    """levels = 2: from S/2, one step vs F(S); from S/4, two steps vs F(S/2) and F(S); MSE, summed."""
    from lift_serve.model.backbone import BackboneSpec, build_backbone
    from lift_serve.training.objective import MultiStepUpsampler, uplift_loss

    backbone = build_backbone(BackboneSpec.from_dict(DINOV3_TINY))
    torch.manual_seed(0)
    model = randomised(UPLiFT(64, 16), seed=3)
    image = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss, (one_step, multi_step) = uplift_loss(backbone, MultiStepUpsampler(model), image, levels=2)
        half = F.interpolate(image, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        quarter = F.interpolate(image, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        full_f, half_f, quarter_f = backbone(image), backbone(half), backbone(quarter)
        a = F.mse_loss(model(half, half_f, 1), full_f)
        b = F.mse_loss(model(quarter, quarter_f, 1), half_f)
        c = F.mse_loss(model(quarter, quarter_f, 2), full_f)
    torch.testing.assert_close(one_step, a + b)
    torch.testing.assert_close(multi_step, c)
    torch.testing.assert_close(loss, a + b + c)


DINOV3_TINY = {"name": "vit_small_patch16_dinov3", "weights": "random", "seed": 3,
               "model_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2}}


def test_train_export_serve_an_uplift_round_trip(tmp_path):
    """`lift train --upsampler uplift` on a DINOv3-style tiny backbone (2 steps, then resumed to 3),
    `lift export` with parity at every listed density (the encoder once, the step graph applied k
    times), then the service answers at 4x."""
    import io
    import json

    import numpy as np
    from lift_serve.model.export import export_bundle
    from lift_serve.service.ort_runtime import BundleRuntime
    from lift_serve.training.trainer import train
    from PIL import Image
    from service_helpers import make_app, started_client

    from tests.test_training import make_images, step_records, tiny_config

    make_images(tmp_path / "train", 8, seed=4)
    options = dict(backbone=DINOV3_TINY, imsize=128, batch_size=4, epochs=5, upsampler="uplift", uplift_levels=2)
    first = train(tiny_config(tmp_path / "train", tmp_path / "run", max_steps=2, **options))
    resumed = train(tiny_config(tmp_path / "train", tmp_path / "run", max_steps=3, **options))
    assert (first.steps, resumed.steps) == (2, 3)
    records = step_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and abs(r["loss"] - r["loss_x2"] - r["loss_x4"]) < 1e-4 for r in records)
    meta = json.loads((tmp_path / "run" / "lift.json").read_text())
    assert (meta["upsampler"], meta["loss"], meta["patch_size"]) == ("uplift", "l2", 16)

    sizes = [(64, 96)]
    bundle = export_bundle(tmp_path / "bundle", None, resumed.checkpoint, lift_iterations=(0, 2), sizes=sizes)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["upsampler"]["kind"] == "uplift" and manifest["upsampler"]["max_steps"] == 2
    checked = {(tuple(case["size"]), case["iterations"]) for case in manifest["parity"]["cases"]}
    assert checked >= {(size, k) for size in sizes for k in (0, 2)}
    assert manifest["parity"]["min_cosine"] >= manifest["parity"]["min_cosine_required"]
    runtime = BundleRuntime(bundle, providers="cpu")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(buffer, "PNG")
    with started_client(make_app(bundle, runtime, max_wait_ms=0)) as client:
        r = client.post("/v1/features?iterations=2", files={"image": ("a.png", buffer.getvalue())})
        assert r.status_code == 200, r.text
        assert r.headers["x-feature-shape"] == "64,16,24" and r.headers["x-feature-stride"] == "4"
        click = client.post("/v1/similarity", params={"x": 30, "y": 20, "feature_id": r.headers["x-feature-id"],
                                                      "format": "npy"})
        assert click.status_code == 200 and np.load(io.BytesIO(click.content)).shape == (16, 24)
        # An explicit stride between the offered 16 and 4: 2 steps, resampled to 8 x 12 cells.
        coarser = client.post("/v1/features?stride=8", files={"image": ("a.png", buffer.getvalue())})
        assert coarser.status_code == 200 and coarser.headers["x-feature-shape"] == "64,8,12"


def test_a_released_uplift_file_exports_with_the_backbone_named(tmp_path, capsys):
    """The authors' released weights are a bare .safetensors state dict (no sidecar): `lift export
    --checkpoint FILE --backbone NAME` tells UPLiFT from its keys and loads it unchanged."""
    import json

    from lift_serve.model.checkpoint import load_lift_checkpoint
    from safetensors.torch import save_file

    from lift_serve import cli

    torch.manual_seed(0)
    released = randomised(UPLiFT(64, 16), seed=4)
    path = tmp_path / "uplift_dinov3-splus16.safetensors"
    save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(path))
    loaded, meta = load_lift_checkpoint(path, channels=64, patch_size=16)
    assert isinstance(loaded, UPLiFT) and meta is None
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in released.state_dict().items())
    # In fp16: parity is checked the same way, at every listed density, against fp32 PyTorch.
    out = tmp_path / "bundle"
    code = cli.main(["export", "--checkpoint", str(path), "--out", str(out), "--sizes", "64", "--lift-iterations",
                     "0,2", "--precision", "fp16", "--backbone", DINOV3_TINY["name"], "--backbone-weights", "random",
                     "--seed", "3", "--backbone-kwargs", json.dumps(DINOV3_TINY["model_kwargs"])])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    upsampler = manifest["upsampler"]
    assert (upsampler["kind"], upsampler["checkpoint_format"]) == ("uplift", "authors")
    assert manifest["onnx"]["precision"] == "fp16" and manifest["output"]["dtype"] == "float16"
    checked = {(c["graph"], tuple(c["size"]), c["iterations"]) for c in manifest["parity"]["cases"]}
    assert {("chain", (64, 64), 2), ("backbone", (64, 64), 0)} <= checked
    assert manifest["parity"]["min_cosine"] >= manifest["parity"]["min_cosine_required"] == 0.999
    without_backbone = cli.main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "b2")])
    assert without_backbone == 2 and "--backbone" in capsys.readouterr().err
