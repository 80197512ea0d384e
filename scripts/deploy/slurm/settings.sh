# shellcheck shell=bash disable=SC2034  # variables for prolog.sh and epilog.sh
# Sourced by prolog.sh and epilog.sh (not run on its own): the node's settings, then the lock they share.
# PROLOG_OR_EPILOG names the caller in messages.

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
LOCK_DIR=${HFFS_SLURM_LOCK_DIR:-/run/hffs-slurm}
LOCK_WAIT=${HFFS_SLURM_LOCK_WAIT:-300}
export HFFS_RUNTIME_DIR=${HFFS_RUNTIME_DIR:-/run/hffs}

refuse() { echo "hffs $PROLOG_OR_EPILOG: $1" >&2; exit 1; }

# The lock (prolog and epilog) is the directory LOCK_DIR itself, root's alone (0700): never a file in a
# world-writable directory such as /run/lock, where a user's symlink would make root truncate any file
# and a user holding the lock would fail every prolog. It is opened read-only (a directory's fd can be
# flocked; nothing is created or truncated through a link) and checked again once open.
take_lock() {
    if [ ! -e "$LOCK_DIR" ] && [ ! -L "$LOCK_DIR" ]; then
        mkdir -m 0700 "$LOCK_DIR" 2>/dev/null || [ -d "$LOCK_DIR" ] || refuse "cannot create lock directory $LOCK_DIR"
    fi
    if [ -L "$LOCK_DIR" ] || [ ! -d "$LOCK_DIR" ]; then refuse "lock directory $LOCK_DIR is a symlink or not a directory"; fi
    exec 9<"$LOCK_DIR"
    [ "$(stat -L -c '%u %a %F %d:%i' /dev/fd/9)" = "0 700 directory $(stat -c '%d:%i' "$LOCK_DIR")" ] ||
        refuse "lock directory $LOCK_DIR must be a directory owned by root with mode 0700"
    flock -w "$LOCK_WAIT" 9 || refuse "lock $LOCK_DIR still held by another process after ${LOCK_WAIT}s"
}
