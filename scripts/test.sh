#!/usr/bin/env bash
# The test command: install what the tests need, then run the whole suite.
# System packages (headless Chromium + driver for the browser test, docker-compose for the compose
# file validation) are installed with apt when running as root and missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v docker-compose >/dev/null || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system test packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
bash scripts/setup.sh
# Deployment: the Docker images' install steps and resolved requirements (docker/ci-check.sh);
# on full runs only (no arguments), as in CI, since it installs a throwaway venv (~1 min).
if [ $# -eq 0 ]; then
    bash docker/ci-check.sh
fi
.venv/bin/python -m pytest -q "$@"
