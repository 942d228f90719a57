"""Export side: bundle contents, parity with PyTorch, the authors' checkpoint path, refusals, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_spec_dict
from lift_serve.bundle import sha256_file
from lift_serve.model.backbone import BackboneSpec
from lift_serve.model.demo import export_demo_bundle
from lift_serve.model.export import ExportError, export_bundle, natural_image
from lift_serve.model.export_cli import parse_iterations, parse_sizes
from lift_serve.model.extractor import DenseExtractor
from lift_serve.model.lift import LiFT
from lift_serve.model.options import OptionError
from lift_serve.model.publish import publish_directory
from lift_serve.service.ort_runtime import BundleRuntime

from lift_serve import cli as lift_cli


def tiny_args(*extra: str) -> list[str]:
    spec = tiny_spec_dict()
    return ["--backbone", spec["name"], "--backbone-weights", "random", "--seed", str(spec["seed"]),
            "--backbone-kwargs", json.dumps(spec["model_kwargs"]), *extra]


def torch_features(extractor: DenseExtractor, images: np.ndarray) -> np.ndarray:
    """The PyTorch reference, normalising NCHW itself (not through the export wrapper)."""
    x = extractor.preprocessing.normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.no_grad():
        return extractor(x).numpy()


def seeded_lift(backbone) -> LiFT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LiFT(backbone.embed_dim, backbone.patch_size).eval()


@pytest.mark.parametrize("iterations", [0, 1])
def test_bundle_matches_pytorch_at_every_size_and_batch(tiny_bundle, tiny_backbone, iterations):
    extractor = DenseExtractor(tiny_backbone, seeded_lift(tiny_backbone), iterations).eval()
    runtime = BundleRuntime(tiny_bundle, providers=["cpu"])
    rng = np.random.default_rng(5)
    for height, width in [(64, 64), (64, 96)]:
        for batch in (1, 3):
            images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
            images[0] = natural_image(height, width, seed=batch)
            found = runtime.run(images, iterations)
            expected = torch_features(extractor, images)
            scale = 2**iterations
            assert found.shape == (batch, 32, height // 16 * scale, width // 16 * scale)
            assert found.dtype == np.float32
            np.testing.assert_allclose(found, expected, atol=1e-4, rtol=1e-4)


def test_manifest_records_contract_and_parity(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["input"] == {"name": "image", "sizes": [[64, 64], [64, 96]], "dtype": "uint8",
                                 "layout": "NHWC", "color": "RGB", "mean": manifest["input"]["mean"],
                                 "std": manifest["input"]["std"], "multiple": 16}
    assert manifest["output"] == {"name": "features", "channels": 32, "dtype": "float32", "layout": "NCHW"}
    assert manifest["format_version"] == 2
    assert manifest["iterations"] == [0, 1] and manifest["default_iterations"] == 1
    checkpoint = tiny_bundle.parent / "bundle_lift.safetensors"
    upsampler = manifest["upsampler"]
    assert (upsampler["kind"], upsampler["parameters"]) == ("lift", {"in_channels": 32, "patch_size": 16})
    assert (upsampler["chain"], upsampler["scale_per_step"], upsampler["max_steps"]) == (
        "prepare-once-then-step-k-times", 2, 1)
    assert upsampler["checkpoint_format"] == "ours"
    assert upsampler["checkpoint_sha256"] == sha256_file(checkpoint)
    assert manifest["backbone"]["timm_name"] == "vit_tiny_patch16_224"
    assert manifest["backbone"]["model_kwargs"] == tiny_spec_dict()["model_kwargs"]
    graphs = {"backbone": manifest["backbone"]["graph"], **upsampler["graphs"]}
    assert {role: g["file"] for role, g in graphs.items()} == {
        "backbone": "backbone.onnx", "prepare": "upsampler_prepare.onnx", "step": "upsampler_step.onnx"}
    assert graphs["step"]["inputs"] == ["state", "features"]
    assert graphs["step"]["outputs"] == ["next_state", "next_features"]
    for graph in graphs.values():
        assert graph["sha256"] == sha256_file(tiny_bundle / graph["file"])
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted(["manifest.json", *(g["file"] for g in
                                                                                    graphs.values())])
    cases = manifest["parity"]["cases"]
    covered = {(c["graph"], c["iterations"], tuple(c["size"]), c["batch"]) for c in cases}
    assert covered == {(graph, k, s, b) for graph, k in (("backbone", 0), ("upsampler_step", 1), ("chain", 1))
                       for s in ((64, 64), (64, 96)) for b in (1, 2)}
    assert {kind for c in cases for kind in c["inputs"]} == {"natural", "random"}
    assert manifest["parity"]["min_cosine"] >= 0.9999
    assert manifest["parity"]["min_cosine"] == min(c["min_cosine"] for c in cases)
    assert 0 <= manifest["parity"]["max_abs_err"] < 1e-3
    assert not list(tiny_bundle.parent.glob(".bundle.tmp-*")), "temporary export directory left behind"


def test_export_from_authors_pth_via_cli(tmp_path, tiny_backbone, capsys):
    lift = seeded_lift(tiny_backbone)
    with torch.no_grad():  # make it differ from a freshly initialised LiFT, BatchNorm statistics included
        for tensor in lift.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.rand_like(tensor))
    # The authors' layout: a plain state dict saved from DataParallel, every key prefixed "module.".
    torch.save({f"module.{k}": v for k, v in lift.state_dict().items()}, tmp_path / "their.pth")
    out = tmp_path / "bundle"
    code = lift_cli.main(["export", *tiny_args("--checkpoint", str(tmp_path / "their.pth"), "--out", str(out),
                                               "--sizes", "64x96")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "upsampler_step.onnx" in printed and "chain k=1" in printed and "64x96" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["upsampler"]["checkpoint_format"] == "authors"
    assert manifest["upsampler"]["checkpoint_sha256"] == sha256_file(tmp_path / "their.pth")
    assert manifest["random_weights"] == ["backbone"]  # the authors' LiFT is trained; the tiny ViT is random
    assert "checkpoint: the authors' lift file (no sidecar; kind told by its keys)" in printed
    assert "WARNING: random or untrained weights: backbone" in printed
    images = natural_image(64, 96, seed=9)[None]
    expected = torch_features(DenseExtractor(tiny_backbone, lift, 1).eval(), images)
    np.testing.assert_allclose(BundleRuntime(out).run(images), expected, atol=1e-4, rtol=1e-4)


def test_weights_from_a_file_are_not_flagged_random(tmp_path, tiny_backbone, capsys):
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.vit.state_dict().items()}, str(weights))
    out = tmp_path / "plain"
    assert lift_cli.main(["export", *tiny_args("--backbone-weights", str(weights), "--lift-iterations", "0",
                                               "--sizes", "64", "--out", str(out))]) == 0
    assert json.loads((out / "manifest.json").read_text())["random_weights"] == []
    assert "random or untrained weights" not in capsys.readouterr().out


def test_fp16_export_verified_on_cpu(tmp_path, tiny_backbone):
    checkpoint = tmp_path / "lift.pth"
    torch.save(seeded_lift(tiny_backbone).state_dict(), checkpoint)
    out = export_bundle(tmp_path / "fp16", BackboneSpec.from_dict(tiny_spec_dict()), checkpoint,
                        lift_iterations=(1,), sizes=[64], precision="fp16")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["output"]["dtype"] == "float16" and manifest["onnx"]["precision"] == "fp16"
    assert manifest["parity"]["min_cosine"] >= 0.999
    runtime = BundleRuntime(out)
    images = natural_image(64, 64)[None]
    found = runtime.run(images)
    assert found.dtype == np.float32  # the runtime casts fp16 outputs
    expected = torch_features(DenseExtractor(tiny_backbone, seeded_lift(tiny_backbone), 1).eval(), images)
    cosine = (found * expected).sum(1) / np.linalg.norm(found, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.999


def test_parity_failure_refuses_and_leaves_nothing(tmp_path, tiny_bundle, monkeypatch):
    import lift_serve.model.export
    import lift_serve.model.parity

    # Reuse the fixture's graph instead of exporting again (export itself is covered above); a
    # cosine threshold above 1 cannot be met, so the export must fail and publish nothing.
    def copy_graph(graph, output, path, multiple, opset):
        shutil.copy(tiny_bundle / "backbone.onnx", path)

    monkeypatch.setattr(lift_serve.model.export, "export_image_graph", copy_graph)
    monkeypatch.setitem(lift_serve.model.parity.MIN_COSINE, "fp32", 1.5)
    with pytest.raises(ExportError, match=r"parity check failed for the backbone graph \(fp32\) at 64x64.*min cosine"):
        export_bundle(tmp_path / "bundle", BackboneSpec.from_dict(tiny_spec_dict()), None,
                      lift_iterations=(0,), sizes=[64])
    assert list(tmp_path.iterdir()) == []


def test_publish_replaces_a_bundle_but_not_other_directories(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "manifest.json").write_text("new")
    publish_directory(new, out)
    assert (out / "manifest.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(ExportError, match="is not a bundle"):
        publish_directory(again, other)
    assert (other / "cat.jpg").exists()


def test_demo_bundle_is_reused_when_current(tmp_path, tiny_bundle, monkeypatch):
    import lift_serve.model.demo
    import lift_serve.model.export

    cached = tmp_path / "demo"
    shutil.copytree(tiny_bundle, cached)
    manifest = json.loads((cached / "manifest.json").read_text())
    manifest["demo"] = True
    (cached / "manifest.json").write_text(json.dumps(manifest))
    demo_spec = {"name": manifest["backbone"]["timm_name"], "weights": "random", "seed": manifest["backbone"]["seed"],
                 "layer": -1, "facet": "key", "model_kwargs": manifest["backbone"]["model_kwargs"],
                 "channel_layout": manifest["backbone"]["channel_layout"]}
    monkeypatch.setattr(lift_serve.model.demo, "DEMO_SPEC", demo_spec)
    monkeypatch.setattr(lift_serve.model.demo, "DEMO_SIZES", ((64, 64), (64, 96)))

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(lift_serve.model.export, "export_modules", no_export)
    assert export_demo_bundle(cached) == cached
    (cached / "upsampler_step.onnx").write_bytes(b"truncated")  # a damaged cache is not reused
    with pytest.raises(AssertionError, match="exported again"):
        export_demo_bundle(cached)


def test_parse_sizes_and_iterations():
    assert parse_sizes("224,448") == [(224, 224), (448, 448)]
    assert parse_sizes("224x320, 64X96") == [(224, 320), (64, 96)]
    assert parse_iterations("0,1,2") == [0, 1, 2]
    for bad in ("224x", "big", "224,,448", "0x64"):
        with pytest.raises(OptionError, match="--sizes"):
            parse_sizes(bad)
    with pytest.raises(OptionError, match="--lift-iterations"):
        parse_iterations("1,-1")


@pytest.mark.parametrize("extra, message", [
    (["--sizes", "70"], "not a positive multiple of the patch size 16"),
    (["--sizes", "64by64"], "--sizes: cannot read"),
    (["--lift-iterations", "1"], "need LiFT weights"),
    (["--checkpoint", "/nonexistent/lift.pth"], "does not exist"),
])
def test_cli_refuses_bad_options(tmp_path, capsys, extra, message):
    code = lift_cli.main(["export", *tiny_args("--lift-iterations", "0", "--out", str(tmp_path / "b"), *extra)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_sizes_are_deduplicated_and_must_fit_patch():
    from lift_serve.model.export import normalise_sizes

    assert normalise_sizes([64, (64, 96), (64, 64)], 16) == [(64, 64), (64, 96)]
    with pytest.raises(ExportError, match="multiple of the patch size"):
        normalise_sizes([(64, 100)], 16)


def test_cli_takes_backbone_from_sidecar_unless_named():
    import argparse

    from lift_serve.model.export_cli import add_arguments
    from lift_serve.model.options import backbone_spec_unless_sidecar as _spec

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert _spec(parser.parse_args(["--checkpoint", "runs/lift.safetensors"])) is None  # sidecar decides
    spec = _spec(parser.parse_args(["--checkpoint", "their.pth"]))
    assert spec.name == "vit_small_patch16_224.dino" and spec.weights == "hub"
    named = _spec(parser.parse_args(["--checkpoint", "runs/lift.safetensors", *tiny_args()]))
    assert named.name == "vit_tiny_patch16_224" and named.model_kwargs == tiny_spec_dict()["model_kwargs"]


def test_a_bundle_is_readable_by_another_user(tiny_bundle):
    """The service often runs as another user than the export (the compose export job, a volume):
    the directory is 0755 and its files 0644, not the 0700 of a temporary directory."""
    import stat

    assert stat.S_IMODE(tiny_bundle.stat().st_mode) == 0o755
    for path in tiny_bundle.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
