#!/bin/bash
# Slurm Epilog (slurm.conf: Epilog=/opt/hffs/scripts/deploy/slurm/epilog.sh): runs as root on every node
# after a job. By default the mounts stay up, so the next job starts warm; a dead daemon's stale mount
# is cleared (the next prolog mounts again). HFFS_SLURM_PUSH=1 publishes the complete NEFF modules the
# job compiled (needs a write token); HFFS_SLURM_UNMOUNT=1 unmounts (e.g. nodes that are reimaged).
# Problems with the mounts never fail it: they are reported on stderr (slurmd's log). What fails it (so
# Slurm drains the node): a lock directory that is not root's alone, or a lock held past the wait.
set -uo pipefail
PROLOG_OR_EPILOG=epilog
# shellcheck source-path=SCRIPTDIR source=settings.sh
. "$(dirname "$0")/settings.sh"

take_lock

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
