#!/usr/bin/env bash
# The deployment checks that need the package index; scripts/test.sh runs this before pytest (the
# offline checks are tests/test_deploy.py). There is no Docker engine in CI, so the images'
# install steps are checked by running the same script the Dockerfile runs:
#   1. the api-cpu image's install, for real, into a throwaway venv, then its verification
#      (no torch, `lift` and `lift serve --help` start without it);
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
