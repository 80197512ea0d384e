"""The hub-cache view on a real FUSE mount, used as HF_HUB_CACHE by real huggingface_hub clients.

Every client runs in its own process (`python -c`), several at once, with `HF_HUB_CACHE=<mount>`;
the emulator counts the bytes it serves, so "fetched exactly once" is measured, not assumed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Mounts, run_parallel

from hffs_neuron.fuse_ops import MAX_READ
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_sharded_model_repo

NESTED = "sub/dir/notes.txt"
NESTED_BYTES = b"nested file, two directories below the snapshot root\n"


@dataclass
class Mounted:
    mountpoint: Path
    backing: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def mount_hub_cache(
    tmp_path: Path, hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]
) -> Callable[..., Mounted]:
    """Factory: mount a hub-cache view (own mountpoint, backing dir and log; shared cache dir)."""
    # The daemon gets a token only when a test passes one: the log and EACCES hints depend on it.
    env = {key: value for key, value in runtime_env.items() if key != "HF_TOKEN"}
    count = 0

    def _mount(backing: Path | None = None, *, token: str | None = None, **options: object) -> Mounted:
        nonlocal count
        n, count = count, count + 1
        backing = backing or tmp_path / f"backing{n}"
        backing.mkdir(exist_ok=True)
        log = tmp_path / f"daemon{n}.log"
        handle = mounts(
            "hub-cache", name=f"mnt{n}", backing=str(backing), env=env, token=token, log_file=str(log), **options
        )
        return Mounted(Path(handle.mountpoint), backing, log)

    return _mount


@pytest.fixture
def model(hub: HubEmulator) -> dict:
    """The 3-shard checkpoint at `Org/Model`, plus a file two directories down (relative-link depth)."""
    info = build_sharded_model_repo(hub, "Org/Model")
    info["commit"] = hub.add_repo("Org/Model", {NESTED: NESTED_BYTES}, parent="main")
    info["files"][NESTED] = NESTED_BYTES
    hub.reset_stats()
    return info


# A client process: download `files` of `repo_id` (each with hf_hub_download, or all at once with
# snapshot_download) and print {path: sha256 of the bytes read through the returned path}.
CLIENT = r"""
import hashlib, json, os, sys
from huggingface_hub import hf_hub_download, snapshot_download
repo_id, files, how = json.loads(sys.argv[1])
if how == "snapshot":
    root = snapshot_download(repo_id)
    paths = {f: os.path.join(root, f) for f in files}
else:
    paths = {f: hf_hub_download(repo_id, f) for f in files}
