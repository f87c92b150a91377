#!/usr/bin/env bash
# Build the frozen heidi executable: dist/heidi (one file; HEIDI_ONEDIR=1 adds dist/heidi-dir/).
# Needs heidi installed with its compiled modules and PyInstaller (pip install -e '.[freeze]').
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
# Absolute, but not through symlinks: a venv's python is a link out of the venv.
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")";; esac
export PYTHONHASHSEED=0   # reproducible builds
# Run from packaging/ so the analysis imports the installed heidi (with its .so files).
"$PYTHON" -m PyInstaller --version >/dev/null
(cd packaging && "$PYTHON" -m PyInstaller --clean --noconfirm --log-level WARN \
    --distpath "$root/dist" --workpath "$root/build/pyinstaller" heidi.spec)
"$root/dist/heidi" version --verbose
