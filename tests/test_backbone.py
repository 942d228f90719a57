import pytest
import torch
from conftest import tiny_spec_dict
from lift_serve.model.backbone import BackboneError, BackboneSpec, ViTBackbone, build_vit


@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("facet", ["key", "query", "value", "token"])
def test_facet_shapes_square_and_non_square(patch, facet):
    spec = BackboneSpec.from_dict(tiny_spec_dict(patch, facet=facet))
    backbone = ViTBackbone.from_spec(spec)
    for h, w in ((64, 64), (224, 320)):
        out = backbone(torch.randn(2, 3, h, w))
        assert out.shape == (2, 32, h // patch, w // patch)


def test_concatenated_layout_key_facet_equals_hand_computation():
    # timm's head-concatenated order (c = h * head_dim + d): what checkpoints and bundles that predate
    # the recorded layout were made with. The authors' interleaved order is tested in test_fidelity.py.
    tiny_backbone = ViTBackbone.from_spec(BackboneSpec.from_dict(tiny_spec_dict(channel_layout="concatenated")))
    vit = tiny_backbone.vit
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image))))
        x = vit.blocks[0](x)  # the tiny ViT has 2 blocks; the key facet is taken from the last
        block = vit.blocks[1]
        b, n, c = x.shape
        heads = block.attn.num_heads
        qkv = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        k = qkv[1]  # [B, heads, N, head_dim]
        k = k.permute(0, 2, 1, 3).reshape(b, n, c)[:, vit.num_prefix_tokens :]  # heads concatenated
        expected = k.transpose(1, 2).reshape(b, c, 4, 6)
        got = tiny_backbone(image)
    assert (got - expected).abs().max().item() <= 1e-5


def test_random_weights_are_reproducible_from_seed():
    a = build_vit(BackboneSpec.from_dict(tiny_spec_dict()))
    b = build_vit(BackboneSpec.from_dict(tiny_spec_dict()))
    c = build_vit(BackboneSpec.from_dict(tiny_spec_dict(seed=8)))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["blocks.0.attn.qkv.weight"], c.state_dict()["blocks.0.attn.qkv.weight"])


def test_backbone_stays_frozen_in_train_mode(tiny_backbone):
    tiny_backbone.train()
    assert not tiny_backbone.vit.training
    assert not any(p.requires_grad for p in tiny_backbone.parameters())


def test_local_timm_weights_file_loads(tmp_path):
    source = build_vit(BackboneSpec.from_dict(tiny_spec_dict(seed=3)))
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    loaded = build_vit(BackboneSpec.from_dict(tiny_spec_dict(weights=str(path))))
    assert torch.equal(loaded.state_dict()["blocks.1.attn.qkv.weight"], source.state_dict()["blocks.1.attn.qkv.weight"])


def test_original_dino_checkpoint_layout_loads(tmp_path):
    # DINO's training checkpoints wrap the ViT as {'teacher': {'module.backbone.<key>': ...}} with a head.
    source = build_vit(BackboneSpec.from_dict(tiny_spec_dict(seed=4)))
    teacher = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(4, 32)
    path = tmp_path / "dino_checkpoint.pth"
    torch.save({"teacher": teacher, "epoch": 100}, path)
    loaded = build_vit(BackboneSpec.from_dict(tiny_spec_dict(weights=str(path))))
    assert torch.equal(loaded.state_dict()["pos_embed"], source.state_dict()["pos_embed"])


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(BackboneError, match="missing keys"):
        build_vit(BackboneSpec.from_dict(tiny_spec_dict(weights=str(path))))


def test_missing_local_file_names_the_flag(tmp_path):
    with pytest.raises(BackboneError, match="--backbone-weights"):
        build_vit(BackboneSpec.from_dict(tiny_spec_dict(weights=str(tmp_path / "nope.pth"))))


def test_offline_hub_error_names_weights_and_flag(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE when imported, so this runs in a fresh interpreter.
    import os
    import subprocess
    import sys

    code = (
        "from model.backbone import BackboneSpec, build_vit\n"
        f"spec = BackboneSpec.from_dict({tiny_spec_dict(name='vit_tiny_patch16_224.augreg_in21k', weights='hub')!r})\n"
        "build_vit(spec)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "BackboneError" in result.stderr
    assert "vit_tiny_patch16_224.augreg_in21k" in result.stderr and "--backbone-weights" in result.stderr


def test_bad_facet_and_layer_are_refused():
    vit = build_vit(BackboneSpec.from_dict(tiny_spec_dict()))
    with pytest.raises(BackboneError, match="facet"):
        ViTBackbone(vit, BackboneSpec.from_dict(tiny_spec_dict(facet="attn")))
    with pytest.raises(BackboneError, match="layer 5"):
        ViTBackbone(vit, BackboneSpec.from_dict(tiny_spec_dict(layer=5)))


def test_image_not_multiple_of_patch_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        tiny_backbone(torch.randn(1, 3, 70, 64))


def test_unknown_model_kwargs_or_non_vit_are_backbone_errors():
    # timm forwards kwargs to the constructor; a TypeError there used to escape as a traceback.
    with pytest.raises(BackboneError, match="bogus"):
        build_vit(BackboneSpec.from_dict(tiny_spec_dict(model_kwargs={"bogus": 1})))
    with pytest.raises(BackboneError, match="VisionTransformer"):
        build_vit(BackboneSpec.from_dict(tiny_spec_dict(name="resnet18", model_kwargs={})))


def test_unreadable_or_wrong_shaped_weights_file_is_a_backbone_error(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read backbone weights file"):
        build_vit(BackboneSpec.from_dict(tiny_spec_dict(weights=str(garbage))))
    wider = build_vit(BackboneSpec.from_dict(tiny_spec_dict(model_kwargs={**tiny_spec_dict()["model_kwargs"],
                                                                           "embed_dim": 48})))
    path = tmp_path / "wider.pth"
    torch.save(wider.state_dict(), path)
    with pytest.raises(BackboneError, match=r"patch_embed.proj.bias: expected \(32,\), found \(48,\)"):
        build_vit(BackboneSpec.from_dict(tiny_spec_dict(weights=str(path))))
