#!/bin/bash
# Slurm Prolog (slurm.conf: Prolog=/opt/hffs/scripts/deploy/slurm/prolog.sh, PrologFlags=Alloc): make sure
# this node's hffs-neuron mounts are up before the job's processes start. Runs as root on every node of
# the allocation. Idempotent and serialized (several jobs may start on one node at once): a running
# mount is left alone, a dead daemon's stale mount is recovered, a missing one is mounted.
# A mount that cannot come up fails the prolog (Slurm requeues the job and drains the node): a job must
# never write its compile cache into the bare mountpoint directory.
set -euo pipefail
# Settings: every line of the file is exported (set -a), so HF_ENDPOINT, HF_TOKEN and every HFFS_* reach
# mountctl. A setting that is set but empty turns its part off (${VAR-default}, no colon).
CONF=${HFFS_SLURM_CONF:-/etc/default/hffs-neuron}
if [ -r "$CONF" ]; then
    set -a
    # shellcheck disable=SC1090  # the admin's settings file
    . "$CONF"
    set +a
fi

MOUNTCTL=${HFFS_MOUNTCTL:-mountctl}
NEFF_BUCKET=${HFFS_NEFF_BUCKET-}                    # empty: no NEFF mount
NEFF_MOUNT=${HFFS_NEFF_MOUNT:-/mnt/hffs/neuron-cache}
HUB_MOUNT=${HFFS_HUB_MOUNT-/mnt/hffs/hub}           # empty: no hub-cache mount
CACHE_DIR=${HFFS_CACHE_DIR:-/var/cache/hffs}
CACHE_SIZE=${HFFS_CACHE_SIZE:-200G}
TOKEN_FILE=${HFFS_TOKEN_FILE-/etc/hffs/token}       # empty: no token file
LOCK_DIR=${HFFS_SLURM_LOCK_DIR:-/run/hffs-slurm}
LOCK_WAIT=${HFFS_SLURM_LOCK_WAIT:-300}
export HFFS_RUNTIME_DIR=${HFFS_RUNTIME_DIR:-/run/hffs}

# The lock (shared with the epilog) is the directory LOCK_DIR itself, root's alone (0700): never a file
# in a world-writable directory such as /run/lock, where a user's symlink would make root truncate any
# file and a user holding the lock would fail every prolog. It is opened read-only (a directory's fd
# can be flocked; nothing is created or truncated through a link) and checked again once open.
refuse() { echo "hffs prolog: $1" >&2; exit 1; }
if [ ! -e "$LOCK_DIR" ] && [ ! -L "$LOCK_DIR" ]; then
    mkdir -m 0700 "$LOCK_DIR" 2>/dev/null || [ -d "$LOCK_DIR" ] || refuse "cannot create lock directory $LOCK_DIR"
fi
if [ -L "$LOCK_DIR" ] || [ ! -d "$LOCK_DIR" ]; then refuse "lock directory $LOCK_DIR is a symlink or not a directory"; fi
exec 9<"$LOCK_DIR"
[ "$(stat -L -c '%u %a %F %d:%i' /dev/fd/9)" = "0 700 directory $(stat -c '%d:%i' "$LOCK_DIR")" ] ||
    refuse "lock directory $LOCK_DIR must be a directory owned by root with mode 0700"
flock -w "$LOCK_WAIT" 9 || refuse "lock $LOCK_DIR still held by another process after ${LOCK_WAIT}s"

token=()
[ -n "$TOKEN_FILE" ] && [ -r "$TOKEN_FILE" ] && token=(--token-file "$TOKEN_FILE")
# Jobs compile as their own users: only the users of this group (and root) get modules published
# (the epilog's push and --publish alike); everyone else's compiles stay on this node.
publish_from=()
[ -n "${HFFS_PUBLISH_FROM:-}" ] && publish_from=(--publish-from "$HFFS_PUBLISH_FROM")

if [ -n "$NEFF_BUCKET" ] && ! "$MOUNTCTL" status "$NEFF_MOUNT" --json --check >/dev/null 2>&1; then
    mkdir -p "$NEFF_MOUNT"
    "$MOUNTCTL" umount --force "$NEFF_MOUNT" >/dev/null 2>&1 || true  # a dead daemon's leftovers
    "$MOUNTCTL" mount neff "$NEFF_BUCKET" "$NEFF_MOUNT" --allow-other --cache-dir "$CACHE_DIR" --cache-size "$CACHE_SIZE" "${token[@]}" "${publish_from[@]}"
fi
if [ -n "$HUB_MOUNT" ] && ! "$MOUNTCTL" status "$HUB_MOUNT" --json --check >/dev/null 2>&1; then
    mkdir -p "$HUB_MOUNT"
    "$MOUNTCTL" umount --force "$HUB_MOUNT" >/dev/null 2>&1 || true
    "$MOUNTCTL" mount hub-cache "$HUB_MOUNT" --allow-other --cache-dir "$CACHE_DIR" --cache-size "$CACHE_SIZE" "${token[@]}"
fi
