#!/usr/bin/env bash
# Build the frozen heidi executable: dist/heidi (one file; HEIDI_ONEDIR=1 adds dist/heidi-dir/).
# Needs heidi installed with its compiled modules and PyInstaller (pip install -e '.[freeze]').
# Prints the newest glibc the binary needs; packaging/build-portable.sh builds one for glibc 2.31.
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
# The oldest glibc the build runs on is the newest GLIBC_ symbol version any bundled ELF needs
# (the one-file binary's embedded files included); packaging/build-portable.sh holds it at 2.31.
targets=("$root/dist/heidi")
case "${HEIDI_ONEDIR:-}" in ""|0) ;; *) targets+=("$root/dist/heidi-dir");; esac
echo "== glibc: $("$PYTHON" "$root/packaging/glibc_check.py" --summary "${targets[@]}")"
