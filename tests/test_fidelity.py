"""Fidelity to the LiFT authors' pipeline: their facet channel order, DINO's position-embedding
rule, their plain ``.pth`` checkpoints through the public export -> runtime path, and old
checkpoints of ours giving exactly the features they gave.

The expected numbers are rebuilt here by hand from the documented formulas (a DINO ViT written
out with ``torch.nn.functional``), never imported from the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lift_serve.model.backbone import BackboneSpec, ViTBackbone
from lift_serve.model.checkpoint import CheckpointError, CheckpointMeta, save_lift_checkpoint
from lift_serve.model.extractor import DenseExtractor
from lift_serve.model.factory import build_extractor, load_backbone_and_lift
from lift_serve.model.lift import LiFT

from lift_serve import cli as lift_cli
from tests.conftest import tiny_spec_dict

VIT_S = {"embed_dim": 384, "heads": 6, "depth": 12, "patch": 16}


def dino_release_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random ViT-S/16 in the key layout of DINO's released ``dino_deitsmall16_pretrain.pth``
    (a flat state dict: cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*; no head).
    Weights are small-scale Gaussians so that twelve blocks stay numerically tame, and the position
    embeddings are strong so that their interpolation matters."""
    g = torch.Generator().manual_seed(seed)
    c, depth, p = VIT_S["embed_dim"], VIT_S["depth"], VIT_S["patch"]

    def rand(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": rand(1, 1, c, scale=1.0), "pos_embed": rand(1, 1 + 14 * 14, c, scale=1.0),
             "patch_embed.proj.weight": rand(c, 3, p, p, scale=0.05), "patch_embed.proj.bias": rand(c),
             "norm.weight": 1 + rand(c), "norm.bias": rand(c)}
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": 1 + rand(c, scale=0.1), b + "norm1.bias": rand(c, scale=0.1),
                  b + "attn.qkv.weight": rand(3 * c, c, scale=0.08), b + "attn.qkv.bias": rand(3 * c, scale=0.1),
                  b + "attn.proj.weight": rand(c, c), b + "attn.proj.bias": rand(c),
                  b + "norm2.weight": 1 + rand(c, scale=0.1), b + "norm2.bias": rand(c, scale=0.1),
                  b + "mlp.fc1.weight": rand(4 * c, c), b + "mlp.fc1.bias": rand(4 * c),
                  b + "mlp.fc2.weight": rand(c, 4 * c), b + "mlp.fc2.bias": rand(c)}
    return state


def _layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)


def _qkv_heads(x, state, block, heads):
    """qkv(norm1(x)) as DINO's Attention reshapes it: [3, B, heads, T, head_dim]."""
    b, t, c = x.shape
    qkv = F.linear(_layer_norm(x, state, f"blocks.{block}.norm1"), state[f"blocks.{block}.attn.qkv.weight"],
                   state[f"blocks.{block}.attn.qkv.bias"])
    return qkv.reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)


def dino_tokens_before(state, image, layer, heads=VIT_S["heads"], patch=VIT_S["patch"]):
    """DINO's prepare_tokens (interpolate_pos_encoding: bicubic, scale factor (grid + 0.1) / native,
    the embeddings untouched at the native square grid), then blocks 0..layer-1."""
    x = F.conv2d(image, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = state["pos_embed"]
    native = int(math.sqrt(pos.shape[1] - 1))
    patch_pos = pos[:, 1:]
    if not (h * w == native * native and h == w):
        grid = patch_pos.reshape(1, native, native, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / native, (w + 0.1) / native), mode="bicubic")
        assert grid.shape[-2:] == (h, w)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, c)
    x = torch.cat([state["cls_token"].expand(b, -1, -1), x], dim=1) + torch.cat([pos[:, :1], patch_pos], dim=1)
    for i in range(layer):
        q, k, v = _qkv_heads(x, state, i, heads)
        attn = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(x.shape), state[f"blocks.{i}.attn.proj.weight"],
                         state[f"blocks.{i}.attn.proj.bias"])
        y = F.gelu(F.linear(_layer_norm(x, state, f"blocks.{i}.norm2"), state[f"blocks.{i}.mlp.fc1.weight"],
                            state[f"blocks.{i}.mlp.fc1.bias"]))
        x = x + F.linear(y, state[f"blocks.{i}.mlp.fc2.weight"], state[f"blocks.{i}.mlp.fc2.bias"])
    return x, (h, w)


