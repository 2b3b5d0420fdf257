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
