#!/usr/bin/env bash
# Create ./.venv (if missing) and install sslctl into it with what the tests need.
# torch/torchvision: installed as torch==2.14.1 torchvision==0.29.1 only when the venv has no
# torch yet, so a venv made with your own CUDA build keeps it (SSLCTL_TORCH overrides the pins).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SSLCTL_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing ${SSLCTL_TORCH:-torch==2.14.1 torchvision==0.29.1} into $VENV" >&2
  # shellcheck disable=SC2086
  pip install ${SSLCTL_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
pip install -e ".[test]"
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
