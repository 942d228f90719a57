"""Publishing a finished directory (a bundle, a Triton repository): it is written in a temporary
directory beside its destination, then moved into place in one rename, so an interrupted or failed
write never leaves half of one. An earlier directory of the same kind there (it holds ``marker``)
is replaced, and so is an empty one; anything else is refused. Standard library only, so both the
torch-side exporter and the torch-free repository writer use it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_directory(tmp_dir: Path, out_dir: Path, marker: str, refuse: Callable[[], Exception]) -> None:
    """Move ``tmp_dir`` to ``out_dir``; raises ``refuse()`` when ``out_dir`` is a file or a non-empty
    directory without ``marker``."""
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).is_file()):
            raise refuse()
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.replace(old / "previous")
        tmp_dir.replace(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.replace(out_dir)