print(json.dumps({f: hashlib.sha256(open(p, "rb").read()).hexdigest() for f, p in paths.items()}))
"""


def run_clients(
    mountpoint: Path, jobs: list[tuple[str, list[str], str]], *, offline: bool = False, timeout: float = 120
) -> list[dict[str, str]]:
    """Run one client process per job, all at once, with HF_HUB_CACHE=<mountpoint>; their results."""
    env = dict(os.environ, HF_HUB_CACHE=str(mountpoint))
    env.pop("HF_TOKEN", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    argvs = [[sys.executable, "-c", CLIENT, json.dumps(job)] for job in jobs]
    return [json.loads(out.strip().splitlines()[-1]) for out in run_parallel(argvs, env=env, timeout=timeout)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repo_folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.lower().startswith("models--"))


def assert_each_served_once(hub: HubEmulator, files: dict[str, bytes], names: list[str] | None = None) -> None:
    for name in names or list(files):
        assert hub.bytes_served(f"/{name}") == len(files[name]), name


CASES = ["Org/Model", "org/model", "ORG/MODEL"]


@pytest.mark.timeout(240)
def test_case_variants_in_parallel_online_then_offline(
    hub: HubEmulator, model: dict, mount_hub_cache: Callable[..., Mounted]
) -> None:
    files: dict[str, bytes] = model["files"]
    names = sorted(files)
    m = mount_hub_cache()
    expected = {name: sha256(data) for name, data in files.items()}

    # Online: three casings of one repo at once, two per-file downloads and one snapshot_download.
    jobs = [(CASES[0], names, "files"), (CASES[1], names, "snapshot"), (CASES[2], names, "files")]
    for result in run_clients(m.mountpoint, jobs):
        assert result == expected
    assert_each_served_once(hub, files)
    assert repo_folders(m.mountpoint) == ["models--Org--Model"]  # one canonical casing: the Hub's
    assert len({name.lower() for name in repo_folders(m.backing)}) <= 1
    assert not [p for p in m.backing.rglob("*.incomplete")]  # the view served every blob itself

    # Offline, same mount, swapped roles: nothing more is fetched.
    jobs = [(CASES[0], names, "snapshot"), (CASES[1], names, "files"), (CASES[2], names, "snapshot")]
    for result in run_clients(m.mountpoint, jobs, offline=True):
        assert result == expected
    assert_each_served_once(hub, files)
    assert len({name.lower() for name in repo_folders(m.backing)}) <= 1


@pytest.mark.timeout(180)
def test_offline_clients_on_a_cold_mount(
    hub: HubEmulator, model: dict, mount_hub_cache: Callable[..., Mounted]
) -> None:
    """HF_HUB_OFFLINE=1 from the first call: the mount resolves the repo, clients never touch the Hub."""
    files: dict[str, bytes] = model["files"]
    names = sorted(files)
    m = mount_hub_cache()
    jobs = [(case, names, how) for case, how in zip(CASES, ["snapshot", "files", "snapshot"], strict=True)]
    for result in run_clients(m.mountpoint, jobs, offline=True):
        assert result == {name: sha256(data) for name, data in files.items()}
    assert_each_served_once(hub, files)
    assert not hub.requests("/resolve/", method="HEAD")  # the clients were really offline
    assert repo_folders(m.mountpoint) == ["models--Org--Model"]


@pytest.mark.timeout(120)
def test_layout_from_the_shell_before_any_fetch(
    hub: HubEmulator, model: dict, mount_hub_cache: Callable[..., Mounted]
) -> None:
    files: dict[str, bytes] = model["files"]
    commit = model["commit"]
    # Pre-pinned: listed at the root before any lookup. No read-ahead: only what is opened is fetched.
    m = mount_hub_cache(repos=["Org/Model"], read_ahead="off")
    root = m.mountpoint
    assert os.listdir(root) == ["models--Org--Model"]

    def sh(*args: str) -> str:
        result = subprocess.run(args, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    # Any casing reaches the same directory.
    repo = root / "models--oRg--mOdEl"
    assert sh("cat", str(repo / "refs" / "main")) == commit  # no trailing newline
    listing = sh("ls", "-R", str(repo))
    for name in ("blobs", "refs", "snapshots", "trees", commit, "notes.txt", *[Path(n).name for n in files]):
        assert name in listing
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        target = sh("readlink", str(snapshot / name))
        depth = name.count("/")
        assert target.startswith("../" * (depth + 2) + "blobs/") and not target.startswith("../" * (depth + 3))
        # Final size through the link, and isfile, before a single byte was fetched.
        assert sh("stat", "-L", "-c", "%s %F", str(snapshot / name)).strip() == f"{len(data)} regular file"
        assert (snapshot / name).is_file()
    assert sh("stat", "-c", "%F", str(snapshot / NESTED)).strip() == "symbolic link"
    tree = json.loads(sh("cat", str(repo / "trees" / f"{commit}.json")))
    assert tree["format_version"] == 1 and set(tree["files"]) == set(files)
    assert hub.bytes_served() == 0

    shard = "model-00002-of-00003.safetensors"
    out = subprocess.run(["cat", str(snapshot / shard)], capture_output=True, timeout=30).stdout
    assert out == files[shard]
    out = subprocess.run(["cat", str(snapshot / NESTED)], capture_output=True, timeout=30).stdout
    assert out == NESTED_BYTES
    assert_each_served_once(hub, files, [shard, NESTED])
    assert hub.bytes_served() == len(files[shard]) + len(NESTED_BYTES)


@pytest.mark.timeout(180)
def test_existing_cache_as_backing_is_reused(
    hub: HubEmulator, model: dict, mount_hub_cache: Callable[..., Mounted], tmp_path: Path
) -> None:
    """A real cache filled by plain hf_hub_download (other casing) becomes the backing: no refetch."""
    files: dict[str, bytes] = model["files"]
    backing = tmp_path / "real-cache"
    pre = ["config.json", "model-00001-of-00003.safetensors"]
    script = "from huggingface_hub import hf_hub_download as d\nfor f in {pre!r}: d('org/model', f)"
    env = dict(os.environ, HF_HUB_CACHE=str(backing))
    subprocess.run([sys.executable, "-c", script.format(pre=pre)], env=env, check=True, timeout=60)
    assert repo_folders(backing) == ["models--org--model"]
    served_before = {name: hub.bytes_served(f"/{name}") for name in files}
    assert sorted(n for n, b in served_before.items() if b) == sorted(pre)

    m = mount_hub_cache(backing)
    names = sorted(files)
    jobs = [("Org/Model", names, "files"), ("ORG/MODEL", names, "snapshot")]
    for result in run_clients(m.mountpoint, jobs):
        assert result == {name: sha256(data) for name, data in files.items()}
    for name, data in files.items():
        assert hub.bytes_served(f"/{name}") == len(data), name  # pre-fetched ones: still once in total
    assert repo_folders(backing) == ["models--org--model"]  # the existing folder's casing wins
    assert repo_folders(m.mountpoint) == ["models--org--model"]


@pytest.mark.timeout(120)
def test_client_writes_land_in_the_backing(
    hub: HubEmulator, model: dict, mount_hub_cache: Callable[..., Mounted]
) -> None:
    """huggingface_hub's own writes (.no_exist markers, refs of a moved branch, locks, temp blobs
    renamed into place, the symlink probe) work through the mount and land in the backing."""
    m = mount_hub_cache()
    old = model["commit"]
    script = r"""
