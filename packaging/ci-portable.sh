#!/usr/bin/env bash
# CI's portable part (.ci/run calls it after the frozen-binary part; needs root): build the
# glibc-2.31 binary (packaging/build-portable.sh, cached), hold every bundled ELF to GLIBC_2.31
# with packaging/glibc_check.py, then smoke-test the one-file binary inside a lean Debian bullseye
# root (system glibc 2.31): every _fast module compiled, mock run, verify, redact, and the
# example pipeline with real stages. Any failure, the infrastructure's included, fails CI.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
FLOOR=2.31
t0=$(date +%s)
bash packaging/build-portable.sh
echo "== portable: build took $(( $(date +%s) - t0 )) s"
python3 packaging/glibc_check.py --max "$FLOOR" dist/heidi dist/heidi-dir

RUNROOT=$(bash packaging/build-portable.sh --run-root)
[ -x "$RUNROOT/bin/sh" ] || { echo "== portable: no bullseye root at '$RUNROOT'"; exit 1; }
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" || true; done
  rm -rf "$RUNROOT/heidi-smoke"
}
trap cleanup EXIT
for d in proc dev; do
  if ! mountpoint -q "$RUNROOT/$d"; then mount --bind "/$d" "$RUNROOT/$d"; mounted+=("$RUNROOT/$d"); fi
done
rm -rf "$RUNROOT/heidi-smoke"
mkdir -p "$RUNROOT/heidi-smoke"
cp dist/heidi "$RUNROOT/heidi-smoke/heidi"
n_modules=$(PYTHONPATH="$root" python3 -c 'import heidi._fast as f; print(len(f.MODULES))')

cat >"$RUNROOT/heidi-smoke/smoke.sh" <<'SMOKE'
set -euo pipefail
n_modules="$1"
heidi=/heidi-smoke/heidi
libc=$(getconf GNU_LIBC_VERSION)
echo "== in the bullseye root: $libc"
[ "$libc" = "glibc 2.31" ] || { echo "== expected glibc 2.31 here"; exit 1; }
out=$($heidi version --verbose)
echo "$out"
n_compiled=$(echo "$out" | grep -c ': compiled$' || true)
if [ "$n_compiled" -ne "$n_modules" ]; then
  echo "== portable binary: $n_compiled of $n_modules _fast modules compiled"; exit 1
fi
smoke=$(mktemp -d)
HEIDI_MOCK_SUBPROCESSES=1 ROUNDS=2 $heidi run --out-dir "$smoke/run"
$heidi verify --out-dir "$smoke/run"
$heidi status --out-dir "$smoke/run" --json | grep -q '"status": "completed"'
secret="ghp_$(printf 'A%.0s' $(seq 36))"
red=$(echo "token $secret here" | $heidi redact)
case "$red" in *"$secret"*) echo "== portable redact leaked the token"; exit 1;; esac
echo "$red" | grep -q '\[GITHUB_TOKEN\]'
printf 'garbage\n' >> "$smoke/run/events.jsonl"
if $heidi verify --out-dir "$smoke/run"; then echo "== verify accepted a damaged journal"; exit 1; fi
# Real stages (bullseye's python3) under the compiled supervise loop, with its fallbacks for
# posix_spawn's closefrom, which glibc 2.31 lacks.
$heidi init "$smoke/demo" >/dev/null
(cd "$smoke/demo" && MAX_CPU_PCT=100 MAX_MEM_PCT=100 $heidi run)
(cd "$smoke/demo" && $heidi verify && $heidi status | grep -q completed)
cat > "$smoke/ldp.toml" <<'TOML'
[stages.generate]
command = ["/bin/sh", "-c", "echo LDP=${LD_LIBRARY_PATH:-unset}"]
TOML
HEIDI_CONFIG="$smoke/ldp.toml" $heidi start --out-dir "$smoke/ldp" >/dev/null
LD_LIBRARY_PATH=/opt/box-libs HEIDI_CONFIG="$smoke/ldp.toml" MAX_CPU_PCT=100 MAX_MEM_PCT=100 \
  $heidi tick --out-dir "$smoke/ldp"
grep -qx 'LDP=/opt/box-libs' "$smoke/ldp/logs/round_1/generate.log" \
  || { echo "== a stage saw another LD_LIBRARY_PATH:"; cat "$smoke/ldp/logs/round_1/generate.log"; exit 1; }
rm -rf "$smoke"
echo "== portable smoke test OK on $libc"
SMOKE
chroot "$RUNROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
  LANG=C.UTF-8 TMPDIR=/tmp /bin/bash /heidi-smoke/smoke.sh "$n_modules"
echo "== portable: build, glibc check and smoke test took $(( $(date +%s) - t0 )) s"
