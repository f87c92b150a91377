#!/usr/bin/env bash
# Build the portable heidi: dist/heidi (one file) and dist/heidi-dir/ whose every ELF needs at most
# GLIBC_2.31, by freezing heidi inside a Debian bullseye root (glibc 2.31) with a CPython 3.11
# compiled there from Debian's source package. Run as root; installs what it needs (debootstrap).
#
#   bash packaging/build-portable.sh            # cold ~15 min on 2 cores, warm ~2 min
#   HEIDI_PORTABLE_DIST=dist-portable bash ...  # write elsewhere than dist/ (dist/ is build.sh's too)
#   bash packaging/build-portable.sh --run-root # make the lean bullseye root, print its path
#
# Cached under $HEIDI_PORTABLE_CACHE (default /var/cache/heidi-portable), each step keyed by its
# inputs and reused while the key matches: the bullseye build root (suite + package list), the
# CPython built in it (source package + configure flags), the freeze venv (pinned versions), and
# the lean bullseye root that .ci/run smoke-tests the binary in (packaging/ci-portable.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${HEIDI_PORTABLE_CACHE:-/var/cache/heidi-portable}"
DIST="${HEIDI_PORTABLE_DIST:-$root/dist}"
case "$DIST" in /*) ;; *) DIST="$root/$DIST";; esac
SUITE=bullseye            # glibc 2.31: Ubuntu 20.04, Debian 11 and everything newer
PY_SOURCE=python3.11      # Debian's source package (bookworm's pool), built with bullseye's gcc
PY_PREFIX=/opt/heidi-python
PY_CONFIGURE="--prefix=$PY_PREFIX --enable-shared --with-ensurepip=install LDFLAGS=-Wl,-rpath,$PY_PREFIX/lib"
# The freeze toolchain, pinned so the cache key (and the binary) changes only when this line does.
FREEZE_PINS="pyinstaller==6.22.3 pyinstaller-hooks-contrib==2026.9 Cython==3.3.1 orjson==3.13.0 psutil==7.2.2 setuptools==80.9.0 wheel==0.45.1"
BUILD_PKGS="build-essential,dpkg-dev,ca-certificates,libffi-dev,zlib1g-dev,libssl-dev,libbz2-dev,liblzma-dev,libsqlite3-dev,uuid-dev,xz-utils,binutils"
RUN_PKGS="python3,ca-certificates"   # the example pipeline's stages run `python3`

log() { echo "== portable: $*" >&2; }
die() { echo "build-portable.sh: $*" >&2; exit 1; }
key() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot); accepted: root"
[ "$(uname -m)" = x86_64 ] || die "builds x86_64 only, this machine is $(uname -m)"

# The Debian mirror this host's apt already uses (no mirror is written into the project).
host_mirror() {
  local uris
  uris=$( { grep -hE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
              | awk '{for (i = 2; i <= NF; i++) print $i}';
            grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
              2>/dev/null | sed -E 's/\[[^]]*\]//' | awk '{print $2}'; } | sed 's:/*$::')
  echo "$uris" | grep -E '/debian$' | head -1
}
MIRROR="${HEIDI_DEBIAN_MIRROR:-$(host_mirror)}"
[ -n "$MIRROR" ] || die "no Debian mirror in this host's apt sources; set HEIDI_DEBIAN_MIRROR"

if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null \
    || die "cannot install debootstrap with apt-get"
fi
mkdir -p "$CACHE/debs"
exec 9>"$CACHE/.lock"
flock 9   # one build at a time per cache

MOUNTED=()
cleanup() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTED[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_into() {  # bind the host's /proc and /dev into a root for the length of this script
  local r="$1" d
  for d in proc dev; do
    if ! mountpoint -q "$r/$d"; then
      mount --bind "/$d" "$r/$d" || die "cannot bind-mount /$d into $r"
      MOUNTED+=("$r/$d")
    fi
  done
  cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
  # pip in the root trusts what the host trusts (a site's own CA, for one).
  local ca="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
  [ -f "$ca" ] || ca="$r/etc/ssl/certs/ca-certificates.crt"
  cp -L "$ca" "$r/etc/ssl/certs/heidi-host-ca.crt"
}
in_root() {  # run a shell script in a root with a clean environment
  local r="$1"; shift
  chroot "$r" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 PIP_CERT=/etc/ssl/certs/heidi-host-ca.crt /bin/bash -euo pipefail -c "$*"
}
# Delete old roots, never through a mount left inside one (a killed build's bind of /dev).
drop_roots() {
  local r m
  for r in "$@"; do
    [ -e "$r" ] || continue
    for m in $(awk -v r="$r/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
      umount -l "$m" || die "cannot unmount $m; not deleting $r"
    done
    rm -rf --one-file-system "$r"
  done
}
# A bullseye root made by debootstrap; $1 name, $2 variant, $3 packages. Echoes its path.
make_root() {
  local name="$1" variant="$2" pkgs="$3" k dir
  k=$(key "$SUITE" "$variant" "$pkgs" v1)
  dir="$CACHE/$name-$SUITE-$k"
  if [ ! -e "$dir/.heidi-ready" ]; then
    log "debootstrap $SUITE ($name) into $dir"
    drop_roots "$CACHE/$name-$SUITE-"*
    debootstrap --variant="$variant" --include="$pkgs" --cache-dir="$CACHE/debs" \
      "$SUITE" "$dir" "$MIRROR" >"$CACHE/$name.debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/$name.debootstrap.log" >&2; die "debootstrap of $SUITE failed (log: $CACHE/$name.debootstrap.log)"; }
    {
      echo "deb $MIRROR $SUITE main"
      echo "deb $MIRROR $SUITE-updates main"
    } >"$dir/etc/apt/sources.list"
    touch "$dir/.heidi-ready"
  fi
  echo "$dir"
}

# --run-root: make (or reuse) the lean bullseye root the smoke test runs in, print its path.
if [ "${1:-}" = --run-root ]; then
  make_root run minbase "$RUN_PKGS"
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument '$1'; accepted: none, or --run-root"

t0=$(date +%s)
BROOT=$(make_root build buildd "$BUILD_PKGS")
mount_into "$BROOT"

# CPython 3.11 from Debian's source package (bookworm's pool: bullseye has only 3.9), upstream
# sources as released (Debian's patches adapt it to Debian's own layout), built with glibc 2.31.
PY_KEY=$(key "$PY_SOURCE" "$PY_CONFIGURE" v1)
if [ "$(cat "$BROOT$PY_PREFIX/.heidi-key" 2>/dev/null)" != "$PY_KEY" ]; then
  log "building CPython ($PY_SOURCE) in $BROOT (the long pole: ~8 min on 2 cores)"
  {
    echo "deb-src $MIRROR bookworm main"
  } >"$BROOT/etc/apt/sources.list.d/heidi-python-src.list"
  in_root "$BROOT" "
    rm -rf /src/python $PY_PREFIX && mkdir -p /src/python && cd /src/python
    apt-get update -q >/dev/null
    apt-get source -q --download-only $PY_SOURCE >/dev/null
    dpkg-source -x --skip-patches ${PY_SOURCE}_*.dsc tree >/dev/null
    cd tree
    ./configure -q $PY_CONFIGURE >/dev/null
    make -s -j\$(nproc) >/dev/null 2>make.err || { tail -30 make.err; exit 1; }
    make -s install >/dev/null 2>install.err || { tail -30 install.err; exit 1; }
    $PY_PREFIX/bin/python3.11 -c 'import ssl, zlib, ctypes, sys; print(sys.version)'
  " || die "building CPython in the $SUITE root failed"
  rm -rf "$BROOT/src/python"
  echo "$PY_KEY" >"$BROOT$PY_PREFIX/.heidi-key"
fi

# The freeze venv: PyInstaller (its bootloader, built for glibc 2.17, comes with the wheel) and
# heidi's build and run dependencies at pinned versions.
VENV_KEY=$(key "$PY_KEY" "$FREEZE_PINS" v1)
if [ "$(cat "$BROOT/opt/heidi-venv/.heidi-key" 2>/dev/null)" != "$VENV_KEY" ]; then
  log "freeze venv: $FREEZE_PINS"
  in_root "$BROOT" "
    rm -rf /opt/heidi-venv
    $PY_PREFIX/bin/python3.11 -m venv /opt/heidi-venv
    /opt/heidi-venv/bin/pip install -q $FREEZE_PINS
  " || die "installing the freeze toolchain from PyPI into the $SUITE root failed"
  echo "$VENV_KEY" >"$BROOT/opt/heidi-venv/.heidi-key"
fi

# heidi itself, from this checkout (no build outputs), compiled and frozen in the root.
log "freezing heidi in $BROOT"
rm -rf "$BROOT/build/heidi"
mkdir -p "$BROOT/build/heidi"
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='./dist*' \
  --exclude=__pycache__ --exclude='*.so' --exclude='./heidi/_fast/*.c' --exclude=.pytest_cache \
  --exclude=.benchmarks -cf - . | tar -C "$BROOT/build/heidi" -xf -
in_root "$BROOT" "
  cd /build/heidi
  /opt/heidi-venv/bin/pip install -q --no-build-isolation --no-deps .
  HEIDI_ONEDIR=1 PYTHON=/opt/heidi-venv/bin/python bash packaging/build.sh
" || die "freezing heidi in the $SUITE root failed"

mkdir -p "$DIST"
rm -rf "$DIST/heidi" "$DIST/heidi-dir"
cp -a "$BROOT/build/heidi/dist/heidi" "$BROOT/build/heidi/dist/heidi-dir" "$DIST/"
rm -rf "$BROOT/build/heidi"
log "built $DIST/heidi and $DIST/heidi-dir/ in $(( $(date +%s) - t0 )) s"
python3 "$root/packaging/glibc_check.py" --summary --max 2.31 "$DIST/heidi" "$DIST/heidi-dir" \
  || die "the portable build needs a newer glibc than 2.31 (above)"
