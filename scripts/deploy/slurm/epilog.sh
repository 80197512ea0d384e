#!/bin/bash
# Slurm Epilog (slurm.conf: Epilog=/opt/hffs/scripts/deploy/slurm/epilog.sh): runs as root on every node
# after a job. By default the mounts stay up, so the next job starts warm; a dead daemon's stale mount
# is cleared (the next prolog mounts again). HFFS_SLURM_PUSH=1 publishes the complete NEFF modules the
# job compiled (needs a write token); HFFS_SLURM_UNMOUNT=1 unmounts (e.g. nodes that are reimaged).
# Problems with the mounts never fail it: they are reported on stderr (slurmd's log).
set -uo pipefail
# Settings: exported (set -a) like the prolog's, so HF_ENDPOINT, HF_TOKEN and every HFFS_* reach mountctl;
# set but empty turns a part off (${VAR-default}, no colon).
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
LOCK_DIR=${HFFS_SLURM_LOCK_DIR:-/run/hffs-slurm}
LOCK_WAIT=${HFFS_SLURM_LOCK_WAIT:-300}
export HFFS_RUNTIME_DIR=${HFFS_RUNTIME_DIR:-/run/hffs}

# The prolog's lock: the root-only (0700) directory LOCK_DIR itself, opened read-only (see prolog.sh).
# The only way this script fails: a lock directory that is not root's, or a lock held too long.
refuse() { echo "hffs epilog: $1" >&2; exit 1; }
if [ ! -e "$LOCK_DIR" ] && [ ! -L "$LOCK_DIR" ]; then
    mkdir -m 0700 "$LOCK_DIR" 2>/dev/null || [ -d "$LOCK_DIR" ] || refuse "cannot create lock directory $LOCK_DIR"
fi
if [ -L "$LOCK_DIR" ] || [ ! -d "$LOCK_DIR" ]; then refuse "lock directory $LOCK_DIR is a symlink or not a directory"; fi
exec 9<"$LOCK_DIR"
[ "$(stat -L -c '%u %a %F %d:%i' /dev/fd/9)" = "0 700 directory $(stat -c '%d:%i' "$LOCK_DIR")" ] ||
    refuse "lock directory $LOCK_DIR must be a directory owned by root with mode 0700"
flock -w "$LOCK_WAIT" 9 || refuse "lock $LOCK_DIR still held by another process after ${LOCK_WAIT}s"

if [ -n "$NEFF_BUCKET" ] && [ "${HFFS_SLURM_PUSH:-0}" = 1 ]; then
    "$MOUNTCTL" push "$NEFF_MOUNT" || echo "hffs epilog: push from $NEFF_MOUNT failed" >&2
fi
for mountpoint in ${NEFF_BUCKET:+"$NEFF_MOUNT"} ${HUB_MOUNT:+"$HUB_MOUNT"}; do
    if [ "${HFFS_SLURM_UNMOUNT:-0}" = 1 ]; then
        "$MOUNTCTL" umount --force "$mountpoint" || true
    elif ! "$MOUNTCTL" status "$mountpoint" --json --check >/dev/null 2>&1; then
        "$MOUNTCTL" umount --force "$mountpoint" >/dev/null 2>&1 || true
    fi
done
exit 0
