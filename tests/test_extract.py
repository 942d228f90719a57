"""`lift extract`: a folder of images to feature files through the runtime, resumable, bad files listed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from service_helpers import noise

from lift_serve import cli


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    pictures = [("a.png", (64, 64), 1), ("nested/b.jpg", (48, 80), 2), ("nested/deeper/c.png", (64, 96), 3)]
    for name, (h, w), seed in pictures:
        Image.fromarray(noise(h, w, seed=seed)).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image, and not a picture suffix: ignored")
    (root / "fake.jpg").write_text("a text file named .jpg")
    return root


def _expected(runtime, path, k=1):
    from lift_serve.service.codec import decode_image, read_header
    from lift_serve.service.geometry import ImageGeometry

    data = path.read_bytes()
    header = read_header(data, 40_000_000)
    geometry = ImageGeometry.plan(header.width, header.height, runtime.sizes, "square", runtime.patch_size)
    return runtime.run(geometry.prepare(decode_image(data, 40_000_000))[None], k)[0]


def test_extract_writes_one_npy_per_image_and_lists_the_bad_ones(folder, tmp_path, tiny_bundle, runtime, capsys):
    out = tmp_path / "out"
    argv = ["extract", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out), "--providers", "cpu",
            "--dtype", "float32", "--batch-size", "2"]
    assert cli.main(argv) == 0
    assert "3 written, 0 already done, 2 skipped" in capsys.readouterr().out
    for rel in ("a.png", "nested/b.jpg", "nested/deeper/c.png"):
        saved = np.load(out / f"{rel}.npy")
        np.testing.assert_allclose(saved, _expected(runtime, folder / rel), rtol=1e-5, atol=1e-5)
    index = {r["file"]: r for r in map(json.loads, (out / "index.jsonl").read_text().splitlines())}
    assert sorted(index) == ["a.png", "nested/b.jpg", "nested/deeper/c.png"]
    assert index["nested/deeper/c.png"]["shape"] == [32, 8, 12] and index["a.png"]["stride"] == 8.0
    assert index["nested/b.jpg"]["image_size"] == [80, 48]
    errors = {r["file"]: r["error"] for r in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["broken.png", "fake.jpg"] and all(errors.values())

    # Resumed: nothing done twice; a new image is the only one computed.
    before = (out / "a.png.npy").stat().st_mtime_ns
    Image.fromarray(noise(64, 64, seed=9)).save(folder / "new.png")
    assert cli.main(argv) == 0
    assert "1 written, 3 already done, 2 skipped" in capsys.readouterr().out
    assert (out / "a.png.npy").stat().st_mtime_ns == before and (out / "new.png.npy").is_file()

    # Other settings into the same folder are refused, naming them.
    assert cli.main([*argv[:-4], "--dtype", "float16"]) == 2
    assert "other settings (dtype)" in capsys.readouterr().err


def test_extract_into_safetensors_shards_at_a_stride(folder, tmp_path, tiny_bundle, runtime):
    from lift_serve.service.resample import resample_features
    from safetensors.numpy import load_file

    (folder / "nested" / "b.jpg").unlink()  # only 64x64 inputs: stride 12.8 gives whole cells there
    (folder / "nested" / "deeper" / "c.png").unlink()
    Image.fromarray(noise(64, 64, seed=5)).save(folder / "d.png")
    Image.fromarray(noise(64, 64, seed=6)).save(folder / "e.png")
    out = tmp_path / "shards"
    assert cli.main(["extract", "--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out),
                     "--providers", "cpu", "--format", "safetensors", "--shard-size", "2", "--stride", "12.8",
                     "--dtype", "float32"]) == 0
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in index) == ["a.png", "d.png", "e.png"]
    assert sorted({r["output"] for r in index}) == ["features-00000.safetensors", "features-00001.safetensors"]
    for record in index:
        tensor = load_file(out / record["output"])[record["key"]]
        assert tensor.shape == (32, 5, 5) and record["stride"] == 12.8
        expected = resample_features(_expected(runtime, folder / record["file"]), 5, 5)
        np.testing.assert_allclose(tensor, expected, rtol=1e-5, atol=1e-5)


def test_an_interrupted_run_resumes_to_the_same_files(folder, tmp_path, tiny_bundle, runtime, monkeypatch):
    """Stopped after its first batch (the runtime fails), then resumed: the same files, byte for byte,
    as one uninterrupted run."""
    from lift_serve.service.extract import ExtractOptions, Extractor

    options = ExtractOptions(dtype="float32", batch_size=1)
    whole = tmp_path / "whole"
    Extractor(runtime, folder, whole, options, "b").run()

    calls = {"n": 0}
    real = runtime.run

    def failing(images, k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("stopped")
        return real(images, k)

    monkeypatch.setattr(runtime, "run", failing)
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        Extractor(runtime, folder, stopped, options, "b").run()
    assert len((stopped / "index.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(runtime, "run", real)
    counts = Extractor(runtime, folder, stopped, options, "b").run()
    assert counts["skipped_done"] == 1 and counts["written"] == 2
    for rel in ("a.png", "nested/b.jpg", "nested/deeper/c.png"):
        assert (stopped / f"{rel}.npy").read_bytes() == (whole / f"{rel}.npy").read_bytes()
    ordered = sorted((whole / "index.jsonl").read_text().splitlines())
    assert sorted((stopped / "index.jsonl").read_text().splitlines()) == ordered


def test_the_extract_benchmark_reports_a_ratio_to_the_raw_runtime(tmp_path, tiny_bundle):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "extract", "--bundle", str(tiny_bundle), "--images", "4", "--side", "96",
                     "--batch-size", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["raw_images_per_s"] > 0 and result["extract_images_per_s"] > 0
    assert result["ratio_to_raw"] == pytest.approx(result["extract_images_per_s"] / result["raw_images_per_s"])
