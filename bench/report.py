"""What every speed benchmark writes: the machine's facts, the JSON file and the printed table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine_facts() -> dict:
    """Enough to tell runs apart: a figure is only comparable with figures of the same run."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_end": os.getloadavg()}


def write_report(result: dict, out: str | Path, table: str) -> Path:
    """``result`` as indented JSON at ``out`` (folders made), then ``table`` and where it went."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table)
    print(f"wrote {out}")
    return out
