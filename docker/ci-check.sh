#!/usr/bin/env bash
# The deployment checks that need the package index; scripts/test.sh runs this before pytest (the
# offline checks are tests/test_deploy.py). There is no Docker engine in CI, so the images'
# install steps are checked by running the same script the Dockerfile runs:
#   1. the api-cpu image's install, for real, into a throwaway venv, then its verification
#      (no torch, `lift` and `lift serve --help` start without it);
#      It then serves a tiny bundle (exported with the dev venv's torch) with that venv's
#      `lift serve` on 127.0.0.1 until /readyz answers 200 (docker/healthcheck.py, as the image's
#      HEALTHCHECK does), and stops it;
#   2. the api (onnxruntime-gpu) and export images' requirements, resolved against the pinned
#      constraints without installing (the GPU wheel is 250 MB and torch's CUDA wheels are GBs):
#      the api set must not contain torch, the export set must;
#   3. an nginx binary for tests/test_deploy.py's `nginx -t` of docker/nginx.conf, unpacked from
#      Debian's package into .cache/ci/nginx (not installed as a service, never started).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

echo "== deploy: api-cpu install (docker/install.sh)"
PYTHON="$PYTHON" bash docker/install.sh api-cpu "$scratch/api-cpu"

echo "== deploy: serve a tiny bundle from the api-cpu venv"
.venv/bin/lift export --out "$scratch/bundle" --backbone vit_tiny_patch16_224 --backbone-weights random \
    --backbone-kwargs '{"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}' \
    --lift-iterations 0 --sizes 64 >/dev/null
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# From the scratch directory, so that the venv's installed package is served, not this checkout.
(cd "$scratch" && exec env LIFT_BUNDLE="$scratch/bundle" LIFT_HOST=127.0.0.1 LIFT_PORT="$port" \
    LIFT_PROVIDERS=cpu LIFT_LOG_LEVEL=warning "$scratch/api-cpu/bin/lift" serve) &
server=$!
# (|| true: under set -e a failing command in the trap would become the script's exit status)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$scratch"' EXIT
ready=0
for _ in $(seq 120); do
    if LIFT_PORT="$port" "$scratch/api-cpu/bin/python" docker/healthcheck.py 2>/dev/null; then
        ready=1
        break
    fi
    kill -0 "$server" 2>/dev/null || break
    sleep 0.5
done
kill "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
if [ "$ready" != 1 ]; then
    echo "error: lift serve from the api-cpu venv did not become ready (see its output above)" >&2
    exit 1
fi
echo "api-cpu venv: lift serve answered /readyz 200"

echo "== deploy: api and export requirements (docker/install.sh --dry-run)"
PYTHON="$PYTHON" bash docker/install.sh --dry-run api
PYTHON="$PYTHON" bash docker/install.sh --dry-run export

nginx_dir=.cache/ci/nginx
if ! command -v nginx >/dev/null && [ ! -x "$nginx_dir/usr/sbin/nginx" ] && command -v apt-get >/dev/null; then
    echo "== deploy: unpacking Debian's nginx for the load-balancer config check"
    mkdir -p "$scratch/deb" "$nginx_dir"
    if (cd "$scratch/deb" && apt-get download -qq nginx 2>/dev/null); then
        dpkg -x "$scratch"/deb/nginx_*.deb "$nginx_dir"
    else
        echo "could not download Debian's nginx package; tests/test_deploy.py will say so"
    fi
fi
