"""DINOv2 (timm VisionTransformer, patch 14, 4 registers) and DINOv3 (timm Eva, RoPE, patch 16,
4 registers) on tiny random networks: every facet against a hand computation from the chosen
block's weights, registers kept out of the grid, non-square inputs, family defaults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lift_serve.model.backbone import BackboneSpec, EvaBackbone, ViTBackbone, build_backbone, default_facet

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
FAMILIES = {
    # name, extra kwargs, input (H, W) non-square, backbone class
    "dinov2": ("vit_small_patch14_reg4_dinov2", {"img_size": 56}, (56, 84), ViTBackbone),
    "dinov3": ("vit_small_patch16_dinov3", {}, (64, 96), EvaBackbone),
}


def family_spec(family: str, facet: str, layer: int = -1, **overrides) -> BackboneSpec:
    name, kwargs, _, _ = FAMILIES[family]
    return BackboneSpec.from_dict({"name": name, "weights": "random", "seed": 3, "layer": layer, "facet": facet,
                                   "model_kwargs": {**TINY, **kwargs}, **overrides})


def block_input(vit, family: str, image: torch.Tensor, layer: int):
    """Tokens entering block ``layer`` (prefix tokens first), by the network's own steps one by one;
    for Eva also the rotary embedding every block gets."""
    x = vit.patch_embed(image)
    rope = None
    if family == "dinov3":
        x, rope = vit._pos_embed(x)
    else:
        x = vit._pos_embed(x)
    x = vit.norm_pre(x)
    for block in vit.blocks[:layer]:
        x = block(x, rope=rope) if rope is not None else block(x)
    return x, rope


def hand_facet(vit, family: str, image: torch.Tensor, layer: int, facet: str) -> torch.Tensor:
    b, _, h, w = image.shape
    patch = vit.patch_embed.patch_size[0]
    x, rope = block_input(vit, family, image, layer)
    block = vit.blocks[layer]
    if facet in ("token", "token_norm"):
        out = block(x, rope=rope) if rope is not None else block(x)
        if facet == "token_norm":
            out = F.layer_norm(out, (out.shape[-1],), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    else:
        normed = F.layer_norm(x, (x.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        attn = block.attn
        weight = attn.qkv.weight
        if family == "dinov3":  # Eva keeps its q/v biases outside the fused projection (k has none)
            bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        else:
            bias = attn.qkv.bias
        qkv = normed @ weight.T + (0 if bias is None else bias)  # before any rotary embedding
        c = x.shape[-1]
        third = ("query", "key", "value").index(facet)
        part = qkv[..., third * c : (third + 1) * c]
        heads = attn.num_heads
        # the LiFT authors' interleaved layout: channel d * heads + h
        out = part.reshape(b, -1, heads, c // heads).transpose(2, 3).reshape(b, -1, c)
    out = out[:, vit.num_prefix_tokens :]
    return out.transpose(1, 2).reshape(b, -1, h // patch, w // patch)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("facet", ["key", "query", "value", "token", "token_norm"])
@pytest.mark.parametrize("layer", [0, -1])
def test_each_facet_equals_the_hand_computation(family, facet, layer):
    _, _, (h, w), cls = FAMILIES[family]
    backbone = build_backbone(family_spec(family, facet, layer))
    assert isinstance(backbone, cls)
    vit = backbone.vit
    assert vit.num_prefix_tokens == 5  # class token + 4 registers
    image = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = backbone(image)
        expected = hand_facet(vit, family, image, layer % len(vit.blocks), facet)
    patch = backbone.patch_size
    assert got.shape == (2, 32, h // patch, w // patch)  # the grid holds patches only, no registers
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_registers_do_not_reach_the_grid():
    """Changing only the register tokens' own parameters changes nothing the grid shows at block
    0's key (a function of each token alone), so none of the grid's cells is a register."""
    backbone = build_backbone(family_spec("dinov2", "key", 0))
    image = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = backbone(image)
        backbone.vit.reg_token.add_(5.0)
        after = backbone(image)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_family_defaults_and_patch_sizes():
    assert default_facet("vit_small_patch14_dinov2") == "token_norm"
    assert default_facet("vit_small_patch14_reg4_dinov2.lvd142m") == "token_norm"
    assert default_facet("vit_small_plus_patch16_dinov3") == "token_norm"
    assert default_facet("vit_small_patch16_224.dino") == "key"
    spec = family_spec("dinov3", None)
    backbone = build_backbone(spec)
    assert backbone.facet == "token_norm" and backbone.spec.facet == "token_norm"
    assert backbone.patch_size == 16 and build_backbone(family_spec("dinov2", "key")).patch_size == 14
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        build_backbone(family_spec("dinov2", "key"))(torch.randn(1, 3, 64, 64))


def test_eva_refuses_the_dino_position_rule():
    from lift_serve.model.backbone import BackboneError

    with pytest.raises(BackboneError, match="rotary"):
        build_backbone(family_spec("dinov3", "key", pos_interpolation="dino"))


ROUND_TRIP = {  # family -> (train imsize, bundle sizes (h, w), an upload's (w, h))
    "dinov2": (112, [(56, 56), (56, 84)], (90, 61)),
    "dinov3": (128, [(64, 64), (64, 96)], (100, 66)),
}


@pytest.mark.parametrize("family", sorted(ROUND_TRIP))
def test_train_export_serve_round_trip(family, tmp_path):
    """`lift train` (a few steps), `lift export` with parity at every size and density (non-square
    included, recorded in the manifest), then the service answers features, a click and matches."""
    import io
    import json

    import numpy as np
    from lift_serve.model.export import export_bundle
    from lift_serve.service.ort_runtime import BundleRuntime
    from lift_serve.training.trainer import train
    from PIL import Image
    from service_helpers import make_app, started_client

    from tests.test_training import make_images, tiny_config

    imsize, sizes, (width, height) = ROUND_TRIP[family]
    make_images(tmp_path / "train", 8, seed=4)
    config = tiny_config(tmp_path / "train", tmp_path / "run", backbone=family_spec(family, None).to_dict(),
                         imsize=imsize, batch_size=4, max_steps=2)
    result = train(config)
    meta = json.loads((tmp_path / "run" / "lift.json").read_text())
    assert meta["backbone"]["facet"] == "token_norm"  # the family's default, recorded
    assert meta["patch_size"] == {"dinov2": 14, "dinov3": 16}[family]
    bundle = export_bundle(tmp_path / "bundle", None, result.checkpoint, lift_iterations=(0, 1), sizes=sizes)
    manifest = json.loads((bundle / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["checked"]
    checked = {(tuple(case["size"]), case["iterations"]) for case in parity["cases"]}
    assert checked >= {(size, k) for size in sizes for k in (0, 1)}, checked
    assert parity["min_cosine"] >= parity["min_cosine_required"]
    assert manifest["backbone"]["facet"] == "token_norm"
    runtime = BundleRuntime(bundle, providers="cpu")
    pixels = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    with started_client(make_app(bundle, runtime, max_wait_ms=0)) as client:
        r = client.post("/v1/features?iterations=1", files={"image": ("a.png", buffer.getvalue())})
        assert r.status_code == 200, r.text
        channels, h, w = (int(v) for v in r.headers["x-feature-shape"].split(","))
        input_w, input_h = (int(v) for v in r.headers["x-input-size"].split("x"))
        assert channels == 32 and (h, w) == (2 * input_h // runtime.stride(0), 2 * input_w // runtime.stride(0))
        fid = r.headers["x-feature-id"]
        click = client.post("/v1/similarity", params={"x": 10, "y": 20, "feature_id": fid, "format": "npy"})
        assert click.status_code == 200, click.text
        assert np.load(io.BytesIO(click.content)).shape == (h, w)
        matches = client.post("/v1/match", params={"feature_id_a": fid, "feature_id_b": fid})
        assert matches.status_code == 200 and matches.json()["count"] > 0


def test_lift_trained_on_a_dinov2_style_backbone_beats_bilinear_on_held_out_images(tmp_path, capsys):
    """A short `lift train` on the tiny random DINOv2-style backbone (patch 14, registers, its
    default token_norm facet; 32 generated images at 168 px, 50 steps), then `lift eval recon` on 8
    images it never saw: LiFT reconstructs the 2x features better than bilinear upsampling."""
    import json

    from lift_serve.training.trainer import train

    from lift_serve import cli
    from tests.test_training import make_images, tiny_config

    make_images(tmp_path / "train", 32, seed=0)
    make_images(tmp_path / "held_out", 8, seed=1)
    config = tiny_config(tmp_path / "train", tmp_path / "run", backbone=family_spec("dinov2", None).to_dict(),
                         imsize=168, batch_size=8, epochs=15, max_steps=50, lr=6e-3)
    result = train(config)
    report = tmp_path / "recon.json"
    assert cli.main(["eval", "recon", "--checkpoint", str(result.checkpoint), "--data", str(tmp_path / "held_out"),
                     "--out", str(report)]) == 0
    scores = json.loads(report.read_text())
    print(f"dinov2-style recon at 168 px: {scores}")
    assert scores["images"] == 8 and scores["imsize"] == 168
    assert scores["lift"] < scores["bilinear"] < scores["nearest"], scores


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_local_timm_weights_file_gives_the_same_features(family, tmp_path):
    from safetensors.torch import save_file

    source = build_backbone(family_spec(family, "key"))
    path = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, str(path))
    loaded = build_backbone(family_spec(family, "key", weights=str(path), seed=99))
    image = torch.randn(1, 3, *FAMILIES[family][2], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), source(image), rtol=0, atol=0)


def test_the_original_dinov2_release_layout_loads(tmp_path):
    """DINOv2's own checkpoints keep ``register_tokens``, a ``mask_token`` and the class token's
    position inside ``pos_embed``; such a file (made here from a tiny timm network) loads into the
    same features."""
    source = build_backbone(family_spec("dinov2", "token_norm"))
    state = {k: v.clone() for k, v in source.vit.state_dict().items()}
    cls_position = torch.randn(1, 1, state["cls_token"].shape[-1], generator=torch.Generator().manual_seed(4))
    original = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    original |= {"register_tokens": state["reg_token"], "cls_token": state["cls_token"] - cls_position,
                 "pos_embed": torch.cat([cls_position, state["pos_embed"]], dim=1),
                 "mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)
    loaded = build_backbone(family_spec("dinov2", "token_norm", weights=str(path)))
    image = torch.randn(1, 3, 56, 84, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), source(image), rtol=1e-6, atol=1e-6)


def test_a_missing_weights_file_is_named(tmp_path):
    from lift_serve.model.backbone import BackboneError

    with pytest.raises(BackboneError, match="dinov3.pth does not exist"):
        build_backbone(family_spec("dinov3", "key", weights=str(tmp_path / "dinov3.pth")))


def test_the_original_dinov3_release_layout_loads(tmp_path):
    """DINOv3's own checkpoints call the registers ``storage_tokens`` and the layer scales
    ``ls1.gamma``/``ls2.gamma``, and carry ``mask_token`` and the rope's ``periods``; such a file
    (made here from a tiny timm Eva) loads into the same features."""
    source = build_backbone(family_spec("dinov3", "token_norm"))
    state = source.vit.state_dict()
    assert "reg_token" in state and any(k.endswith("gamma_1") for k in state)
    renames = (("reg_token", "storage_tokens"), ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"))
    original = {}
    for key, value in state.items():
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        original[key] = value.clone()
    original |= {"mask_token": torch.zeros(1, state["reg_token"].shape[-1]), "rope_embed.periods": torch.ones(4)}
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(original, path)
    loaded = build_backbone(family_spec("dinov3", "token_norm", weights=str(path), seed=11))
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), source(image), rtol=0, atol=0)
