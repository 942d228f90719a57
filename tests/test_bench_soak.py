"""The soak benchmark end to end on the tiny bundle (a real `lift serve` subprocess, short
deadlines so that the half-sent requests are closed within the run), the decode and the upsampler benchmarks."""

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


def test_the_decode_benchmark_measures_both_approaches(tmp_path):
    """`lift bench decode` at a small size: every accepted format decodes within the limits, the
    refused scan bomb is reported as refused, and the process-pool figures are filled in."""
    out = tmp_path / "decode.json"
    assert cli.main(["bench", "decode", "--max-pixels", "40000", "--repeats", "1", "--pool-requests", "2",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {row["file"]: row for row in result["decode"]["rows"]}
    assert any("refused: 413 too_many_scans" in name for name in rows)
    assert {"JPEG baseline", "PNG", "WEBP", "GIF", "BMP"} <= set(rows)
    assert all(row["decode_s"] > 0 for row in rows.values())
    pool = result["pool"]
    assert len(pool["rows"]) == 2 and all(r["thread_ms"] > 0 and r["pool_ms"] > 0 for r in pool["rows"])
    assert pool["kill_and_respawn_s"] > 0 and all(rss > 0 for rss in pool["worker_rss_mb"])


def test_the_upsampler_benchmark_times_every_case(tmp_path):
    out = tmp_path / "upsamplers.json"
    assert cli.main(["bench", "upsamplers", "--sizes", "32", "--repeats", "1", "--out", str(out)]) == 0
    rows = {row["case"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"backbone", "bilinear pixel-dense", "LiFT 2x", "LiFT pixel-dense", "UPLiFT 2x",
                         "UPLiFT pixel-dense", "resample to stride 1"}
    assert rows["LiFT 2x"]["ratio_to_lift_2x"] == 1.0 and all(r["median_ms"] > 0 for r in rows.values())
    pixel_dense_mb = 384 * 32 * 32 * 4 / 2**20  # [1, 384, 32, 32] float32: the image's own pixels
    assert rows["UPLiFT pixel-dense"]["output_mb"] == rows["bilinear pixel-dense"]["output_mb"] == pixel_dense_mb
    assert rows["resample to stride 1"]["output_mb"] == pixel_dense_mb


def test_benchmarks_run_in_process_leave_torch_as_they_found_it(tmp_path):
    import torch

    threads = torch.get_num_threads()
    assert cli.main(["bench", "upsamplers", "--sizes", "32", "--repeats", "1", "--threads", "1",
                     "--out", str(tmp_path / "u.json")]) == 0
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads
