import subprocess
import sys

from lift_serve import cli as lift_cli


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "lift_serve.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in lift_cli.COMMANDS:
        assert command in result.stdout


def test_every_registered_subcommand_is_implemented():
    parser = lift_cli.build_parser()
    for name, target in lift_cli.COMMANDS.items():
        targets = {name: target} if isinstance(target, str) else target
        for sub, module in targets.items():
            argv = [name, "--help"] if isinstance(target, str) else [name, sub, "--help"]
            try:
                parser.parse_args(argv)
            except SystemExit as exit_:
                assert exit_.code == 0, f"`lift {' '.join(argv)}` failed: {module} missing?"


def test_user_facing_errors_print_without_traceback(capsys):
    class Problem(ValueError):
        user_facing = True

    def boom(_args):
        raise Problem("the bundle is missing; run lift export")

    parser = lift_cli.build_parser
    try:
        lift_cli.build_parser = lambda: _parser_with(boom)
        assert lift_cli.main(["boom"]) == 2
    finally:
        lift_cli.build_parser = parser
    assert "error: the bundle is missing" in capsys.readouterr().err


def _parser_with(run):
    import argparse

    parser = argparse.ArgumentParser(prog="lift")
    sub = parser.add_subparsers()
    sub.add_parser("boom").set_defaults(_run=run)
    return parser


def test_eval_size_zero_or_negative_is_an_error_not_a_traceback(tmp_path, capsys):
    # 0 and -16 pass a bare "multiple of the patch size" test and used to crash deep inside
    # PIL, numpy or torch.
    import json

    import pytest
    from lift_serve.bench.spair import make_synthetic_spair
    from PIL import Image

    from tests.conftest import tiny_spec_dict

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(tmp_path / "images" / "a.png")
    make_synthetic_spair(tmp_path / "spair", pairs_per_category=1)
    backbone = ["--backbone", "vit_tiny_patch16_224", "--backbone-weights", "random",
                "--backbone-kwargs", json.dumps(tiny_spec_dict()["model_kwargs"])]
    commands = {
        "spair": ["eval", "spair", "--root", str(tmp_path / "spair"), "--mode", "backbone"],
        "warp": ["eval", "warp", "--images", str(tmp_path / "images"), "--methods", "backbone", "--pairs", "1"],
        "cka": ["eval", "cka", "--images", str(tmp_path / "images"), "--methods", "backbone"],
    }
    for name, argv in commands.items():
        for size in ("0", "-16"):
            try:
                code = lift_cli.main([*argv, *backbone, "--size", size, "--out", str(tmp_path / f"{name}.json")])
            except Exception as exc:  # noqa: BLE001 - the defect being tested is an escaping exception
                pytest.fail(f"lift eval {name} --size {size} raised {type(exc).__name__}: {exc}")
            assert code == 2
            assert f"error: --size {size} is not a positive multiple of the patch size 16" in capsys.readouterr().err


def test_flops_sizes_and_recon_imsize_must_be_positive(tmp_path, capsys):
    from lift_serve.model.backbone import BackboneSpec, ViTBackbone
    from lift_serve.model.checkpoint import CheckpointMeta, save_lift_checkpoint
    from lift_serve.model.lift import LiFT
    from PIL import Image

    from tests.conftest import tiny_spec_dict

    for sizes in ("0", "-16"):  # used to crash inside torch's flop counter
        assert lift_cli.main(["eval", "flops", "--sizes", sizes, "--no-plot", "--out", str(tmp_path / "f.json")]) == 2
        assert "error: --sizes needs positive integers" in capsys.readouterr().err
    spec = BackboneSpec.from_dict(tiny_spec_dict())
    backbone = ViTBackbone.from_spec(spec)
    checkpoint = save_lift_checkpoint(tmp_path / "lift.safetensors", LiFT(32, 16), CheckpointMeta(
        backbone=spec.to_dict(), channels=32, patch_size=16, mean=list(backbone.mean), std=list(backbone.std)))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    # -64 is a "multiple of 64" and used to fail later with a misleading "none of the images could be decoded"
    argv = ["eval", "recon", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "images"), "--imsize", "-64",
            "--out", str(tmp_path / "r.json")]
    assert lift_cli.main(argv) == 2
    assert "error: --imsize -64 does not fit patch size 16" in capsys.readouterr().err
    for count in ("0", "-1"):  # 0 used to mean every image and -1 all but the last
        argv[argv.index("--imsize") + 1] = "64"
        assert lift_cli.main([*argv, "--max-images", count]) == 2
        assert f"error: --max-images must be >= 1, got {count}" in capsys.readouterr().err


def test_bench_repeats_and_threads_are_checked_before_any_work(tmp_path, capsys):
    # bench export --repeats 0 used to export the demo bundle and time nothing, then crash in min();
    # bench train --threads -1 crashed in torch.set_num_threads.
    assert lift_cli.main(["bench", "export", "--repeats", "0", "--bundle", str(tmp_path / "b"),
                          "--out", str(tmp_path / "e.json")]) == 2
    assert "error: --repeats must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert lift_cli.main(["bench", "train", "--threads", "-1", "--out", str(tmp_path / "t.json")]) == 2
    assert "error: --threads must be >= 1" in capsys.readouterr().err


def test_serve_demo_opens_the_port_before_the_demo_export(tiny_bundle, tmp_path):
    """`lift serve --demo` answers at once: 503 not_ready with Retry-After while the demo bundle is
    exported (here a stand-in exporter that waits for a file), then ready."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    release = tmp_path / "release"
    code = (
        "import time, pathlib, lift_serve.demo as demo\n"
        f"def slow_export(demo_dir):\n"
        f"    while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.05)\n"
        f"    return pathlib.Path({str(tiny_bundle)!r})\n"
        "demo.export_demo = slow_export\n"
        "from lift_serve import cli\n"
        f"raise SystemExit(cli.main(['serve', '--demo', '--port', '{port}', '--demo-dir', {str(tmp_path)!r}]))\n"
    )
    env = {**os.environ, "LIFT_PROVIDERS": "cpu"}
    server = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        url, deadline, answer = f"http://127.0.0.1:{port}", time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline:
            try:
                answer = httpx.get(f"{url}/readyz", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
        assert answer is not None, "the port never opened"
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
        assert answer.headers["retry-after"] == "2"
        release.touch()
        while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    assert "DEMO BUNDLE" in output and "Traceback" not in output


def test_third_party_info_logs_are_quiet_unless_debug():
    import logging

    from lift_serve.serve_cli import quiet_third_party_logs

    logging.getLogger("onnxscript").setLevel(logging.NOTSET)
    quiet_third_party_logs("info")
    assert not logging.getLogger("onnxscript").isEnabledFor(logging.INFO)
    assert not logging.getLogger("onnx_ir.passes").isEnabledFor(logging.INFO)
    logging.getLogger("onnxscript").setLevel(logging.NOTSET)
    quiet_third_party_logs("debug")
    assert logging.getLogger("onnxscript").level == logging.NOTSET  # debug: left as it is
