"""The soak benchmark end to end on the tiny bundle: a real `lift serve` subprocess, short
deadlines so that the half-sent requests are closed within the run."""

from __future__ import annotations

import json

from lift_serve import cli


def test_a_short_soak_serves_good_traffic_and_answers_every_hostile_request(tiny_bundle, tmp_path):
    out = tmp_path / "soak.json"
    env = ["LIFT_MAX_PIXELS=1000000", "LIFT_HEAD_TIMEOUT_S=1", "LIFT_BODY_TIMEOUT_S=1", "LIFT_MAX_IMAGES_PER_REQUEST=4"]
    code = cli.main(["bench", "soak", "--bundle", str(tiny_bundle), "--minutes", "0.15", "--clients", "6",
                     "--hostile-clients", "2", "--idle-requests", "2", "--quiet-s", "1", "--size", "64",
                     "--think-ms", "50", "--baseline-minutes", "0.05",
                     *[f"--server-env={item}" for item in env], "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["server_alive_at_end"]
    assert result["unexpected"] == 0, result["hostile"]
    assert set(result["good"]) == {"good_only", "mixed"}
    for phase, rows in result["good"].items():
        for kind, row in rows.items():
            assert row["served"] > 0 and set(row["statuses"]) == {"200"}, (phase, kind, row)
    hostile = result["hostile"]
    assert set(hostile["scan bomb JPEG"]) == {"413"}
    assert set(hostile["PNG declaring 10^10 pixels"]) == {"413"}
    assert set(hostile["EPS file"]) == {"415"}
    assert set(hostile["lenient parameter x=1_0"]) == {"422"}
    assert set(hostile["half-sent head"]) == {"closed"}
    assert set(hostile["100 KB header"]) == {"431"}
    rss = result["rss_mb"]
    assert 0 < rss["start"] <= rss["peak"]
