#!/bin/bash
# Slurm Epilog (slurm.conf: Epilog=/opt/hffs/scripts/deploy/slurm/epilog.sh): runs as root on every node
# after a job. By default the mounts stay up, so the next job starts warm; a dead daemon's stale mount
# is cleared (the next prolog mounts again). HFFS_SLURM_PUSH=1 publishes the complete NEFF modules the
# job compiled (needs a write token); HFFS_SLURM_UNMOUNT=1 unmounts (e.g. nodes that are reimaged).
# Never fails the job: problems are reported on stderr (slurmd's log).
set -uo pipefail
[ -r /etc/default/hffs-neuron ] && . /etc/default/hffs-neuron

MOUNTCTL=${HFFS_MOUNTCTL:-mountctl}
NEFF_BUCKET=${HFFS_NEFF_BUCKET:-}
NEFF_MOUNT=${HFFS_NEFF_MOUNT:-/mnt/hffs/neuron-cache}
HUB_MOUNT=${HFFS_HUB_MOUNT:-/mnt/hffs/hub}
LOCK_FILE=${HFFS_LOCK_FILE:-/run/lock/hffs-slurm.lock}
export HFFS_RUNTIME_DIR=${HFFS_RUNTIME_DIR:-/run/hffs}

exec 9>"$LOCK_FILE"
flock -w 300 9

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
