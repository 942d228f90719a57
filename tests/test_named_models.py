"""Named models: ``lift models``, ``lift export --model`` cached by what defines it, ``lift serve
--model`` and ``hubconf.py``. The released entries need the internet; here an entry of the same
kind points at a tiny backbone and LiFT published in a Hugging Face cache the test builds
(offline), so the real resolution, export and cache code runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lift_serve import cli
from tests.conftest import TINY_KWARGS
from tests.test_hub_refs import COMMIT_1, _publish

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def tiny_entry(tmp_path, monkeypatch, tiny_backbone, tiny_lift):
    """A registry entry whose backbone weights and (authors'-style) LiFT file are hf:// references."""
    from lift_serve.hub import models
    from safetensors.torch import save_file

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LIFT_MODELS_CACHE", str(tmp_path / "models"))
    save_file({k: v.contiguous() for k, v in tiny_backbone.vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    torch.save(tiny_lift.state_dict(), tmp_path / "lift.pth")
    _publish(cache, "acme/tiny", COMMIT_1, {"vit.safetensors": tmp_path / "vit.safetensors",
                                            "lift.pth": tmp_path / "lift.pth"})
    entry = dataclasses.replace(models.REGISTRY["lift-dino-vits16"], name="tiny-lift", backbone="vit_tiny_patch16_224",
                                backbone_weights="hf://acme/tiny/vit.safetensors",
                                backbone_kwargs=tuple(TINY_KWARGS.items()), checkpoint="hf://acme/tiny/lift.pth",
                                iterations=(0, 1), sizes=(64,))
    monkeypatch.setitem(models.REGISTRY, entry.name, entry)
    return entry


def test_lift_models_lists_each_with_what_it_needs(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT_MODELS_CACHE", str(tmp_path))
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("uplift-dinov2-s14", "uplift-dinov3-splus16", "lift-dino-vits16", "lift-dino-vits8",
                 "lift-dino-vitb16", "lift-dino-vitb8"):
        assert f"\n  {name}\n" in out
    assert "hf://UPLiFT-upsampler/uplift_dinov2-s14/uplift_dinov2-s14.safetensors" in out
    assert "the LiFT authors' checkpoint for this backbone: --checkpoint PATH" in out
    assert "not exported yet" in out


def test_export_model_once_then_reuse_it(tiny_entry, capsys, monkeypatch):
    from lift_serve.model import export as export_module

    assert cli.main(["export", "--model", "tiny-lift"]) == 0
    first = capsys.readouterr().out
    bundle = Path(first.split("bundle written to ")[1].split(" (format")[0])
    assert bundle.parent.name == "models" and bundle.name.startswith("tiny-lift-fp32-")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backbone"]["weights"] == "hf://acme/tiny/vit.safetensors"
    assert manifest["iterations"] == [0, 1] and manifest["random_weights"] == []  # both weights are real files
    assert manifest["upsampler"]["checkpoint_format"] == "authors"

    # Second time: the cached bundle, no export (what defines it has not changed).
    monkeypatch.setattr(export_module, "export_bundle", lambda *a, **k: pytest.fail("exported again"))
    assert cli.main(["export", "--model", "tiny-lift"]) == 0
    assert f"bundle written to {bundle} " in capsys.readouterr().out
    from lift_serve.serve_cli import named_model_bundle

    assert named_model_bundle("tiny-lift") == bundle  # what `lift serve --model tiny-lift` serves
    # ...through the app's start-up task (the port opens first), answering from that bundle.
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings
    from service_helpers import started_client

    app = create_app(Settings(providers="cpu"), bundle_source=lambda: named_model_bundle("tiny-lift"))
    with started_client(app) as client:
        assert client.get("/v1/models").json()["model"]["input_sizes"] == [{"height": 64, "width": 64}]
    assert cli.main(["models"]) == 0
    assert str(bundle) in capsys.readouterr().out


def test_a_changed_definition_is_a_new_export(tiny_entry):
    from lift_serve.hub.models import bundle_dir_for

    other = dataclasses.replace(tiny_entry, sizes=(64, 128))
    assert bundle_dir_for(other, "ab" * 32) != bundle_dir_for(tiny_entry, "ab" * 32)
    assert bundle_dir_for(tiny_entry, "ab" * 32) != bundle_dir_for(tiny_entry, "cd" * 32)  # another weights file
    assert bundle_dir_for(tiny_entry, "ab" * 32, "fp16") != bundle_dir_for(tiny_entry, "ab" * 32)


def test_unknown_models_and_missing_checkpoints_are_named(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LIFT_MODELS_CACHE", str(tmp_path))
    assert cli.main(["export", "--model", "nope"]) == 2
    assert "no model named 'nope'; `lift models` lists them: lift-dino-vitb16" in capsys.readouterr().err
    assert cli.main(["export", "--model", "lift-dino-vits16"]) == 2
    assert "lift-dino-vits16 needs the LiFT authors' checkpoint" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "a", "--bundle", "b"]) == 2
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "grid"), [("uplift_dinov3_splus16", 16), ("lift_dino_vits8", 32)])
def test_torch_hub_load_returns_the_extractor(name, grid):
    extractor = torch.hub.load(str(ROOT), name, source="local", pretrained=False, iterations=2, trust_repo=True)
    with torch.no_grad():
        features = extractor(torch.randn(1, 3, 64, 64))
    assert features.shape == (1, 384, grid, grid)  # 64 px: 4 cells of 16 or 8 of 8, then 2 steps
    exact = torch.hub.load(str(ROOT), name, source="local", pretrained=False, iterations=1, out_size=(20, 30))
    with torch.no_grad():
        assert exact(torch.randn(1, 3, 64, 64)).shape == (1, 384, 20, 30)


def test_hubconf_works_from_a_plain_checkout():
    """torch.hub puts the repository on sys.path without installing it: hubconf maps the folders."""
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; "
            f"sys.path.insert(0, {str(ROOT)!r}); import hubconf, torch; "
            "e = hubconf.lift_dino_vits8(pretrained=False, iterations=1); "
            "import lift_serve.model; print(lift_serve.model.__file__, tuple(e(torch.randn(1, 3, 32, 32)).shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(ROOT / "model" / "__init__.py"), "(1,", "384,", "8,", "8)"]
