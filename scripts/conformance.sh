#!/usr/bin/env bash
# POSIX conformance of a NEFF mount's writable layer, measured with pjdfstest (issue 25).
#
# usage: scripts/conformance.sh [--record] [--log FILE] [PJDFSTEST]
#
# PJDFSTEST is a built pjdfstest source directory or pjdfstest's source tarball (built here, in a
# temporary directory); default: $HFFS_PJDFSTEST, else ../shared/tools/pjdfstest-src.tar.gz next to the
# repository. pjdfstest is an external tool: this script only runs it. As root (pjdfstest switches
# users), it starts the Hub emulator with a NEFF bucket, mounts a NEFF view with allow_other, runs
# `prove -rv` in a module directory of the mount and prints one line:
#   conformance: N subtests, F failed: R documented refusals, U unexpected
# followed by the unexpected failures. A failure listed in tests/conformance/refusals.txt (deliberate
# refusals, see README) is a refusal, any other is unexpected. Exit 0, 1 on an unexpected failure or a
# failed mount, 2 when it cannot run (no pjdfstest, not root, a tool missing).
#   --record    rewrite tests/conformance/refusals.txt from this run (only failures that pjdfstest's
#               messages show to be refusals, and their cascades, are written; others stay unexpected)
#   --log FILE  keep pjdfstest's verbose output (its stderr goes to FILE.stderr)
# HFFS_CONFORMANCE_TIMEOUT: seconds allowed for the whole pjdfstest run (default 900).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
root=$PWD

die() {
  echo "conformance: $*" >&2
  exit 2
}