import sys
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.file_download import _CACHED_NO_EXIST
try:
    hf_hub_download("ORG/model", "missing.txt")
except EntryNotFoundError:
    pass
else:
    sys.exit("missing.txt was found")
assert try_to_load_from_cache("org/MODEL", "missing.txt") is _CACHED_NO_EXIST
print(open(hf_hub_download("org/model", "config.json", revision=sys.argv[1])).read())
"""
    env = dict(os.environ, HF_HUB_CACHE=str(m.mountpoint))
    result = subprocess.run([sys.executable, "-c", script, old], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.decode().strip() == model["files"]["config.json"].decode().strip()
    # The marker landed in the backing, under the one canonical folder, and shows in the view.
    assert (m.backing / "models--Org--Model" / ".no_exist" / old / "missing.txt").is_file()
    assert (m.mountpoint / "models--org--model" / ".no_exist" / old / "missing.txt").is_file()

    # main moves on upstream: the client rewrites refs/main (copied into the backing) and finds the
    # new commit's snapshot complete in the view; the changed file is fetched once, by the mount.
    new_config = b'{"model_type": "llama", "revised": true}'
    new = hub.add_repo("Org/Model", {"config.json": new_config}, parent="main")
    script = "from huggingface_hub import hf_hub_download as d; print(open(d('Org/Model', 'config.json')).read())"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.decode().strip() == new_config.decode()
    assert (m.backing / "models--Org--Model" / "refs" / "main").read_text() == new
    assert (m.mountpoint / "models--ORG--MODEL" / "refs" / "main").read_text() == new
    assert hub.bytes_served("/config.json") == len(model["files"]["config.json"]) + len(new_config)
    assert not list(m.backing.rglob("blobs/*"))  # no client-side download happened

    # The primitives huggingface_hub uses when it downloads itself, exercised through a case variant.
    script = r"""
import os, sys
from huggingface_hub.file_download import are_symlinks_supported
from huggingface_hub.utils import WeakFileLock
cache = os.environ["HF_HUB_CACHE"]
lock = os.path.join(cache, ".locks", "models--ORG--MODEL", "cafe.lock")
os.makedirs(os.path.dirname(lock), exist_ok=True)
with WeakFileLock(lock):
    blobs = os.path.join(cache, "models--oRG--Model", "blobs")
    with open(os.path.join(blobs, "cafe.0123abcd.incomplete"), "wb") as f:
        f.write(b"written by the client")
    os.replace(os.path.join(blobs, "cafe.0123abcd.incomplete"), os.path.join(blobs, "cafe"))