def authors_facet(state, image, layer, facet, heads=VIT_S["heads"]):
    """The authors' extractor: facet [B, heads, T, head_dim] -> permute(0, 2, 3, 1).flatten(-2), i.e.
    channel c = d * heads + h; CLS dropped; laid out as [B, C, H/P, W/P]."""
    x, (h, w) = dino_tokens_before(state, image, layer)
    qkv = _qkv_heads(x, state, layer, heads)
    chosen = qkv[("query", "key", "value").index(facet)]
    flat = chosen.permute(0, 2, 3, 1).flatten(-2)[:, 1:]
    return flat.transpose(1, 2).reshape(image.shape[0], -1, h, w)


@pytest.fixture(scope="module")
def dino_release_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "dino_deitsmall16_pretrain.pth"
    torch.save(dino_release_state_dict(seed=11), path)
    return path


@pytest.mark.parametrize("facet", ["key", "query", "value"])
@pytest.mark.parametrize("layer", [11, 5])
def test_facets_are_the_authors_on_a_dino_release_checkpoint(dino_release_file, facet, layer):
    state = torch.load(dino_release_file, weights_only=True)
    backbone = ViTBackbone.from_spec(BackboneSpec(name="vit_small_patch16_224.dino", weights=str(dino_release_file),
                                                  layer=layer, facet=facet))
    assert (backbone.channel_layout, backbone.pos_interpolation) == ("interleaved", "dino")
    torch.manual_seed(0)
    for height, width in ((224, 224), (192, 320)):
        image = torch.randn(2, 3, height, width)
        with torch.no_grad():
            expected = authors_facet(state, image, layer, facet)
            found = backbone(image)
        assert found.shape == expected.shape == (2, 384, height // 16, width // 16)
        scale = expected.abs().max().item()
        assert (found - expected).abs().max().item() <= 1e-5 * max(scale, 1.0), (height, width)


def test_dino_rule_differs_from_timm_where_it_should(dino_release_file):
    """The two position rules agree at the native grid and disagree elsewhere: the test above
    could not pass with the wrong rule at 192x320."""
    native, other = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 192, 320)
    spec = {"name": "vit_small_patch16_224.dino", "weights": str(dino_release_file), "layer": 2}
    dino = ViTBackbone.from_spec(BackboneSpec(**spec, pos_interpolation="dino"))
    timm_rule = ViTBackbone.from_spec(BackboneSpec(**spec, pos_interpolation="timm"))
    with torch.no_grad():
        assert torch.equal(dino(native), timm_rule(native))
        assert (dino(other) - timm_rule(other)).abs().max() > 1e-2


def test_layouts_are_a_permutation_of_each_other(dino_release_file):
    spec = {"name": "vit_small_patch16_224.dino", "weights": str(dino_release_file)}
    interleaved = ViTBackbone.from_spec(BackboneSpec(**spec, channel_layout="interleaved"))
    concatenated = ViTBackbone.from_spec(BackboneSpec(**spec, channel_layout="concatenated"))
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = interleaved(image), concatenated(image)
    heads, head_dim = 6, 64
    order = torch.tensor([h * head_dim + d for d in range(head_dim) for h in range(heads)])  # c = d*heads + h
    assert torch.equal(a, b[:, order])
    assert not torch.equal(a, b)


# -- the authors' checkpoint format through the public path --------------------------------------

