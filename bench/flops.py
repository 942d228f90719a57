"""FLOPs and parameters of dense-feature configurations (LiFT paper, Table 5 and Fig. 3).

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on **meta** tensors: shapes only, no
weights and no arithmetic, so ViT-S at 448 px with two LiFT rounds costs well under a second.
FlopCounterMode counts 2 FLOPs per multiply-add (and only matmuls/convolutions); the paper's
"GFLOPs" are multiply-adds (fvcore's convention), so this module reports **GMACs = FLOPs / 2**
as the paper-comparable number and keeps the raw FLOPs too. Bilinear upsampling, normalisation,
ReLU and pooling are not counted (they are below 0.01 G here).

The LiFT paper's numbers (ViT-S/16 4.34 G, +LiFT 5.30 G) are reproduced for the backbone, but its
+0.96 G for LiFT is not: the exact count is +0.75 G. The difference is LiFT's 2x2/stride-2
transposed convolution, which the ``thop`` profiler (and apparently the paper) counts per *output*
pixel, i.e. 4x its real cost; ``gmacs_thop`` applies that convention (0.75 G + 0.20 G = 0.96 G) so
the paper's table can be compared like for like. ``gmacs`` stays the exact count.

The backbone is counted as the feature extractor runs it: patch embedding, the blocks before the
chosen one, and the chosen block up to its facet (for the default ``key`` facet of the last block,
its ``norm1`` and ``qkv``; no classifier head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lift_serve.bench.eval_common import Method

FLOPS_SPEC = {"name": "vit_small_patch16_224", "weights": "random", "seed": 0, "layer": -1, "facet": "key",
              "model_kwargs": {}}


def build_meta_modules(spec_dict: dict[str, Any]):
    """(backbone, lift) with parameters on the meta device; weights forced to 'random'."""
    import torch
    from lift_serve.model.backbone import BackboneSpec, build_backbone
    from lift_serve.model.upsampler import build_upsampler

    spec = BackboneSpec.from_dict({**spec_dict, "weights": "random"})
    with torch.device("meta"):
        backbone = build_backbone(spec)
        lift = build_upsampler("lift", {"in_channels": backbone.embed_dim, "patch_size": backbone.patch_size})
    return backbone, lift


def count_flops(backbone, lift, method: Method, size: int) -> dict[str, Any]:
    """Multiply-adds of one forward pass of one image at ``size`` x ``size``.

    Returns:
        ``{"method", "label", "size", "output_grid", "flops", "macs", "gmacs", "params",
        "params_backbone", "params_lift"}`` (params in units, ``params`` = what the method uses).
    """
    import torch
    from lift_serve.model.extractor import DenseExtractor
    from torch.utils.flop_counter import FlopCounterMode

    backbone.check_image_size(size, size)
    use_lift = method.kind == "lift"
    extractor = DenseExtractor(backbone, lift if use_lift else None, method.iterations,
                               "bilinear" if method.kind == "bilinear" else "lift").eval()
    image = torch.empty(1, 3, size, size, device="meta")
    overcount = []
    hooks = [m.register_forward_hook(lambda m, i, o: overcount.append(_thop_transposed_overcount(m, i[0], o)))
             for m in extractor.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            output = extractor(image)
    finally:
        for hook in hooks:
            hook.remove()
    flops = int(counter.get_total_flops())
    params_backbone = sum(p.numel() for p in backbone.parameters())
    params_lift = sum(p.numel() for p in lift.parameters()) if use_lift else 0
    return {"method": method.name, "label": method.label, "size": size, "output_grid": list(output.shape[2:]),
            "flops": flops, "macs": flops // 2, "gmacs": flops / 2e9,
            "gmacs_thop": (flops // 2 + sum(overcount)) / 1e9,
            "params": params_backbone + params_lift, "params_backbone": params_backbone, "params_lift": params_lift}


def _thop_transposed_overcount(module, inputs, output) -> int:
    """Extra multiply-adds when a transposed conv is counted per output instead of per input pixel."""
    per_pixel = module.in_channels * (module.out_channels // module.groups) * module.weight.shape[2:].numel()
    return (output[0, 0].numel() - inputs[0, 0].numel()) * per_pixel * output.shape[0]


def flops_table(spec_dict: dict[str, Any], methods: Sequence[Method], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """One :func:`count_flops` row per (size, method), with ``added_vs_backbone`` (fraction of the
    backbone's multiply-adds at the same size)."""
    backbone, lift = build_meta_modules(spec_dict)
    rows = []
    for size in sizes:
        base = count_flops(backbone, lift, Method("backbone"), size)["macs"]
        for method in methods:
            row = count_flops(backbone, lift, method, size)
            row["added_vs_backbone"] = (row["macs"] - base) / base
            row["added_vs_backbone_thop"] = (row["gmacs_thop"] * 1e9 - base) / base
            rows.append(row)
    return rows


# -- PCK from other evaluations -----------------------------------------------------------------


def pck_points(report: dict[str, Any], metric: str | None = None) -> tuple[str, dict[tuple[str, int], float]]:
    """(metric name, {(method name, size): PCK}) from a ``lift eval spair`` or ``lift eval warp`` JSON.

    Default metric: SPair ``pck@0.1`` (mean over categories); warp ``dense_nn/pck@<t>px`` with the
    threshold closest to 8 px.
    """
    kind = report.get("eval")
    if kind == "spair":
        metric = metric or "pck@0.1"
        value = report["results"]["overall"].get(metric)
        if value is None:
            raise KeyError(f"SPair results have no {metric!r}; use one of pck@0.1, pck@0.05, pck@0.01")
        return f"SPair {metric}", {(report["config"]["method"], int(report["config"]["size"])): float(value)}
    if kind == "warp":
        if metric is None:
            thresholds = report["config"]["thresholds_px"]
            closest = min(thresholds, key=lambda t: abs(t - 8))
            metric = f"dense_nn/pck@{closest:g}px"
        matcher, _, key = metric.partition("/")
        size = int(report["config"]["size"])
        points = {}
        for name, entry in report["results"].items():
            if matcher not in entry or key not in entry[matcher]:
                raise KeyError(f"warp results have no {metric!r}; use e.g. dense_nn/pck@8px or mutual_nn/pck@4px")
            points[(name, size)] = float(entry[matcher][key])
        return f"warp {metric}", points
    raise KeyError(f"not a spair or warp result (eval={kind!r})")
