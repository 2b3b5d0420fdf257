#!/usr/bin/env bash
# System packages the test suite drives for real (headless Chromium for the upload page). Idempotent.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup-test-deps] installing Debian chromium (headless browser tests)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup-test-deps] chromium not found and cannot be installed here; browser tests will fail" >&2
  fi
fi
# The upload-page test drives Chromium over the DevTools protocol with `websockets` (normally already present via
# ray[serve] -> uvicorn[standard]); install it with the pinned constraints if a venv lacks it.
PY="${VENV_PY:-.venv/bin/python}"
if [ -x "$PY" ] && ! "$PY" -c "import websockets" >/dev/null 2>&1; then
  echo "[setup-test-deps] installing websockets (DevTools client for the upload-page test)"
  "$PY" -m pip install -q -c constraints.txt websockets
fi
