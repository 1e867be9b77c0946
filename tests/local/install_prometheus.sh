#!/usr/bin/env bash
# Install a real Prometheus server (Debian package) for tests/local/test_prometheus.py.
# Idempotent: does nothing when a prometheus binary is already on PATH.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_prometheus.sh: prometheus is missing and installing it needs root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: the server binary is all the test needs (no node exporter).
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package's service must not run on its default port next to the tests' own server.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
command -v prometheus >/dev/null
