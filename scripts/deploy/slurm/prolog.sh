#!/bin/bash
# Slurm Prolog (slurm.conf: Prolog=/opt/hffs/scripts/deploy/slurm/prolog.sh, PrologFlags=Alloc): make sure
# this node's hffs-neuron mounts are up before the job's processes start. Runs as root on every node of
# the allocation. Idempotent and serialized (several jobs may start on one node at once): a running
# mount is left alone, a dead daemon's stale mount is recovered, a missing one is mounted.
# A mount that cannot come up fails the prolog (Slurm requeues the job and drains the node): a job must
# never write its compile cache into the bare mountpoint directory.
set -euo pipefail
PROLOG_OR_EPILOG=prolog
# shellcheck source-path=SCRIPTDIR source=settings.sh
. "$(dirname "$0")/settings.sh"
CACHE_DIR=${HFFS_CACHE_DIR:-/var/cache/hffs}
CACHE_SIZE=${HFFS_CACHE_SIZE:-200G}
TOKEN_FILE=${HFFS_TOKEN_FILE-/etc/hffs/token}       # empty: no token file

take_lock

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
