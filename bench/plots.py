"""PNG plots of the ``lift eval`` JSON reports (matplotlib, Agg backend: no display needed).

Each function takes the report dict exactly as written to JSON, so a plot can be redrawn later
from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    return path


def plot_spair(report: dict[str, Any], path: str | Path) -> Path:
    """Bars of PCK per category (one group per alpha) plus the category mean."""
    plt = _pyplot()
    results = report["results"]
    alphas = report["config"]["alphas"]
    names = [*results["per_category"], "mean"]
    rows = [*results["per_category"].values(), results["overall"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
    width = 0.8 / len(alphas)
    for i, alpha in enumerate(alphas):
        ax.bar([j + i * width for j in range(len(names))], [r[f"pck@{alpha}"] for r in rows], width,
               label=f"PCK@{alpha}")
    ax.set_xticks([j + width * (len(alphas) - 1) / 2 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel("PCK (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"SPair-71k, {report['config']['label']} at {report['config']['size']} px")
    ax.legend()
    return _save(fig, path)


def plot_warp(report: dict[str, Any], path: str | Path) -> Path:
    """PCK against the pixel threshold, one line per method, one panel per matcher."""
    plt = _pyplot()
    thresholds = report["config"]["thresholds_px"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, matcher in zip(axes, ("dense_nn", "mutual_nn"), strict=True):
        for entry in report["results"].values():
            ax.plot(thresholds, [entry[matcher][f"pck@{t:g}px"] for t in thresholds], marker="o",
                    label=entry["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(thresholds, [f"{t:g}" for t in thresholds])
        ax.set_xlabel("threshold (px)")
        ax.set_title(f"warp-PCK, {matcher}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PCK (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend()
    return _save(fig, path)


def plot_cka(report: dict[str, Any], path: str | Path) -> Path:
    """CKA against input scale, one line per method; left: vs itself at scale 1, right: vs backbone."""
    plt = _pyplot()
    results = report["results"]
    scales = list(results["input_sizes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    titles = {"self": "vs the same method at scale 1", "vs_backbone": "vs backbone at scale 1"}
    for ax, key in zip(axes, ("self", "vs_backbone"), strict=True):
        for name, entry in results.items():
            if name != "input_sizes":
                ax.plot([float(s) for s in scales], [entry[key][s] for s in scales], marker="o", label=entry["label"])
        ax.set_xlabel("input scale")
        ax.set_title(f"linear CKA {titles[key]}")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CKA")
    axes[0].set_ylim(0, 1.02)
    axes[1].legend()
    return _save(fig, path)


def plot_flops(report: dict[str, Any], path: str | Path) -> Path:
    """PCK against GMACs (paper Fig. 3) when PCK is known, otherwise GMACs per configuration."""
    plt = _pyplot()
    rows = report["rows"]
    metrics = sorted({m for row in rows for m in row.get("pck", {})})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if metrics:
        for metric in metrics:
            points = [row for row in rows if metric in row.get("pck", {})]
            ax.scatter([r["gmacs"] for r in points], [r["pck"][metric] for r in points], label=metric)
            for r in points:
                ax.annotate(f"{r['label']} @{r['size']}", (r["gmacs"], r["pck"][metric]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("GMACs per image (paper's GFLOPs)")
        ax.set_ylabel("PCK (%)")
        ax.set_title("PCK against compute")
        ax.legend()
    else:
        labels = [f"{r['label']}\n@{r['size']}" for r in rows]
        ax.bar(range(len(rows)), [r["gmacs"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel("GMACs per image (paper's GFLOPs)")
        ax.set_title("compute per configuration")
    ax.grid(alpha=0.3)
    return _save(fig, path)
