"""`lift train`, `lift eval recon` and `lift bench train` on a tiny random ViT and generated images.

The images have structure (smooth colour gradients with filled shapes) so that there is something
to learn: LiFT has to reproduce the backbone's denser features from edges it can see in x/2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lift_serve.training.trainer import TrainConfig, TrainError, train
from PIL import Image, ImageDraw

from lift_serve import cli as lift_cli
from tests.conftest import tiny_spec_dict

TINY_ARGS = ["--backbone", "vit_tiny_patch16_224", "--backbone-weights", "random", "--seed", "7",
             "--backbone-kwargs", json.dumps(tiny_spec_dict()["model_kwargs"])]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run this module with one intra-op thread: on a CPU shared with other jobs, OpenMP's
    multi-thread barriers make these tiny tensors orders of magnitude slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_images(folder: Path, count: int, seed: int, suffixes=(".png", ".JPG")) -> list[Path]:
    """Write ``count`` structured RGB images of 96-160 px (non-square ones too) into ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(96, 161, 2))
        yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
        coefficients = rng.random((3, 3))
        pixels = np.stack([c[0] + c[1] * xx + c[2] * yy for c in coefficients], -1)
        image = Image.fromarray((pixels / pixels.max() * 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = rng.integers(0, min(width, height), 2)
            radius = int(rng.integers(8, min(width, height) // 2))
            box = [x0 - radius, y0 - radius, x0 + radius, y0 + radius]
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        path = folder / f"{'ab'[i % 2]}" / f"img{i:03d}{suffixes[i % len(suffixes)]}"  # class-folder layout
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), backbone=tiny_spec_dict(), imsize=64, epochs=1, batch_size=4,
                  workers=0, progress=False, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def step_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short real training run: 32 images at 128 px, 50 steps (lr 6e-3 so that few steps suffice)."""
    root = tmp_path_factory.mktemp("train")
    make_images(root / "train", 32, seed=0)
    make_images(root / "held_out", 8, seed=1)
    config = tiny_config(root / "train", root / "run", imsize=128, batch_size=8, epochs=15, max_steps=50, lr=6e-3)
    return root, train(config)


def test_training_lowers_the_loss_and_writes_its_files(trained):
    root, result = trained
    out = root / "run"
    assert result.steps == 50 and result.checkpoint == out / "lift.safetensors"
    assert {p.name for p in out.iterdir()} >= {"lift.safetensors", "lift.json", "resume.pt", "log.jsonl", "loss.png"}
    losses = [r["loss"] for r in step_records(out)]
    assert len(losses) == 50
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses
    record = step_records(out)[-1]
    assert record["lr"] == 6e-3 and record["images_per_s"] > 0
    assert math.isclose(record["loss"], record["loss_x2"] + record["loss_x4"], rel_tol=1e-5)
    meta = json.loads((out / "lift.json").read_text())
    # export rebuilds the same random backbone from this: the spec as resolved when the backbone was
    # built, channel layout and position rule included
    assert meta["backbone"] == tiny_spec_dict() | {"channel_layout": "interleaved", "pos_interpolation": "timm"}
    assert (meta["image_size"], meta["steps"], meta["loss"], meta["channels"]) == (128, 50, "cosine", 32)


def test_trained_checkpoint_rebuilds_through_the_shared_factory(trained):
    from lift_serve.model.factory import build_extractor

    root, result = trained
    extractor = build_extractor(None, result.checkpoint)
    assert extractor(torch.zeros(1, 3, 64, 64)).shape == (1, 32, 8, 8)


def test_eval_recon_reports_lift_below_bilinear_on_held_out_images(trained, capsys):
    root, result = trained
    report = root / "recon.json"
    code = lift_cli.main(["eval", "recon", "--checkpoint", str(result.checkpoint), "--data",
                          str(root / "held_out"), "--out", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lift" in printed and "bilinear" in printed and "nearest" in printed
    scores = json.loads(report.read_text())
    assert scores["images"] == 8 and scores["imsize"] == 128
    assert scores["lift"] < scores["bilinear"] < scores["nearest"], scores
    assert scores["octaves"]["x/2->x"]["lift"] < scores["octaves"]["x/2->x"]["bilinear"], scores
    for method in ("lift", "bilinear", "nearest", "backbone"):
        assert math.isclose(scores[method], sum(o[method] for o in scores["octaves"].values()))
        assert 0 <= scores[method] <= 4


def test_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    make_images(tmp_path / "data", 10, seed=2)
    # 10 images, batch 4: 3 steps per epoch (4, 4, 2); stopping after 4 steps stops inside epoch 2.
    common = dict(epochs=2, augment=True, lr=3e-3)
    whole = train(tiny_config(tmp_path / "data", tmp_path / "whole", **common))
    first = train(tiny_config(tmp_path / "data", tmp_path / "split", max_steps=4, **common))
    assert (first.steps, first.epochs_completed) == (4, 1)
    second = train(tiny_config(tmp_path / "data", tmp_path / "split", **common))
    assert whole.steps == second.steps == 6
    a, b = load_file(str(whole.checkpoint)), load_file(str(second.checkpoint))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-for-bit: data order, jitter and init are seeded
    split_log = step_records(tmp_path / "split")
    assert [r["step"] for r in split_log] == [1, 2, 3, 4, 5, 6]  # no repeated steps after resuming
    assert [r["loss"] for r in split_log] == [r["loss"] for r in step_records(tmp_path / "whole")]
    assert first.losses != whole.losses[:3]  # sanity: the loss moves, so equality above means something

    with pytest.raises(TrainError, match="different settings"):
        train(tiny_config(tmp_path / "data", tmp_path / "split", loss="l1", **common))


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    good = make_images(data, 6, seed=4, suffixes=(".png", ".jpeg", ".WebP", ".bmp"))
    (data / "not_an_image.jpg").write_text("this is text, not a JPEG")
    (data / "empty.PNG").write_bytes(b"")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    noise.save(data / "truncated.png")  # header intact, pixel data cut: fails only when decoded
    raw = (data / "truncated.png").read_bytes()
    (data / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (data / "notes.txt").write_text("ignored")
    assert len(good) == 6
    # 7 header-valid files, batch 4: one epoch = 2 steps and loads every file, the truncated one too;
    # two loader worker processes exercise the multi-worker path.
    result = train(tiny_config(data, tmp_path / "run", workers=2))
    assert result.steps == 2
    assert result.skipped_files == 3
    epoch_record = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][-1]
    assert epoch_record["event"] == "epoch"
    assert (epoch_record["skipped_files"], epoch_record["ignored_files"]) == (3, 1)
    assert json.loads((tmp_path / "run" / "lift.json").read_text())["extra"]["skipped_files"] == 3


def test_missing_or_empty_folder_fails_clearly_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    import lift_serve.training.trainer

    def no_models(*_args, **_kwargs):
        raise AssertionError("a model was built before the data folder was checked")

    monkeypatch.setattr(lift_serve.training.trainer, "build_models", no_models)
    assert lift_cli.main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *TINY_ARGS]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    assert lift_cli.main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *TINY_ARGS]) == 2
    err = capsys.readouterr().err
    assert "error: no readable images" in err and "1 other files" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--imsize", "100"], "multiple of 4x the patch size"),
    (["--imsize", "96"], "must be a multiple of 4x the patch size, 64"),
    (["--imsize", "192", "--backbone", "vit_small_patch14_dinov2"],
     "multiple of 4x the patch size, 56 (e.g. 168 or 224)"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
])
def test_bad_settings_are_refused_with_a_reason(tmp_path, capsys, extra, message):
    make_images(tmp_path / "data", 2, seed=5)
    argv = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--imsize", "64", *TINY_ARGS]
    assert lift_cli.main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_objective_distances_and_downsampling():
    from lift_serve.training.objective import downsample, feature_distance

    a = torch.randn(2, 8, 3, 3)
    assert feature_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distance(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert feature_distance(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)  # cosine ignores scale
    assert feature_distance(a, a + 1, "l1").item() == pytest.approx(1.0)
    assert feature_distance(a, a + 2, "l2").item() == pytest.approx(4.0)
    image = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert torch.equal(downsample(image), image[..., ::2, ::2])
    assert downsample(image, "antialias").shape == (2, 3, 4, 4)
    assert not torch.equal(downsample(image, "antialias"), image[..., ::2, ::2])


def test_a_step_trains_lift_and_leaves_the_backbone_frozen(tiny_backbone):
    from lift_serve.model.extractor import Preprocessing
    from lift_serve.model.lift import LiFT
    from lift_serve.training.objective import TwoOctaveLiFT
    from lift_serve.training.trainer import TrainStep

    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    lift = LiFT(32, 16).train()
    weights = lift.outc.weight.detach().clone()
    running_mean = lift.image_convs_1[1].running_mean.clone()
    step = TrainStep(tiny_backbone, TwoOctaveLiFT(lift), Preprocessing(tiny_backbone.mean, tiny_backbone.std, 16),
                     1e-3, "fp32", "cosine", "stride", torch.device("cpu"))
    loss, term_full, term_half = step(torch.rand(2, 3, 64, 64))
    assert loss.item() == pytest.approx(term_full.item() + term_half.item(), rel=1e-5)
    assert not torch.equal(lift.outc.weight, weights)
    assert not torch.equal(lift.image_convs_1[1].running_mean, running_mean)  # BatchNorm in train mode
    assert not any(m.training for m in tiny_backbone.vit.modules())
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny_backbone.state_dict().items())


def test_bench_train_writes_throughput_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert lift_cli.main(["bench", "train", *TINY_ARGS, "--imsize", "64", "--batch-size", "2", "--steps", "2",
                          "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images_per_s"] > 0 and result["batch_size"] == 2 and result["imsize"] == 64
    assert result["lift_parameters"] > 0 and 0 < result["backbone_share"]
    assert "images/s" in capsys.readouterr().out
    # Left out, the size is the smallest valid one from 224 up: 256 for patch 16 (224 is not a
    # multiple of 4 x 16, which training's x/4 pyramid needs).
    assert lift_cli.main(["bench", "train", *TINY_ARGS, "--batch-size", "1", "--steps", "1", "--warmup", "0",
                          "--out", str(out)]) == 0
    assert json.loads(out.read_text())["imsize"] == 256


def test_torchrun_two_process_gloo_run_writes_one_checkpoint(tmp_path):
    import os
    import subprocess
    import sys

    make_images(tmp_path / "data", 8, seed=6)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lift_serve.cli", "train", "--data", str(tmp_path / "data"), "--out", str(out), "--imsize", "64",
               "--batch-size", "2", "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress",
               *TINY_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(out / "lift.safetensors")]  # only rank 0 reports
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lift.safetensors"]
    meta = json.loads((out / "lift.json").read_text())
    assert meta["extra"]["world_size"] == 2 and meta["steps"] == 2  # 8 images / 2 ranks / batch 2
    records = step_records(out)
    assert [r["step"] for r in records] == [1, 2]  # one writer: no duplicated lines from rank 1


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    make_images(tmp_path / "data", 2, seed=5)
    (tmp_path / "o").write_text("not a folder")
    argv = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--imsize", "64", *TINY_ARGS]
    assert lift_cli.main(argv) == 2  # used to end in a FileExistsError traceback from mkdir
    assert "error: --out" in capsys.readouterr().err
