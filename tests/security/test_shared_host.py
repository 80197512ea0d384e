"""Shared hosts (issue 12 items 1 and 2): a second local user on an `--allow-other` mount.

The tests run as root, the mount's owner (a daemon started by root or by a service account), and run
the other user's commands with `setpriv --reuid/--regid --clear-groups`; that user is created with
`useradd` under a unique name and removed at the end of the session. What compilers and
huggingface_hub do as that user works; each attack from the issue fails with EACCES, EPERM or ELOOP.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import Mounts, OtherUser, _as

from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket
from hffs_neuron.views.creators import CreatorLog
from hffs_neuron.views.localfs import LocalTree

pytestmark = pytest.mark.timeout(180)

VERSION = "neuronxcc-2.21.18209.0+043b1bf7"


def _mount_neff(shared_mounts: Mounts, bucket_id: str, **options: object) -> Path:
    return Path(shared_mounts("neff", bucket_id, allow_other=True, **options).mountpoint)


# -- NEFF view ------------------------------------------------------------------------------------------
COMPILER = r"""
import fcntl, os, sys
root, module = sys.argv[1], sys.argv[2]
# libneuronxla: the root lock on every cache operation, then hlo + flags, neff, done (plain writes).
with open(os.path.join(root, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.makedirs(module, exist_ok=True)
    for name, data in (("model.hlo_module.pb", b"hlo"), ("compile_flags.json", b"[]"),
                       ("model.neff", b"neff by the other user"), ("model.done", b"")):
        with open(os.path.join(module, name), "wb") as f:
            f.write(data)
print(open(os.path.join(module, "model.neff"), "rb").read().decode())
"""


def test_compiler_pattern_works_for_another_user(
    hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser
) -> None:
    bucket = build_neff_bucket(hub)
    mp = _mount_neff(shared_mounts, bucket["bucket_id"])
    remote_module = mp / bucket["complete"][0]
    new_version = mp / "neuronxcc-9.9.9.0+00000000" / "MODULE_1+11111111"  # a compiler the bucket lacks
    for module in (mp / VERSION / "MODULE_other+22222222", new_version):
        result = other_user.python(COMPILER, str(mp), str(module))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "neff by the other user"
        # Entries belong to their creator; the module directories stay shared (sticky, like /tmp).
        assert os.stat(module / "model.neff").st_uid == other_user.uid
        assert stat.S_IMODE(os.stat(module).st_mode) == 0o1777
        assert (module / "model.done").exists()  # the owner's compiler sees the module complete
    # Reading the owner's remote modules works; the root lock stays writable by everyone.
    assert _as(other_user, "read", remote_module / "model.neff") == "ok"
    assert stat.S_IMODE(os.stat(mp / "lock").st_mode) == 0o666
    # The owner's compiler writes into a module the other user created.
    (mp / VERSION / "MODULE_other+22222222" / "model.log").write_bytes(b"owner")
    # The layer state records each entry's creator: uid, pid and that pid's start time.
    (layer,) = (shared_mounts.tmp_path / "cache" / "neff-layers").iterdir()
    records = CreatorLog(LocalTree(layer))
    theirs = records.get(f"{VERSION}/MODULE_other+22222222/model.neff")
    assert theirs is not None and theirs.uid == other_user.uid and theirs.pid > 0 and theirs.start > 0
    assert records.get(f"{VERSION}/MODULE_other+22222222/model.log").uid == os.getuid()


def test_neff_attacks_by_another_user_fail(
    hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser, tmp_path: Path
) -> None:
    bucket = build_neff_bucket(hub)
    cache = shared_mounts.tmp_path / "cache"
    cache.mkdir(mode=0o755)  # an existing cache dir left open to others: the mount tightens it
    mp = _mount_neff(shared_mounts, bucket["bucket_id"])
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    remote = mp / bucket["complete"][0]
    local = mp / VERSION / "MODULE_owner+33333333"
    local.mkdir()
    (local / "model.neff").write_bytes(b"owner's neff")
    for module in (remote, local):  # the owner's modules: neither rewritten, nor replaced, nor deleted
        assert _as(other_user, "write", module / "model.neff", "evil") == "EACCES"
        assert _as(other_user, "write", module / "model.neff", "evil", "ab") == "EACCES"
        assert _as(other_user, "truncate", module / "model.neff", 0) == "EACCES"
        assert _as(other_user, "unlink", module / "model.neff") == "EPERM"
        assert _as(other_user, "rename", module / "model.neff", module / "stolen") == "EPERM"
        assert _as(other_user, "chmod", module / "model.neff", 0o666) == "EPERM"
        assert _as(other_user, "rmdir", module) in ("EPERM", "ENOTEMPTY")
    assert (local / "model.neff").read_bytes() == b"owner's neff"
    assert (remote / "model.neff").read_bytes() == (
        hub.bucket_dir(bucket["bucket_id"]) / bucket["complete"][0] / "model.neff"
    ).read_bytes()

    # A setuid copy of a shell: asking for the bit is refused (EPERM), and the layer on disk is out of
    # reach anyway.
    own = mp / VERSION / "MODULE_user+44444444"
    script = f"import os, shutil; os.makedirs({str(own)!r}); shutil.copy('/bin/sh', {str(own / 'sh')!r})"
    result = other_user.python(script)
    assert result.returncode == 0, result.stderr
    assert _as(other_user, "chmod", own / "sh", 0o4755) == "EPERM"
    assert _as(other_user, "chmod", own / "sh", 0o2755) == "EPERM"
    assert stat.S_IMODE(os.stat(own / "sh").st_mode) == 0o755
    layer_copies = list((cache / "neff-layers").rglob("sh"))
    assert layer_copies and all(not p.stat().st_mode & (stat.S_ISUID | stat.S_ISGID) for p in layer_copies)
    assert _as(other_user, "listdir", cache) == "EACCES"
    state_files = [p for p in (cache / "neff-layers").rglob("*") if p.name in ("whiteouts.json", "creators.jsonl")]
    assert state_files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in state_files)


# -- Hub-cache view ---------------------------------------------------------------------------------------
DOWNLOAD = r"""
import hashlib, json, sys
from huggingface_hub import hf_hub_download, snapshot_download
repo_id, name = sys.argv[1], sys.argv[2]
path = hf_hub_download(repo_id, name)
root = snapshot_download(repo_id)
print(json.dumps([hashlib.sha256(open(path, "rb").read()).hexdigest(), sorted(__import__("os").listdir(root))]))
"""


def test_hf_hub_download_works_for_another_user(hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser) -> None:
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(64 * 1024)}
    hub.add_repo("Org/Public", files)
    mp = Path(shared_mounts("hub-cache", allow_other=True).mountpoint)
    env = dict(os.environ, HF_HUB_CACHE=str(mp))
    for online in (True, False):
        if not online:
            env["HF_HUB_OFFLINE"] = "1"
        result = other_user.python(DOWNLOAD, "org/public", "model.safetensors", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        digest, listing = json.loads(result.stdout.strip().splitlines()[-1])
        assert digest == __import__("hashlib").sha256(files["model.safetensors"]).hexdigest()
        assert listing == sorted(files)
    # A missing file: the other user's huggingface_hub records it under .no_exist (shared, sticky).
    script = (
        "from huggingface_hub import hf_hub_download\n"
        "try:\n    hf_hub_download('Org/Public', 'missing.txt')\nexcept Exception as e:\n    print(type(e).__name__)"
    )
    env.pop("HF_HUB_OFFLINE")
    result = other_user.python(script, env=env)
    assert "EntryNotFound" in result.stdout, result.stderr[-3000:]
    markers = list((mp / "models--Org--Public" / ".no_exist").rglob("missing.txt"))
    assert markers and markers[0].stat().st_uid == other_user.uid


def test_hub_cache_attacks_by_another_user_fail(
    hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser, hub_token: str
) -> None:
    weights = os.urandom(32 * 1024)
    gated_commit = hub.add_repo("Org/Gated", {"config.json": "{}", "model.safetensors": weights}, gated=True)
    commit = hub.add_repo("Org/Public", {"config.json": "{}"})
    backing = shared_mounts.tmp_path / "backing"
    hidden = backing / "models--Someone--Private" / "blobs" / "weights"  # a repo this token cannot see
    hidden.parent.mkdir(parents=True)
    hidden.write_bytes(b"downloaded earlier with another token")
    mp = Path(shared_mounts("hub-cache", allow_other=True, token=hub_token, backing=str(backing)).mountpoint)
    # A folder the Hub does not show to this mount's token: its bytes were fetched with another identity,
    # so nobody gets them through this mount (issue 12.5), the owner included; the folder is the owner's only.
    with pytest.raises(PermissionError):
        (mp / "models--Someone--Private" / "blobs" / "weights").read_bytes()
    assert _as(other_user, "read", mp / "models--Someone--Private" / "blobs" / "weights") == "EACCES"

    # Gated weights: the owner reads them; the other user cannot even enter the repo folder.
    gated = mp / "models--Org--Gated"
    assert (gated / "snapshots" / gated_commit / "model.safetensors").read_bytes() == weights
    assert _as(other_user, "read", gated / "snapshots" / gated_commit / "model.safetensors") == "EACCES"
    assert _as(other_user, "listdir", gated / "blobs") == "EACCES"

    repo = mp / "models--Org--Public"
    fake = "f" * 40
    # refs/main: neither rewritten in place nor replaced with a commit the Hub does not report ...
    assert _as(other_user, "write", repo / "refs" / "main", fake) == "EACCES"
    assert _as(other_user, "replace", repo / "refs" / "main", fake) == "EACCES"
    assert (repo / "refs" / "main").read_text() == commit
    assert _as(other_user, "unlink", repo / "refs" / "main") in ("EPERM", "EROFS")
    # ... but the Hub's own commit is accepted (huggingface_hub records a moved branch that way),
    # and the installed ref belongs to the owner, so it cannot be rewritten afterwards.
    assert _as(other_user, "replace", repo / "refs" / "main", commit) == "ok"
    assert (repo / "refs" / "main").read_text() == commit
    assert os.stat(repo / "refs" / "main").st_uid == os.getuid()
    assert _as(other_user, "write", repo / "refs" / "main", fake) == "EACCES"
    # No fake snapshot, no planted blob.
    assert _as(other_user, "mkdir", repo / "snapshots" / fake) == "EACCES"
    assert _as(other_user, "symlink", "../../blobs/x", repo / "snapshots" / commit / "evil.json") == "EACCES"
    assert _as(other_user, "write", repo / "blobs" / "planted", "x") == "EACCES"
    assert sorted(os.listdir(repo / "snapshots")) == [commit]


def test_symlinks_planted_in_a_shared_backing_are_never_followed(
    hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser
) -> None:
    """Issue 12 item 2: a client replaces `models--Evil--Repo` in a group-writable backing with a
    symlink to a root-only directory, then reads and creates through another casing."""
    secret_dir = Path(tempfile.mkdtemp(prefix="hffs-sec-secret-"))  # 0700, root's
    (secret_dir / "secret.txt").write_text("root only")
    backing = shared_mounts.tmp_path / "backing"
    backing.mkdir()
    backing.chmod(0o777)  # a shared cache directory (never chmodded by the mount: it only warns)
    try:
        hub.add_repo("Evil/Repo", {"config.json": "{}"})
        mp = Path(shared_mounts("hub-cache", allow_other=True, backing=str(backing)).mountpoint)
        planted = backing / "models--Evil--Repo"
        result = other_user.run(["mkdir", "-p", str(planted / ".no_exist")])
        assert result.returncode == 0, result.stderr
        variant = mp / "models--evil--repo"
        assert _as(other_user, "listdir", variant / ".no_exist") == "ok"  # the kernel now caches a dir
        result = other_user.run(["sh", "-c", f"rm -rf {planted} && ln -s {secret_dir} {planted}"])
        assert result.returncode == 0, result.stderr
        for who in ("other", "owner"):
            if who == "other":
                read = _as(other_user, "read", variant / "secret.txt")
                create = _as(other_user, "write", variant / ".no_exist" / "planted", "x")
            else:
                read = create = "ok"
                try:
                    (variant / "secret.txt").read_text()
                except OSError as exc:
                    read = errno.errorcode[exc.errno]
                try:
                    (variant / ".no_exist" / "planted").write_text("x")
                except OSError as exc:
                    create = errno.errorcode[exc.errno]
            assert read in ("ELOOP", "EACCES", "ENOENT"), (who, read)
            assert create in ("ELOOP", "EACCES", "ENOENT"), (who, create)
        assert sorted(p.name for p in secret_dir.iterdir()) == ["secret.txt"]  # nothing created there
        assert (secret_dir / "secret.txt").read_text() == "root only"
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)


def test_group_reads_gated_content(hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser, hub_token: str):
    """--group: members read gated repos' files, other users still cannot."""
    group = f"hffs-sec-g{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True, timeout=30)
    try:
        gid = int(subprocess.run(["getent", "group", group], capture_output=True, text=True).stdout.split(":")[2])
        weights = os.urandom(16 * 1024)
        commit = hub.add_repo("Org/Gated", {"model.safetensors": weights}, gated=True)
        mp = Path(shared_mounts("hub-cache", allow_other=True, token=hub_token, group=group).mountpoint)
        target = mp / "models--Org--Gated" / "snapshots" / commit / "model.safetensors"
        assert os.stat(mp / "models--Org--Gated").st_gid == gid
        assert _as(other_user, "read", target, groups=(gid,)) == "ok"
        assert _as(other_user, "read", target) == "EACCES"
    finally:
        subprocess.run(["groupdel", group], check=False, timeout=30)


def test_group_is_a_mount_option_three_ways() -> None:
    from mountctl.cli import build_parser, mount_helper_argv

    argv, _ = mount_helper_argv(["hub-cache", "/mnt/x", "-o", "group=ml,allow_other"])
    assert argv[argv.index("--group") + 1] == "ml" and "--allow-other" in argv
    argv, _ = mount_helper_argv(["hub-cache", "/mnt/x", "-o", "group"])  # a bare `group` is mount(8)'s
    assert "--group" not in argv
    args = build_parser().parse_args(["mount", "hub-cache", "/mnt/x", "--allow-other", "--group", "ml"])
    assert args.group == "ml"
