#!/usr/bin/env bash
# Idempotent set-up: system FUSE 3, a project venv (.venv) and the package with its test extras.
# Set HFFS_SKIP_ML=1 to skip torch/transformers (only the from_pretrained tests need them).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "setup: $*" >&2; exit 1; }

if [ ! -e /dev/fuse ]; then
  die "/dev/fuse is missing: run on a host with the fuse kernel module (or start the container with --device /dev/fuse)"
fi

if ! command -v fusermount3 >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q 'libfuse3\.so\.3'; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing fuse3 libfuse3-3 with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq fuse3 libfuse3-3 >/dev/null
  else
    die "FUSE 3 is missing; run: sudo apt-get install -y fuse3 libfuse3-3"
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || die "could not create .venv with $PY (install python3-venv)"
fi
extras="test"
if [ "${HFFS_SKIP_ML:-0}" != "1" ]; then extras="test,ml"; fi
# torch 2.13.0 CPU first (pip's find-links on this machine kind holds that wheel), so that
# transformers does not pull a CUDA build.
if [ "$extras" = "test,ml" ] && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
# Reinstall only when the dependency list changed (the package itself is installed editable).
stamp=".venv/.hffs-setup-$(sha256sum pyproject.toml | cut -c1-16)-${extras/,/-}"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
  rm -f .venv/.hffs-setup-* && touch "$stamp"
fi
echo "setup: ok ($(.venv/bin/python --version), extras: $extras)" >&2