assert are_symlinks_supported(cache)
"""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert (m.backing / "models--Org--Model" / "blobs" / "cafe").read_bytes() == b"written by the client"
    assert (m.mountpoint / "models--org--model" / "blobs" / "cafe").read_bytes() == b"written by the client"
    assert repo_folders(m.backing) == ["models--Org--Model"]
    assert repo_folders(m.backing / ".locks") == ["models--Org--Model"]
    assert not [p for p in m.backing.iterdir() if p.name.startswith("tmp")]  # the probe cleaned up


@pytest.mark.timeout(60)
def test_snapshot_listings_follow_writes_through_any_casing(
    model: dict, mount_hub_cache: Callable[..., Mounted]
) -> None:
    """The kernel may keep a snapshot's listing (fuse_ops.py): a file a client adds or removes there, through
    this casing of the repo folder or another, shows in the next listing of every casing."""
    m = mount_hub_cache()
    upper, lower = (
        m.mountpoint / folder / "snapshots" / model["commit"] for folder in ("models--Org--Model", "models--org--model")
    )
    files = sorted(name for name in model["files"] if "/" not in name) + sorted(
        {n.split("/")[0] for n in model["files"] if "/" in n}
    )
    for _ in range(2):  # listed, then listed again (from what the kernel kept)
        assert sorted(os.listdir(upper)) == sorted(files)
        assert sorted(os.listdir(lower)) == sorted(files)
    (lower / "added.txt").write_bytes(b"written by a client")
    assert sorted(os.listdir(upper)) == sorted([*files, "added.txt"])
    assert sorted(os.listdir(lower)) == sorted([*files, "added.txt"])
    os.unlink(upper / "added.txt")
    assert sorted(os.listdir(lower)) == sorted(files)
    assert sorted(os.listdir(upper)) == sorted(files)


@pytest.mark.timeout(60)
def test_writing_a_virtual_entry_is_erofs(model: dict, mount_hub_cache: Callable[..., Mounted]) -> None:
    m = mount_hub_cache()
    repo = m.mountpoint / "models--Org--Model"
    snapshot = repo / "snapshots" / model["commit"]
    blob = snapshot.joinpath("config.json").resolve()
    for path, flags in ((blob, os.O_WRONLY), (snapshot / "config.json", os.O_RDWR), (blob, os.O_WRONLY | os.O_TRUNC)):
        with pytest.raises(OSError) as exc:
            os.close(os.open(path, flags))
        assert exc.value.errno == errno.EROFS, path
    for victim in (blob, snapshot / "config.json"):
        with pytest.raises(OSError) as exc:
            os.unlink(victim)
        assert exc.value.errno == errno.EROFS
    assert blob.read_bytes() == model["files"]["config.json"]  # still intact


@pytest.mark.timeout(60)
def test_unknown_repo_is_enoent(hub: HubEmulator, model: dict, mount_hub_cache: Callable[..., Mounted]) -> None:
    m = mount_hub_cache()
    for name in ("models--nobody--nothing", "datasets--Org--Model", "models--Org--Model--extra"):
        with pytest.raises(FileNotFoundError):
            os.stat(m.mountpoint / name)
    assert os.listdir(m.mountpoint) == []  # failed lookups did not invent folders
    with pytest.raises(FileNotFoundError):
        os.stat(m.mountpoint / "models--Org--Model" / "snapshots" / ("0" * 40))
    with pytest.raises(FileNotFoundError):
        os.stat(m.mountpoint / "models--Org--Model" / "refs" / "no-such-branch")
    env = dict(os.environ, HF_HUB_CACHE=str(m.mountpoint), HF_HUB_OFFLINE="1")
    script = "from huggingface_hub import hf_hub_download; hf_hub_download('nobody/nothing', 'config.json')"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "LocalEntryNotFoundError" in result.stderr


@pytest.mark.timeout(90)
def test_gated_repo_needs_a_token(hub: HubEmulator, mount_hub_cache: Callable[..., Mounted], hub_token: str) -> None:
    weights = os.urandom(32 * 1024)
    hub.add_repo("Org/Gated", {"config.json": "{}", "model.safetensors": weights}, gated=True)
    m = mount_hub_cache()
    snapshot = next((m.mountpoint / "models--org--gated" / "snapshots").iterdir())
    with pytest.raises(PermissionError):
        (snapshot / "model.safetensors").read_bytes()
    assert "this mount's token (--token-file at mount time) has no access to Org/Gated" in m.log_text()
    assert hub.bytes_served("/model.safetensors") == 0

    authorized = mount_hub_cache(token=hub_token)
    snapshot = next((authorized.mountpoint / "models--Org--Gated" / "snapshots").iterdir())
    assert (snapshot / "model.safetensors").read_bytes() == weights


@pytest.mark.timeout(60)
def test_several_backing_casings_show_as_one(
    hub: HubEmulator, model: dict, mount_hub_cache: Callable[..., Mounted], tmp_path: Path
) -> None:
    """Two case variants already in the backing: one deterministic name (sorted first), one directory."""
    backing = tmp_path / "two-casings"
    for name in ("models--org--model", "models--ORG--Model"):
        (backing / name / ".no_exist").mkdir(parents=True)
    (backing / "models--ORG--Model" / ".no_exist" / "marker").write_text("")
    m = mount_hub_cache(backing)
    assert os.listdir(m.mountpoint) == ["models--ORG--Model"]
    for variant in ("models--org--model", "models--Org--Model", "models--ORG--MODEL"):
        assert os.listdir(m.mountpoint / variant / ".no_exist") == ["marker"]
        assert (m.mountpoint / variant / "refs" / "main").read_text() == model["commit"]


@pytest.mark.timeout(90)
def test_other_revisions_resolve_on_demand_offline(
    hub: HubEmulator, model: dict, mount_hub_cache: Callable[..., Mounted]
) -> None:
    """An older commit and another branch, asked for offline on a cold mount, appear complete."""
    old = model["commit"]
    hub.add_repo("Org/Model", {"config.json": b'{"v": 2}'}, parent="main")  # main moves on
    branch = hub.add_repo("Org/Model", {"config.json": b'{"branch": "v1"}'}, revision="v1", parent=old)
    m = mount_hub_cache()
    script = r"""
