"""`lift eval flops`: the paper's FLOPs relation on a random-weight ViT-S/16 (meta tensors)."""

from __future__ import annotations

import json

import pytest
from lift_serve.bench.eval_common import Method
from lift_serve.bench.flops import FLOPS_SPEC, flops_table


@pytest.fixture(scope="module")
def vit_s_rows():
    methods = [Method("backbone"), Method("bilinear", 1), Method("lift", 1), Method("lift", 2)]
    return {r["method"]: r for r in flops_table(FLOPS_SPEC, methods, [224])}


def test_vit_s_and_lift_flops_match_the_paper(vit_s_rows):
    backbone, lift = vit_s_rows["backbone"], vit_s_rows["lift:1"]
    assert 4.3 <= backbone["gmacs"] <= 4.6  # paper: 4.34 GFLOPs (multiply-adds)
    assert backbone["flops"] == 2 * backbone["macs"]
    assert lift["params_lift"] == 1_187_280  # paper: 1.2 M
    assert backbone["params_backbone"] == pytest.approx(21.7e6, rel=0.01)
    # paper: +LiFT 5.30 GFLOPs = +22 %, counting the transposed conv per output pixel (thop convention)
    assert 0.20 <= lift["added_vs_backbone_thop"] <= 0.25
    assert lift["gmacs_thop"] == pytest.approx(5.30, abs=0.1)
    # the exact count is lower by 3/4 of the 2x2 stride-2 transposed conv: 196 px * 416 * 208 * 4 * 3
    assert (lift["gmacs_thop"] - lift["gmacs"]) * 1e9 == pytest.approx(196 * 416 * 208 * 4 * 3)
    assert 0.15 <= lift["added_vs_backbone"] < lift["added_vs_backbone_thop"]
    assert vit_s_rows["bilinear:1"]["gmacs"] == backbone["gmacs"]
    assert vit_s_rows["lift:2"]["gmacs"] > lift["gmacs"] and vit_s_rows["lift:2"]["output_grid"] == [56, 56]


def test_cli_puts_pck_next_to_flops(tmp_path, capsys):
    from lift_serve.cli import main

    pck = tmp_path / "spair.json"
    pck.write_text(json.dumps({"eval": "spair", "config": {"method": "lift:1", "size": 224},
                               "results": {"overall": {"pck@0.1": 28.5}}}))
    out = tmp_path / "flops.json"
    assert main(["eval", "flops", "--sizes", "224", "--methods", "backbone,lift:1", "--pck", str(pck),
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["method"] == "lift:1" and rows[1]["pck"] == {"SPair pck@0.1": 28.5}
    assert "pck" not in rows[0]
    assert "| LiFT | 224 |" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main(["eval", "flops", "--sizes", "100", "--out", str(out)]) == 2
