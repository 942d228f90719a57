"""Publishing a bundle: a finished temporary directory moves into place in one rename, so an
interrupted or failed export never leaves a half bundle; an existing bundle there is replaced,
any other existing directory is refused."""

from __future__ import annotations

from pathlib import Path

from lift_serve.bundle import MANIFEST_NAME
from lift_serve.bundle.publish import replace_directory
from lift_serve.model.onnx_graphs import ExportError


def publish_directory(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished bundle into place; an existing bundle there is replaced."""
    replace_directory(tmp_dir, out_dir, MANIFEST_NAME, lambda: ExportError(
        f"{out_dir} exists and is not a bundle; choose another --out or remove it first"))