def _recon_distances(k0_session, k1_session, images_uint8: np.ndarray) -> dict[str, float]:
    """Eq. 1's first term with the exported graphs: F(x) against LiFT(F(x/2), x/2) and against
    F(x/2) bilinearly upsampled; x/2 by striding, as the authors."""
    half = np.ascontiguousarray(images_uint8[:, ::2, ::2])
    target = torch.from_numpy(k0_session.run(images_uint8, iterations=0))
    lifted = torch.from_numpy(k1_session.run(half, iterations=1))
    coarse = torch.from_numpy(k0_session.run(half, iterations=0))
    bilinear = F.interpolate(coarse, size=target.shape[-2:], mode="bilinear", align_corners=False)

    def distance(pred):
        return float((1 - F.cosine_similarity(pred, target, dim=1)).mean())

    return {"lift": distance(lifted), "bilinear": distance(bilinear)}


@pytest.fixture(scope="module")
def authors_format_lift(tmp_path_factory):
    """A LiFT trained for 40 steps on interleaved (authors'-layout) key features of the tiny ViT,
    re-saved as the authors save theirs: a plain state dict, with and without ``module.``."""
    from lift_serve.training.trainer import train

    from tests.test_training import make_images, tiny_config

    root = tmp_path_factory.mktemp("authors_lift")
    make_images(root / "train", 32, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(tiny_config(root / "train", root / "run", imsize=128, batch_size=8, epochs=10,
                                   max_steps=40, lr=6e-3))
    finally:
        torch.set_num_threads(threads)
    assert json.loads(result.checkpoint.with_suffix(".json").read_text())["backbone"]["channel_layout"] == \
        "interleaved"
    from safetensors.torch import load_file

    state = load_file(str(result.checkpoint))
    plain, wrapped = root / "lift_tiny.pth", root / "lift_tiny_dp.pth"
    torch.save(state, plain)
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)
    backbone_file = root / "tiny_vit.pth"
    torch.save(ViTBackbone.from_spec(BackboneSpec.from_dict(tiny_spec_dict())).vit.state_dict(), backbone_file)
    return root, plain, wrapped, backbone_file


def _export_args(checkpoint, backbone_file, out, *extra):
    return ["export", "--checkpoint", str(checkpoint), "--backbone", "vit_tiny_patch16_224",
            "--backbone-weights", str(backbone_file),
            "--backbone-kwargs", json.dumps(tiny_spec_dict()["model_kwargs"]),
            "--lift-iterations", "0,1", "--sizes", "64,128", "--out", str(out), *extra]


