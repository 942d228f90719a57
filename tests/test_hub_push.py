"""``lift push`` / :func:`lift_serve.hub.push.push_bundle` against a loopback stand-in for the Hub.

The real huggingface_hub client runs unchanged; only its endpoint is a local HTTP server that
records every request and answers what the client needs for a commit of regular (inline, base64)
files: repository creation, README metadata validation, the preupload query (every file "regular":
no LFS, no Xet), branch creation, and the NDJSON commit, which the server decodes. What this does not
show: real uploads to huggingface.co, LFS/Xet large-file uploads, private-organisation permissions.
"""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = "acme/tiny-lift"
COMMIT_OID = "c" * 40
MAX_BODY = 64 << 20  # bounded: the tiny bundle is well under a megabyte


class FakeHub:
    """A threaded loopback HTTP server answering as the Hub's API does; ``fail_status`` answers every
    request with that status instead."""

    def __init__(self, fail_status: int | None = None):
        self.requests: list[dict] = []
        self.fail_status = fail_status
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hold a handler thread for long

            def do_GET(self):
                hub.answer(self)

            def do_POST(self):
                hub.answer(self)

            def do_PUT(self):
                hub.answer(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False  # server_close() joins the handler threads
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       name="fake-hub", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    @staticmethod
    def _body(handler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(handler.rfile.readline().strip(), 16)
                if size == 0:
                    handler.rfile.readline()
                    return body
                body += handler.rfile.read(size)
                handler.rfile.readline()
                assert len(body) <= MAX_BODY
        length = int(handler.headers.get("Content-Length") or 0)
        assert length <= MAX_BODY
        return handler.rfile.read(length)

    def answer(self, handler) -> None:
        url = urlsplit(handler.path)
        body = self._body(handler)
        self.requests.append({"method": handler.command, "path": url.path, "query": url.query,
                              "headers": {k.lower(): v for k, v in handler.headers.items()}, "body": body})
        status, payload = self.route(handler.command, url.path, body)
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if status >= 400:
            handler.send_header("X-Error-Message", payload["error"])
        handler.end_headers()
        handler.wfile.write(data)

    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if self.fail_status is not None:
            return self.fail_status, {"error": "Invalid credentials in Authorization header"}
        prefix = f"/api/models/{REPO}/"
        if (method, path) == ("POST", "/api/repos/create"):
            request = json.loads(body)
            return 200, {"url": f"{self.url}/{request['organization']}/{request['name']}"}
        if (method, path) == ("POST", "/api/validate-yaml"):
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and path.startswith(prefix + "preupload/"):
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if method == "POST" and path.startswith(prefix + "branch/"):
            return 200, {}
        if method == "POST" and path.startswith(prefix + "commit/"):
            return 200, {"commitUrl": f"{self.url}/{REPO}/commit/{COMMIT_OID}", "commitOid": COMMIT_OID,
                         "pullRequestUrl": None}
        return 404, {"error": f"the fake Hub does not know {method} {path}"}

    def paths(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def committed(self) -> tuple[dict, dict[str, bytes]]:
        """The commit's header and its files (path -> bytes), decoded from the NDJSON body."""
        (commit,) = [r for r in self.requests if "/commit/" in r["path"]]
        assert commit["headers"]["content-type"] == "application/x-ndjson"
        header, files = None, {}
        for line in commit["body"].splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            else:
                assert item["key"] == "file", f"only inline files expected, got {item['key']}"
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return header, files


@pytest.fixture()
def hub_env(tmp_path, monkeypatch):
    """huggingface_hub pointed at nothing real: no telemetry, no Xet, not offline, no stored token."""
    from huggingface_hub import constants

    for name in ("HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_XET"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(constants, name, True)  # read when huggingface_hub was imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                 "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    threads_before = set(threading.enumerate())
    yield constants
    left = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not left, f"threads left running: {left}"


def _bundle_files(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in bundle.iterdir()}


def test_push_sends_every_bundle_file_and_a_card_in_one_commit(hub_env, tiny_bundle, capsys):
    from lift_serve.hub.push import push_bundle

    before = _bundle_files(tiny_bundle)
    with FakeHub() as hub:
        url = push_bundle(tiny_bundle, REPO, private=True, token="hf_test", endpoint=hub.url)
    assert url == f"{hub.url}/{REPO}/commit/{COMMIT_OID}"
    # What the client asked for, in order: nothing else (no telemetry, no Xet token, no LFS batch).
    assert hub.paths() == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                           ("POST", f"/api/models/{REPO}/preupload/main"), ("POST", f"/api/models/{REPO}/commit/main")]
    assert all(r["headers"]["authorization"] == "Bearer hf_test" for r in hub.requests)
    created = json.loads(hub.requests[0]["body"])
    assert created["organization"] == "acme" and created["name"] == "tiny-lift"
    assert created["visibility"] == "private"

    header, files = hub.committed()
    assert header["summary"].startswith("lift-serve bundle: vit_tiny_patch16_224 + lift")
    assert set(files) == set(before) | {"README.md"}
    for name, data in before.items():
        assert files[name] == data, f"{name} differs from the bundle's"
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: lift-serve\n")
    assert "vit_tiny_patch16_224" in card
    assert "| graph | iterations | size | batch | max_abs_err | min_cosine |" in card
    assert "| chain | 1 | 64x96 | 2 |" in card
    assert f"lift serve --bundle hf://{REPO}" in card
    assert "Random (untrained) backbone weights (seed 7)" in card
    # The card went up from memory: the bundle directory is as it was.
    assert _bundle_files(tiny_bundle) == before
    out = capsys.readouterr().out
    assert "backbone.onnx" in out and "README.md" in out


def test_card_front_matter_is_yaml_with_the_license_from_the_weights(tiny_bundle):
    import yaml
    from lift_serve.bundle import read_manifest
    from lift_serve.hub.card import model_card

    manifest = read_manifest(tiny_bundle)

    def front(random=(), **changes) -> dict:
        """The front matter of the tiny bundle's card with other weights: ``random`` lists the
        untrained parts (``random_weights``), None keeps the tiny bundle's."""
        backbone = manifest.backbone.model_copy(update=changes.pop("backbone", {}))
        upsampler = manifest.upsampler.model_copy(update=changes.pop("upsampler", {}))
        update = {"backbone": backbone, "upsampler": upsampler}
        if random is not None:
            update["random_weights"] = list(random)
        card = model_card(manifest.model_copy(update=update), REPO)
        return yaml.safe_load(card.split("---\n")[1])

    meta = front(random=None)
    assert meta["library_name"] == "lift-serve"
    assert meta["tags"] == ["dense-features", "onnx", "vit", "lift"]
    assert meta["license"] == "other"  # random backbone, LiFT untrained or ours: never a guessed license
    assert front()["license"] == "other"  # random backbone + our trained LiFT: the publisher decides
    dinov2 = {"timm_name": "vit_small_patch14_dinov2.lvd142m", "weights": "hub"}
    assert front(backbone=dinov2, upsampler={"kind": "uplift", "checkpoint_format": "authors"})["license"] == "other"
    assert front(backbone=dinov2, upsampler={"checkpoint_sha256": None})["license"] == "apache-2.0"
    dino = {"timm_name": "vit_small_patch16_224.dino", "weights": "/w/dino_deitsmall16_pretrain.pth"}
    assert front(backbone=dino, upsampler={"checkpoint_sha256": None})["license"] == "apache-2.0"
    assert front(backbone={**dino, "weights": "/w/my_weights.pth"}, upsampler={"checkpoint_sha256": None})[
        "license"] == "other"
    assert front(backbone={"weights": "random"}, upsampler={"kind": "uplift", "checkpoint_format": "authors"})[
        "license"] == "mit"
    assert front(random=["upsampler"], backbone=dinov2)["license"] == "apache-2.0"
    dinov3 = front(backbone={"timm_name": "vit_small_plus_patch16_dinov3.lvd1689m", "weights": "hub"},
                   upsampler={"kind": "uplift", "checkpoint_format": "authors"})
    assert dinov3["license"] == "other" and dinov3["license_name"] == "dinov3-license"
    assert dinov3["license_link"] == "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"


def test_a_branch_is_created_for_a_revision(hub_env, tiny_bundle, capsys):
    from lift_serve.hub.push import push_bundle

    with FakeHub() as hub:
        push_bundle(tiny_bundle, REPO, revision="fp32", token="hf_test", commit_message="tiny", endpoint=hub.url)
    assert ("POST", f"/api/models/{REPO}/branch/fp32") in hub.paths()
    assert ("POST", f"/api/models/{REPO}/commit/fp32") in hub.paths()
    assert json.loads(hub.requests[0]["body"])["visibility"] == "public"
    assert hub.committed()[0]["summary"] == "tiny"


def test_a_tampered_bundle_is_refused_before_any_request(hub_env, tiny_bundle, tmp_path):
    from lift_serve.hub.push import PushError, push_bundle

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    data = bytearray((bundle / "upsampler_step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "upsampler_step.onnx").write_bytes(bytes(data))
    with FakeHub() as hub:
        with pytest.raises(PushError, match="upsampler_step.onnx has sha256 .* but the manifest records"):
            push_bundle(bundle, REPO, token="hf_test", endpoint=hub.url)
        (bundle / "backbone.onnx").unlink()
        with pytest.raises(PushError, match="backbone graph backbone.onnx listed in the manifest is missing"):
            push_bundle(bundle, REPO, token="hf_test", endpoint=hub.url)
        with pytest.raises(PushError, match="is not ORG/NAME"):
            push_bundle(tiny_bundle, "tiny-lift", token="hf_test", endpoint=hub.url)
        with pytest.raises(PushError, match="does not exist"):
            push_bundle(tmp_path / "nowhere", REPO, token="hf_test", endpoint=hub.url)
    assert hub.requests == []


def test_a_401_names_the_repository_and_the_token(hub_env, tiny_bundle, capsys):
    from lift_serve.hub.push import PushError, push_bundle

    with FakeHub(fail_status=401) as hub:
        with pytest.raises(PushError) as refused:
            push_bundle(tiny_bundle, REPO, token="hf_wrong", endpoint=hub.url)
    message = str(refused.value)
    assert REPO in message and "HTTP 401" in message
    assert "HF_TOKEN" in message and "hf auth login" in message
    assert refused.value.user_facing
    assert not any("/commit/" in path for _, path in hub.paths())


def test_an_unreachable_hub_is_a_clear_error(hub_env, tiny_bundle, capsys):
    import socket

    from lift_serve.hub.push import PushError, push_bundle

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PushError, match=f"cannot reach the Hub at http://127.0.0.1:{port} to publish {REPO}"):
        push_bundle(tiny_bundle, REPO, token="hf_test", endpoint=f"http://127.0.0.1:{port}")


def test_lift_push_command(hub_env, tiny_bundle, monkeypatch, capsys):
    from lift_serve.cli import main

    with FakeHub() as hub:
        monkeypatch.setattr(hub_env, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets when huggingface_hub is imported
        monkeypatch.setenv("HF_TOKEN", "hf_from_env")
        assert main(["push", str(tiny_bundle), REPO, "--private", "--message", "from the CLI"]) == 0
    assert f"{hub.url}/{REPO}/commit/{COMMIT_OID}" in capsys.readouterr().out
    assert json.loads(hub.requests[0]["body"])["visibility"] == "private"
    assert all(r["headers"]["authorization"] == "Bearer hf_from_env" for r in hub.requests)
    header, files = hub.committed()
    assert header["summary"] == "from the CLI" and set(files) == set(_bundle_files(tiny_bundle)) | {"README.md"}

    with FakeHub(fail_status=401) as hub:
        monkeypatch.setattr(hub_env, "ENDPOINT", hub.url)
        assert main(["push", str(tiny_bundle), REPO]) == 2
    err = capsys.readouterr().err
    assert f"error: the Hub refused the credentials for {REPO} (HTTP 401)" in err and "Traceback" not in err
    assert main(["push", str(tiny_bundle), "not a repo"]) == 2
    assert "is not ORG/NAME" in capsys.readouterr().err


def test_lift_export_push_to_hub(hub_env, tiny_bundle, tmp_path, monkeypatch, capsys):
    """``lift export --push-to-hub`` publishes the bundle it wrote (the export itself is stood in by a
    copy of the tiny bundle: what is tested is the hand-over to the push)."""
    import lift_serve.model.export as export

    from lift_serve.cli import main

    def fake_export(out_dir, *args, **kwargs):
        shutil.copytree(tiny_bundle, out_dir, dirs_exist_ok=True)
        return Path(out_dir)

    monkeypatch.setattr(export, "export_bundle", fake_export)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    out = tmp_path / "exported"
    argv = ["export", "--out", str(out), "--lift-iterations", "0,1", "--push-to-hub", REPO]
    with FakeHub() as hub:
        monkeypatch.setattr(hub_env, "ENDPOINT", hub.url)
        assert main([*argv, "--private"]) == 0
    assert json.loads(hub.requests[0]["body"])["visibility"] == "private"
    assert set(hub.committed()[1]) == set(_bundle_files(tiny_bundle)) | {"README.md"}
    assert f"published: {hub.url}/{REPO}/commit/{COMMIT_OID}" in capsys.readouterr().out

    with FakeHub(fail_status=401) as hub:
        monkeypatch.setattr(hub_env, "ENDPOINT", hub.url)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and f"The bundle itself is written at {out}: publish it later with `lift push" in err