absolute() { case "$1" in /*) realpath -m -- "$1" ;; *) realpath -m -- "$2/$1" ;; esac; }

record=0 log="" source=""
while [ $# -gt 0 ]; do
  case "$1" in
    --record) record=1 ;;
    --log)
      [ $# -ge 2 ] || die "--log needs a file"
      log=$(absolute "$2" "$caller")
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*) die "unknown option $1 (usage: scripts/conformance.sh [--record] [--log FILE] [PJDFSTEST])" ;;
    *)
      [ -z "$source" ] || die "one PJDFSTEST argument at most"
      source=$(absolute "$1" "$caller")
      ;;
  esac
  shift
done
if [ -z "$source" ]; then
  if [ -n "${HFFS_PJDFSTEST:-}" ]; then
    source=$(absolute "$HFFS_PJDFSTEST" "$caller")
  else
    source=$(absolute ../shared/tools/pjdfstest-src.tar.gz "$root")
  fi
fi
if [ ! -e "$source" ]; then
  die "no pjdfstest at $source: pass a built pjdfstest directory or its source tarball (scripts/conformance.sh PJDFSTEST, or HFFS_PJDFSTEST=...)"
fi
[ "$(id -u)" = 0 ] || die "pjdfstest must run as root (it acts as other users): run sudo scripts/conformance.sh"
timeout_s=${HFFS_CONFORMANCE_TIMEOUT:-900}

# Debian packages that provide what building and running pjdfstest takes.
declare -A package=([autoreconf]=autoconf [aclocal]=automake [automake]=automake [make]=make [cc]=gcc
  [openssl]=openssl [prove]=perl [timeout]=coreutils)
need() {
  local missing=() tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${package[$tool]}")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "conformance: installing ${missing[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >/dev/null ||
    die "could not install ${missing[*]}; run: apt-get install -y ${missing[*]}"
}

work=$(mktemp -d "${TMPDIR:-/tmp}/hffs-conformance.XXXXXX")
chmod 0755 "$work" # other users (pjdfstest's -u) must reach the mount below it
mount_pid="" prove_pid=""
# shellcheck disable=SC2317 # called from the EXIT trap
mounted() { grep -qs " $work/mnt fuse" /proc/mounts; }
# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
  local rc=$?
  cd "$root"
  if [ -n "$prove_pid" ]; then
    kill -TERM "$prove_pid" 2>/dev/null || true
    wait "$prove_pid" 2>/dev/null || true
  fi
  if [ -n "$mount_pid" ] && kill -0 "$mount_pid" 2>/dev/null; then
    kill -TERM "$mount_pid" 2>/dev/null || true
    for _ in $(seq 120); do
      kill -0 "$mount_pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "$mount_pid" 2>/dev/null || true
    wait "$mount_pid" 2>/dev/null || true
  fi
  if mounted; then
    fusermount3 -uz "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
  fi
  if mounted; then
    echo "conformance: $work/mnt is still mounted; left $work in place" >&2
  else
    rm -rf --one-file-system "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "conformance: interrupted" >&2; exit 130' INT
trap 'echo "conformance: terminated" >&2; exit 143' TERM

# pjdfstest: a built directory as it is, else a copy of the source (directory or tarball) built here.
if [ -d "$source" ] && [ -x "$source/pjdfstest" ] && [ -f "$source/tests/misc.sh" ]; then
  pjd=$source
else
  need autoreconf aclocal automake make cc
  mkdir "$work/src"
  if [ -d "$source" ]; then
    cp -a "$source" "$work/src/"
  else
    tar xzf "$source" -C "$work/src" || die "cannot extract $source (expected pjdfstest's source tarball)"
  fi
  pjd=$(find "$work/src" -maxdepth 2 -name configure.ac -printf '%h\n' | head -n 1)
  if [ -z "$pjd" ] || [ ! -f "$pjd/tests/misc.sh" ]; then
    die "$source holds no pjdfstest source (configure.ac, tests/)"
  fi
  echo "conformance: building pjdfstest from $source" >&2
  if ! (cd "$pjd" && autoreconf -ifs && ./configure && make pjdfstest) >"$work/build.log" 2>&1; then
    tail -n 20 "$work/build.log" >&2
    die "building pjdfstest failed (log above)"
  fi
fi
need prove openssl timeout

if ! .venv/bin/python -c "import hffs_neuron" >/dev/null 2>&1; then
  bash scripts/setup.sh || die "scripts/setup.sh failed"
fi

# The Hub emulator and the mount live in the helper until it gets SIGTERM (or this shell is gone).
.venv/bin/python scripts/conformance.py mount "$work" >"$work/mount.out" 2>"$work/mount.err" &
mount_pid=$!
module=""
for _ in $(seq 240); do
  module=$(sed -n 's/^ready //p' "$work/mount.out")
  if [ -n "$module" ] || ! kill -0 "$mount_pid" 2>/dev/null; then break; fi
  sleep 0.5
done
if [ -z "$module" ]; then
  tail -n 20 "$work/mount.err" >&2
  echo "conformance: mounting the NEFF view failed (log above)"
  exit 1
fi

start=$SECONDS
cd "$module"
# In the background, so that a signal to this script is handled at once (timeout passes it on to prove).
timeout -k 30 "$timeout_s" prove -rv "$pjd/tests" >"$work/prove.log" 2>"$work/prove.err" </dev/null &
prove_pid=$!
rc=0
wait "$prove_pid" || rc=$?
prove_pid=""
cd "$root"
echo "conformance: pjdfstest ran for $((SECONDS - start)) s" >&2
if [ -n "$log" ]; then
  cp "$work/prove.log" "$log"
  if [ -s "$work/prove.err" ]; then cp "$work/prove.err" "$log.stderr"; fi
fi

args=(report "$work/prove.log" tests/conformance/refusals.txt)
[ "$record" = 0 ] || args+=(--record)
set +e
.venv/bin/python scripts/conformance.py "${args[@]}"
status=$?
set -e
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "conformance: pjdfstest did not finish within ${timeout_s} s (HFFS_CONFORMANCE_TIMEOUT); the counts above are partial"
  exit 1
fi
exit "$status"