@pytest.mark.parametrize("which", ["plain", "module_prefix"])
def test_authors_pth_through_export_and_runtime_beats_bilinear(authors_format_lift, which, capsys):
    from lift_serve.service.ort_runtime import BundleRuntime

    from tests.test_training import make_images

    root, plain, wrapped, backbone_file = authors_format_lift
    checkpoint = plain if which == "plain" else wrapped
    out = root / f"bundle_{which}"
    assert lift_cli.main(_export_args(checkpoint, backbone_file, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"]["channel_layout"] == "interleaved"
    assert manifest["upsampler"]["checkpoint_format"] == "authors"
    runtime = BundleRuntime(out, providers=("cpu",))
    from PIL import Image

    held_out = [np.asarray(Image.open(p).convert("RGB").resize((128, 128), Image.Resampling.BILINEAR))
                for p in make_images(root / f"held_out_{which}", 6, seed=1)]
    distances = _recon_distances(runtime, runtime, np.stack(held_out))
    assert distances["lift"] < distances["bilinear"], distances

    # The same weights on the other channel order (what a layout mix-up would serve) do worse
    # than bilinear: the comparison above can tell the layouts apart.
    spec = BackboneSpec.from_dict(tiny_spec_dict(weights=str(backbone_file), channel_layout="concatenated"))
    scrambled = ViTBackbone.from_spec(spec)
    lift = LiFT(scrambled.embed_dim, scrambled.patch_size)
    lift.load_state_dict(torch.load(plain, weights_only=True))
    extractor = DenseExtractor(scrambled, lift.eval(), 1).eval()
    images = torch.from_numpy(np.stack(held_out)).permute(0, 3, 1, 2)
    with torch.no_grad():
        target = scrambled(extractor.preprocessing.normalize(images))
        lifted = extractor(extractor.preprocessing.normalize(images[..., ::2, ::2]))
    wrong = float((1 - F.cosine_similarity(lifted, target, dim=1)).mean())
    assert wrong > distances["bilinear"], (wrong, distances)


def test_authors_pth_on_the_other_layout_is_refused(authors_format_lift, capsys):
    root, plain, _, backbone_file = authors_format_lift
    code = lift_cli.main(_export_args(plain, backbone_file, root / "refused", "--channel-layout", "concatenated"))
    assert code == 2
    message = capsys.readouterr().err
    assert "interleaved" in message and "concatenated" in message and "--channel-layout" in message
    assert not (root / "refused").exists()


def test_our_checkpoint_and_explicit_backbone_of_another_layout_is_refused(tmp_path):
    spec = BackboneSpec.from_dict(tiny_spec_dict())
    backbone = ViTBackbone.from_spec(spec)
    lift = LiFT(backbone.embed_dim, backbone.patch_size)
    meta = CheckpointMeta(backbone=backbone.spec.to_dict(), channels=32, patch_size=16,
                          mean=list(backbone.mean), std=list(backbone.std))
    path = save_lift_checkpoint(tmp_path / "ours.safetensors", lift, meta)
    with pytest.raises(CheckpointError, match="'interleaved' channel layout.*'concatenated'"):
        load_backbone_and_lift(BackboneSpec.from_dict(tiny_spec_dict(channel_layout="concatenated")), path)
    # Left unset, the layout is taken from the checkpoint.
    backbone, _, _ = load_backbone_and_lift(BackboneSpec.from_dict(tiny_spec_dict(channel_layout=None)), path)
    assert backbone.channel_layout == "interleaved"


def test_checkpoint_from_before_the_layout_field_gives_the_same_features(tmp_path):
    """A sidecar written before channel_layout/pos_interpolation existed (format 1): its LiFT gets
    timm's head-concatenated facet, exactly as before (bit for bit)."""
    old_spec = {k: v for k, v in tiny_spec_dict(name="vit_small_patch16_224.dino").items()}
    backbone = ViTBackbone.from_spec(BackboneSpec.from_dict(old_spec | {"channel_layout": "concatenated",
                                                                       "pos_interpolation": "timm"}))
    torch.manual_seed(5)
    lift = LiFT(backbone.embed_dim, backbone.patch_size).eval()
    meta = CheckpointMeta(backbone=old_spec, channels=32, patch_size=16, mean=list(backbone.mean),
                          std=list(backbone.std))
    path = save_lift_checkpoint(tmp_path / "old.safetensors", lift, meta)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar["format_version"] = 1
    assert "channel_layout" not in sidecar["backbone"] and "pos_interpolation" not in sidecar["backbone"]
    path.with_suffix(".json").write_text(json.dumps(sidecar))

    extractor = build_extractor(None, path, lift_iterations=1)
    assert (extractor.backbone.channel_layout, extractor.backbone.pos_interpolation) == ("concatenated", "timm")
    image = torch.randn(1, 3, 64, 96)
    vit = extractor.backbone.vit
    with torch.no_grad():
        # The pre-layout computation, written out: timm's tokens, qkv of the last block, the key
        # third sliced as is (heads concatenated), CLS dropped.
        x = vit.blocks[0](vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image)))))
        qkv = vit.blocks[1].attn.qkv(vit.blocks[1].norm1(x))
        key = qkv[..., 32:64][:, 1:].transpose(1, 2).reshape(1, 32, 4, 6)
        expected = lift(image, key)
        found = extractor(image)
    assert torch.equal(found, expected)
