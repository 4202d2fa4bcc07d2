#!/usr/bin/env bash
# Create benchmarks/saedashboard/.venv with SAEDashboard 0.8 and a CPU torch, for run_saedashboard.py.
#
# Idempotent: an existing venv is reused and pip only installs what is missing.
# Environment: PYTHON (interpreter for the venv, default python3), WHEELS (folder holding the torch wheel,
# default /opt/wheels; when it is missing the pinned torch comes from PyPI, which is the CUDA build on Linux).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
wheels="${WHEELS:-/opt/wheels}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
find_links=()
if [ -d "$wheels" ]; then
    find_links=(--find-links "$wheels")
fi

# torch first, from the local wheel folder, so that the constrained resolve below finds it already satisfied.
"${pip[@]}" "${find_links[@]}" -c "$here/constraints.txt" torch
"${pip[@]}" "${find_links[@]}" -c "$here/constraints.txt" "sae-dashboard==0.8.*" "pyarrow<21"

# decode-clt (a dependency of sae-dashboard) pulls torchvision and torchaudio from PyPI, built against the CUDA
# torch: with the CPU torch, importing torchvision fails ("operator torchvision::nms does not exist"), and
# transformers' lazy imports then fail too. Nothing the dashboard runs needs them, so they are removed.
"$venv/bin/python" -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio 2>/dev/null || true

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("sae-dashboard", "sae-lens", "transformer-lens", "torch", "pyarrow"):
    print(f"{name}=={md.version(name)}")
PY
