#!/usr/bin/env bash
# Sets up a fresh machine for parashield: the offline datasets (Debian packages, when run as root),
# a virtual environment in .venv, the CPU build of torch, and the package with its extras
# (test, experiments, docs, integrations, bench: the peer packages benchmarks/peers.py compares with).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s dataset-fashion-mnist sword-text-kjv sword-text-sparv >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends dataset-fashion-mnist sword-text-kjv sword-text-sparv >/dev/null
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,experiments,docs,integrations,bench]"
