"""``hf://`` references resolved through the real huggingface_hub code, on a Hugging Face cache the
test builds (offline: nothing is downloaded). The cache has the documented layout:
``models--ORG--NAME/refs/<branch or tag>`` holds a commit hash and ``snapshots/<commit>/`` the files.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

COMMIT_1 = "1" * 40
COMMIT_2 = "2" * 40


def _publish(cache: Path, repo_id: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)):
    """Put ``files`` (repository path -> local file or folder) in the cache as ``repo_id`` at ``commit``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_bundle_by_reference_with_and_without_revision(hub_cache, tiny_bundle):
    from lift_serve.hub.refs import resolve_directory
    from lift_serve.service.settings import Settings

    root = _publish(hub_cache, "acme/tiny-bundle", COMMIT_1, {f.name: f for f in tiny_bundle.iterdir()})
    nested = _publish(hub_cache, "acme/bundles", COMMIT_2, {"tiny": tiny_bundle}, refs=("main", "v1"))
    assert resolve_directory("hf://acme/tiny-bundle") == root
    assert resolve_directory(f"hf://acme/tiny-bundle@{COMMIT_1}") == root
    assert resolve_directory("hf://acme/bundles@v1/tiny") == nested / "tiny"
    # LIFT_BUNDLE / --bundle take it too, and the service reads the manifest from the cache.
    settings = Settings(bundle="hf://acme/bundles/tiny")
    assert settings.bundle == nested / "tiny" and (settings.bundle / "manifest.json").is_file()
    from lift_serve.service.app import check_settings

    check_settings(settings)


def test_a_checkpoint_by_reference_brings_its_sidecar(hub_cache, tiny_bundle, tmp_path):
    import argparse

    from lift_serve.model.checkpoint import is_ours, load_lift_checkpoint
    from lift_serve.model.options import resolve_checkpoint_option

    weights = tiny_bundle.parent / f"{tiny_bundle.name}_lift.safetensors"
    _publish(hub_cache, "acme/lift", COMMIT_1, {"run/lift.safetensors": weights,
                                                  "run/lift.json": weights.with_suffix(".json")}, refs=("main", "v2"))
    for ref in ("hf://acme/lift/run/lift.safetensors", "hf://acme/lift@v2/run/lift.safetensors"):
        args = argparse.Namespace(checkpoint=ref)
        resolve_checkpoint_option(args)
        path = Path(args.checkpoint)
        assert path.is_file() and is_ours(path)  # the sidecar came along: the backbone is known
        lift, meta = load_lift_checkpoint(path, channels=32, patch_size=16)
        assert meta is not None and meta.channels == 32


def test_backbone_weights_by_reference_load_the_same_numbers(hub_cache, tmp_path):
    import torch
    from lift_serve.model.backbone import BackboneSpec, ViTBackbone
    from safetensors.torch import save_file

    from tests.conftest import tiny_spec_dict

    source = ViTBackbone.from_spec(BackboneSpec.from_dict(tiny_spec_dict(seed=11)))
    file = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, str(file))
    _publish(hub_cache, "acme/vit", COMMIT_1, {"weights/vit.safetensors": file})
    loaded = ViTBackbone.from_spec(BackboneSpec.from_dict(
        tiny_spec_dict(weights=f"hf://acme/vit@{COMMIT_1}/weights/vit.safetensors")))
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), source(image))


@pytest.mark.parametrize(("ref", "words"), [
    ("hf://acme/lift/run/missing.pth", ["revision 'main' of acme/lift has no file run/missing.pth",
                                        "HF_HUB_OFFLINE is set", "hf download acme/lift run/missing.pth"]),
    ("hf://acme/lift@v9/run/lift.safetensors", ["revision 'v9' of acme/lift is not in the cache",
                                                "cached revisions: main", "--revision v9"]),
    ("hf://acme/nothing/x.pth", ["has no copy of acme/nothing"]),
])
def test_what_is_missing_is_named_at_once(hub_cache, tmp_path, ref, words):
    from lift_serve.hub.refs import HubError, resolve_file

    (tmp_path / "w.safetensors").write_bytes(b"x")
    _publish(hub_cache, "acme/lift", COMMIT_1, {"run/lift.safetensors": tmp_path / "w.safetensors"})
    started = time.monotonic()
    with pytest.raises(HubError) as caught:
        resolve_file(ref)
    assert time.monotonic() - started < 5  # no retries: the library alone waits ~25 s unreachable
    for text in words:
        assert text in str(caught.value)


def test_an_unreachable_hub_uses_the_cache_without_waiting(hub_cache, tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE, a Hub that does not answer (a closed loopback port) is probed once:
    the cache serves what it has and a miss fails at once, saying why."""
    import socket

    from lift_serve.hub import refs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: connections are refused
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    refs._hub_answers.cache_clear()
    (tmp_path / "w.pth").write_bytes(b"weights")
    snapshot = _publish(hub_cache, "acme/lift", COMMIT_1, {"lift.pth": tmp_path / "w.pth"})
    started = time.monotonic()
    assert refs.resolve_file("hf://acme/lift/lift.pth") == snapshot / "lift.pth"
    with pytest.raises(refs.HubError, match=f"the Hub \\(http://127.0.0.1:{port}\\) does not answer"):
        refs.resolve_file("hf://acme/lift/other.pth")
    assert time.monotonic() - started < 5
    refs._hub_answers.cache_clear()


@pytest.mark.parametrize("bad", ["hf://acme", "hf://acme/x/../y", "hf://ac me/x", "hf://acme/x@/f"])
def test_a_malformed_reference_says_how_to_write_one(bad):
    from lift_serve.hub.refs import HubError, parse_hub_ref

    with pytest.raises(HubError, match=r"hf://ORG/NAME\[@REVISION\]\[/PATH\]"):
        parse_hub_ref(bad)


def test_a_repository_where_a_file_is_needed_is_refused(hub_cache):
    from lift_serve.hub.refs import HubError, resolve_file

    with pytest.raises(HubError, match="names a repository, but a file is needed"):
        resolve_file("hf://acme/lift")
