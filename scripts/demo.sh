#!/usr/bin/env bash
# The main job, end to end, on the bundled Hub emulator and sample data:
#   1. a Storage Bucket holding a flat Neuron compile cache, mounted as NEURON_COMPILE_CACHE_URL;
#   2. a model repo with a sharded safetensors checkpoint, mounted as HF_HUB_CACHE and read with
#      huggingface_hub, online and then offline.
# Exits 0 on success; always unmounts and stops the emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
MOUNTCTL=.venv/bin/mountctl

work=$(mktemp -d -t hffs-demo-XXXXXX)
emulator_pid=""
cleanup() {
  for mp in "$work/neff" "$work/hub"; do
    if mountpoint -q "$mp" 2>/dev/null; then "$MOUNTCTL" umount "$mp" >/dev/null 2>&1 || fusermount3 -uz "$mp" || true; fi
  done
  [ -n "$emulator_pid" ] && kill "$emulator_pid" 2>/dev/null && wait "$emulator_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export HFFS_RUNTIME_DIR="$work/run" HF_HOME="$work/hf_home"
export HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting the Hub emulator with sample data (NEFF bucket + sharded model repo)"
mkfifo "$work/ready"
"$PY" -m hffs_neuron.testing.hub_emulator --root "$work/emulator" --sample --log-level WARNING >"$work/ready" &
emulator_pid=$!
read -r status url <"$work/ready"
[ "$status" = "READY" ] || { echo "demo: emulator did not start" >&2; exit 1; }
export HF_ENDPOINT="$url"
echo "emulator at $HF_ENDPOINT"

step "NEFF view: mountctl mount neff aws-neuron/optimum-neuron-cache $work/neff"
mkdir -p "$work/neff" "$work/hub"
"$MOUNTCTL" mount neff aws-neuron/optimum-neuron-cache "$work/neff" --cache-dir "$work/cache"
echo "\$ ls $work/neff   (failed and locked entries never cross)"
ls "$work/neff"
version=$(ls "$work/neff" | head -n 1)
echo "\$ ls -l $work/neff/$version"
ls -l "$work/neff/$version"
module=$(ls "$work/neff/$version" | head -n 1)
echo "\$ ls -l .../$module"
ls -l "$work/neff/$version/$module"
echo "\$ sha256sum .../$module/model.neff   (fetched once, on first open)"
sha256sum "$work/neff/$version/$module/model.neff"
echo "\$ NEURON_COMPILE_CACHE_URL=$work/neff: the compiler's lock file and a new module land locally"
: >"$work/neff/lock"
new="$work/neff/$version/MODULE_00000000000000000001+deadbeef"
mkdir -p "$new" && printf 'neff' >"$new/model.neff" && : >"$new/model.done"
ls -l "$new"
echo "\$ mountctl push $work/neff --dry-run"
"$MOUNTCTL" push "$work/neff" --dry-run

step "Hub-cache view: mountctl mount hub-cache $work/hub"
"$MOUNTCTL" mount hub-cache "$work/hub" --cache-dir "$work/cache" --repo HFFS-Test/Tiny-Sharded
echo "\$ ls $work/hub"
ls "$work/hub"
echo "\$ ls -l $work/hub/models--hffs-test--tiny-sharded/snapshots/*/   (any letter case; sizes before download)"
ls -l "$work/hub"/models--hffs-test--tiny-sharded/snapshots/*/
echo "\$ cat .../refs/main"
cat "$work/hub/models--HFFS-Test--Tiny-Sharded/refs/main"; echo

step "huggingface_hub with HF_HUB_CACHE=$work/hub: online, then offline"
HF_HUB_CACHE="$work/hub" "$PY" - <<'EOF'
import json
from huggingface_hub import hf_hub_download
path = hf_hub_download("hffs-test/tiny-sharded", "model.safetensors.index.json")
index = json.load(open(path))
print("online :", path)
print("         shards:", sorted(set(index["weight_map"].values())))
EOF
HF_HUB_OFFLINE=1 HF_HUB_CACHE="$work/hub" "$PY" - <<'EOF'
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.numpy import load_file
path = hf_hub_download("HFFS-Test/Tiny-Sharded", "model-00001-of-00003.safetensors")
tensors = load_file(path)  # the first open fetches, verifies and serves the complete shard
print("offline:", path)
print("         tensors:", len(tensors), "e.g.", next(iter(tensors)))
print("offline snapshot:", snapshot_download("HFFS-Test/Tiny-Sharded"))
EOF

step "mountctl status"
"$MOUNTCTL" status

step "Unmounting"
"$MOUNTCTL" umount "$work/neff"
"$MOUNTCTL" umount "$work/hub"
echo "demo: ok"