import json, sys
from huggingface_hub import hf_hub_download, snapshot_download
out = {rev: open(hf_hub_download("org/MODEL", "config.json", revision=rev)).read() for rev in sys.argv[1:]}
out["snapshot"] = sorted(__import__("os").listdir(snapshot_download("ORG/model", revision=sys.argv[1])))
print(json.dumps(out))
"""
    env = dict(os.environ, HF_HUB_CACHE=str(m.mountpoint), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script, old, "v1"], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    out = json.loads(result.stdout)
    assert out[old] == model["files"]["config.json"].decode()
    assert out["v1"] == '{"branch": "v1"}'
    assert sorted(out["snapshot"]) == sorted({name.split("/")[0] for name in model["files"]})
    assert (m.mountpoint / "models--Org--Model" / "refs" / "v1").read_text() == branch
    with pytest.raises(FileNotFoundError):
        os.stat(m.mountpoint / "models--Org--Model" / "refs" / "v2")


def test_reads_across_request_boundaries(hub: HubEmulator, mount_hub_cache: Callable[..., Mounted]) -> None:
    # Requests are MAX_READ bytes (not a power of two, so that libfuse's spliced reply fits one pipe);
    # every read, whatever its size and alignment, must return exactly the file's bytes.
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/sys/fs/pipe-max-size") as f:
        pipe_max = int(f.read())
    assert MAX_READ % page == 0 and MAX_READ + 3 * page + 16 <= pipe_max  # header + libfuse's 3 pages
    data = os.urandom(3 * MAX_READ + 12345)
    hub.add_repo("org/big", {"model.safetensors": data})
    mp = mount_hub_cache().mountpoint
    folder = mp / "models--org--big"
    path = folder / "snapshots" / (folder / "refs" / "main").read_text() / "model.safetensors"
    out = subprocess.run(["dd", f"if={path}", "bs=4M"], capture_output=True, check=True, timeout=60).stdout
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, size in [(MAX_READ - 1, 2), (MAX_READ, MAX_READ), (2 * MAX_READ - 7, 2 * MAX_READ), (0, 1)]:
            assert os.pread(fd, size, offset) == data[offset : offset + size], (offset, size)
    finally:
        os.close(fd)
