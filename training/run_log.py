"""The run's log: messages on stderr (rank 0), ``log.jsonl`` records, and the loss curve PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from lift_serve.training.config import LOG_NAME


class RunLogger:
    """Rank-0 console lines (through tqdm so bars stay intact) and the JSONL log."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = out / LOG_NAME
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.is_file():
            # Steps after the saved state are about to be redone: drop them so the log has no repeats.
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def say(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def record(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def plot_loss_curve(log_path: Path, png_path: Path) -> Path | None:
    """Draw loss per step (and a moving average) from ``log.jsonl`` into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r and "event" not in r]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss per step")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("Eq. 1 loss")
    ax.set_title("LiFT training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


