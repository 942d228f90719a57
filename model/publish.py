"""Publishing a bundle: a finished temporary directory moves into place in one rename, so an
interrupted or failed export never leaves a half bundle; an existing bundle there is replaced,
any other existing directory is refused."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lift_serve.bundle import MANIFEST_NAME
from lift_serve.model.onnx_graphs import ExportError


def publish_directory(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished bundle into place; an existing bundle there is replaced."""
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file()):
            raise ExportError(
                f"{out_dir} exists and is not a bundle; choose another --out or remove it first"
            )
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.replace(old / "bundle")
        tmp_dir.replace(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.replace(out_dir)
