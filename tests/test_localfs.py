"""LocalTree (issue 12 item 2): no path the daemon resolves under a local root follows a symlink.

Every test runs twice: through openat2 and through the component-by-component walk the daemon falls
back to where the kernel or a seccomp filter refuses openat2.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time
import timeit

import pytest

from hffs_neuron.views import localfs
from hffs_neuron.views.localfs import UTIME_NOW, UTIME_OMIT, LocalTree

# A symlink in the way: ELOOP from both resolvers; the contract also allows ENOTDIR, which a race can
# produce (the link was swapped back for a directory between the walk's open and its check).
BLOCKED = (errno.ELOOP, errno.ENOTDIR)
OUTSIDE_TEXT = b"outside secret"


def _kernel_has_openat2(tmp_path) -> bool:
    fd = os.open(tmp_path, os.O_PATH)
    try:
        localfs._openat2(fd, ".", os.O_PATH, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


@pytest.fixture(params=["openat2", "walk"])
def mode(request, monkeypatch, tmp_path):
    if request.param == "openat2":
        if not _kernel_has_openat2(tmp_path):
            pytest.skip("kernel has no openat2")
        monkeypatch.setattr(localfs, "_OPENAT2", True)
    else:
        monkeypatch.setattr(localfs, "_OPENAT2", False)
    return request.param


@pytest.fixture
def outside(tmp_path):
    """A directory next to the root holding one file: nothing may read, change or add to it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(OUTSIDE_TEXT)
    os.chmod(path / "secret", 0o600)
    return path


@pytest.fixture(params=[(0, 0.0), (4, 0.0), (0, 60.0)], ids=["uncached", "dir-cache", "absent-memo"])
def tree(mode, tmp_path, request):
    """A tree without and with a (small: evictions happen) cache of directory fds, and one that remembers
    missing directories far longer than any test runs (only its own changes may void that)."""
    dir_cache, absent_ttl = request.param
    t = LocalTree(tmp_path / "root", dir_cache=dir_cache, absent_ttl=absent_ttl)
    assert t._openat2 == (mode == "openat2")
    yield t
    t.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _snapshot(path) -> dict:
    """Names, modes, owners, sizes and mtimes of everything under `path` (not following links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
    return out


def _errno(call, *args, **kwargs) -> int:
    with pytest.raises(OSError) as info:
        call(*args, **kwargs)
    return info.value.errno


def _write(tree: LocalTree, rel: str, data: bytes) -> None:
    fd = tree.open(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(tree: LocalTree, rel: str) -> bytes:
    fd = tree.open(rel, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def test_root_is_created_owner_only_and_reused(tmp_path, mode):
    t = LocalTree(tmp_path / "a" / "b")
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700
    assert t.root == str(tmp_path / "a" / "b")
    t.close()
    t.close()  # idempotent
    with pytest.raises(FileNotFoundError):
        LocalTree(tmp_path / "missing", create_mode=None)


def test_basic_operations(tree):
    root = tree.root
    tree.mkdir("d", 0o755)
    _write(tree, "d/f", b"hello")
    assert _read(tree, "d/f") == b"hello"
    assert tree.lstat("d/f").st_size == 5
    assert stat.S_ISDIR(tree.lstat("").st_mode)
    assert tree.exists("d/f") and tree.exists("") and not tree.exists("d/nope")
    tree.symlink("../../etc/passwd", "d/link")
    assert tree.readlink("d/link") == "../../etc/passwd"  # stored verbatim
    assert sorted(tree.listdir("d")) == [("f", tree.lstat("d/f").st_mode), ("link", tree.lstat("d/link").st_mode)]
    assert stat.S_ISLNK(dict(tree.listdir("d"))["link"])
    assert [name for name, _ in tree.listdir("")] == ["d"]

    tree.chmod("d/f", 0o640)
    assert stat.S_IMODE(os.lstat(f"{root}/d/f").st_mode) == 0o640
    tree.chown("d/f", 1234, 4321)
    assert (os.lstat(f"{root}/d/f").st_uid, os.lstat(f"{root}/d/f").st_gid) == (1234, 4321)
    tree.utimens("d/f", ((1, 0), (2, 0)))
    assert os.lstat(f"{root}/d/f").st_mtime_ns == 2_000_000_000
    tree.utimens("d/f", ((3, 5), (0, UTIME_OMIT)))  # the mtime left as it is
    assert (os.lstat(f"{root}/d/f").st_atime_ns, os.lstat(f"{root}/d/f").st_mtime_ns) == (3_000_000_005, 2_000_000_000)
    tree.utimens("d/f", ((0, UTIME_OMIT), (0, UTIME_NOW)))
    assert os.lstat(f"{root}/d/f").st_atime_ns == 3_000_000_005
    assert os.lstat(f"{root}/d/f").st_mtime_ns > 2_000_000_000
    tree.utimens("d/f", None)
    assert os.lstat(f"{root}/d/f").st_atime_ns > 3_000_000_005
    tree.truncate("d/f", 2)
    assert _read(tree, "d/f") == b"he"

    tree.chmod("", 0o750)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o750
    tree.utimens("", ((0, 5), (5, 0)))
    assert os.stat(root).st_mtime_ns == 5_000_000_000
    tree.chown("", 0, 0)
    assert tree.statvfs().f_bsize > 0

    fd = tree.open("", os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    tree.unlink("d/link")
    tree.unlink("d/f")
    tree.rmdir("d")
    assert tree.listdir("") == []


def test_open_flags(tree):
    fd = tree.open("new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o4755)
    assert os.get_inheritable(fd) is False  # O_CLOEXEC always
    os.close(fd)
    # The mode is honoured (minus the umask); the kernel keeps setuid bits: the views strip them.
    assert tree.lstat("new").st_mode & 0o700 == 0o700
    assert _errno(tree.open, "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    # Unknown flag bits are ignored, as open(2) does, instead of openat2's EINVAL.
    fd = tree.open("new", os.O_RDONLY | 0x4000_0000)
    os.close(fd)


def test_errors(tree):
    _write(tree, "file", b"x")
    tree.mkdir("full", 0o755)
    _write(tree, "full/inner", b"y")
    assert _errno(tree.lstat, "nope") == errno.ENOENT
    assert _errno(tree.lstat, "nope/x") == errno.ENOENT
    assert _errno(tree.open, "nope/x", os.O_RDONLY) == errno.ENOENT
    assert _errno(tree.lstat, "file/x") == errno.ENOTDIR
    assert _errno(tree.open, "file/x", os.O_WRONLY | os.O_CREAT) == errno.ENOTDIR
    assert _errno(tree.mkdir, "file", 0o755) == errno.EEXIST
    assert _errno(tree.rmdir, "full") == errno.ENOTEMPTY
    assert _errno(tree.rmdir, "file") == errno.ENOTDIR
    assert _errno(tree.unlink, "full") in (errno.EISDIR, errno.EPERM)
    assert _errno(tree.listdir, "file") == errno.ENOTDIR
    assert _errno(tree.readlink, "file") == errno.EINVAL
    assert _errno(tree.truncate, "full", 0) == errno.EISDIR
    # The root itself: what the kernel answers for "/".
    assert _errno(tree.mkdir, "", 0o755) == errno.EEXIST
    assert _errno(tree.rmdir, "") == errno.EBUSY
    assert _errno(tree.unlink, "") == errno.EISDIR
    assert _errno(tree.rename, "", "x") == errno.EBUSY
    assert _errno(tree.rename, "file", "") == errno.EBUSY
    assert _errno(tree.readlink, "") == errno.EINVAL
    assert _errno(tree.symlink, "x", "") == errno.EEXIST


BAD_RELS = ["..", "../x", "a/../b", "a/..", ".", "./a", "a/.", "/etc", "/", "a//b", "a/", "a\0b"]


@pytest.mark.parametrize("rel", BAD_RELS)
def test_unsafe_rel_rejected(tree, rel, outside):
    ops = [
        lambda: tree.lstat(rel),
        lambda: tree.exists(rel),
        lambda: tree.open(rel, os.O_WRONLY | os.O_CREAT),
        lambda: tree.listdir(rel),
        lambda: tree.mkdir(rel, 0o755),
        lambda: tree.rmdir(rel),
        lambda: tree.unlink(rel),
        lambda: tree.rename(rel, "x"),
        lambda: tree.rename("x", rel),
        lambda: tree.symlink("t", rel),
        lambda: tree.readlink(rel),
        lambda: tree.chmod(rel, 0o777),
        lambda: tree.chown(rel, 1, 1),
        lambda: tree.utimens(rel, None),
        lambda: tree.truncate(rel, 0),
    ]
    for op in ops:
        with pytest.raises(ValueError):
            op()
    assert _errno(tree.lstat, "x") == errno.ENOENT  # nothing was created


def _link_targets(tree: LocalTree, outside) -> dict[str, str]:
    """Symlink targets of every flavour: absolute / relative, pointing outside / inside the root."""
    tree.mkdir("inside", 0o755)
    _write(tree, "inside/secret", b"inside")
    return {
        "abs-outside": str(outside),
        "rel-outside": os.path.relpath(outside, tree.root),
        "abs-inside": os.path.join(tree.root, "inside"),
        "rel-inside": "inside",
    }


def _ops_through(tree: LocalTree, prefix: str) -> list:
    """Every LocalTree call with `prefix` as a directory component of its path."""
    p = prefix
    return [
        lambda: tree.lstat(f"{p}/secret"),
        lambda: tree.open(f"{p}/secret", os.O_RDONLY),
        lambda: tree.open(f"{p}/secret", os.O_RDWR | os.O_TRUNC),
        lambda: tree.open(f"{p}/created", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: tree.listdir(f"{p}/sub"),
        lambda: tree.mkdir(f"{p}/newdir", 0o755),
        lambda: tree.rmdir(f"{p}/sub"),
        lambda: tree.unlink(f"{p}/secret"),
        lambda: tree.rename(f"{p}/secret", "stolen"),
        lambda: tree.rename("bait", f"{p}/planted"),
        lambda: tree.rename("bait", f"{p}/planted", noreplace=True),
        lambda: tree.symlink("/etc/passwd", f"{p}/planted-link"),
        lambda: tree.readlink(f"{p}/secret"),
        lambda: tree.chmod(f"{p}/secret", 0o777),
        lambda: tree.chown(f"{p}/secret", 1234, 1234),
        lambda: tree.utimens(f"{p}/secret", ((0, 1), (0, 1))),
        lambda: tree.truncate(f"{p}/secret", 0),
    ]


@pytest.mark.parametrize("flavour", ["abs-outside", "rel-outside", "abs-inside", "rel-inside"])
@pytest.mark.parametrize("depth", ["top", "nested"])
def test_symlink_in_a_directory_component_is_never_followed(tree, outside, flavour, depth):
    target = _link_targets(tree, outside)[flavour]
    (outside / "sub").mkdir()
    tree.mkdir("inside/sub", 0o755)
    _write(tree, "bait", b"bait")
    if depth == "nested":
        tree.mkdir("a", 0o755)
        tree.mkdir("a/b", 0o755)
        link = "a/b/link"
    else:
        link = "link"
    tree.symlink(target, link)
    before_out, before_in = _snapshot(outside), _snapshot(tree.root)

    for op in _ops_through(tree, link):
        assert _errno(op) == errno.ELOOP
    assert not tree.exists(f"{link}/secret")
    assert _errno(tree.listdir, link) in BLOCKED
    assert _snapshot(outside) == before_out
    assert _snapshot(tree.root) == before_in
    # Deeper below the link is blocked too.
    assert _errno(tree.open, f"{link}/sub/x", os.O_WRONLY | os.O_CREAT) == errno.ELOOP
    assert _snapshot(outside) == before_out


@pytest.mark.parametrize("flavour", ["abs-outside", "rel-outside", "abs-inside", "rel-inside"])
def test_symlink_as_last_component_is_never_followed(tree, outside, flavour):
    base = _link_targets(tree, outside)[flavour]
    target = os.path.join(base, "secret")
    tree.symlink(target, "link")
    tree.symlink(os.path.join(base, "absent"), "dangling")
    real_target = os.path.join(tree.root, target)  # resolves relative targets as the kernel would
    before = os.lstat(real_target)

    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_CREAT | os.O_APPEND):
        assert _errno(tree.open, "link", flags) == errno.ELOOP
    # O_CREAT through a dangling link creates nothing at its target.
    assert _errno(tree.open, "dangling", os.O_WRONLY | os.O_CREAT) == errno.ELOOP
    assert not os.path.lexists(os.path.join(tree.root, base, "absent"))
    assert _errno(tree.open, "link", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    assert _errno(tree.listdir, "link") in BLOCKED  # open(O_DIRECTORY|O_NOFOLLOW) of a link: ENOTDIR
    assert _errno(tree.chmod, "link", 0o777) == errno.EOPNOTSUPP
    assert _errno(tree.truncate, "link", 0) == errno.ELOOP
    # chown and utime act on the link itself (lchown, utimensat AT_SYMLINK_NOFOLLOW).
    tree.chown("link", 1234, 4321)
    tree.utimens("link", ((0, 7), (0, 7)))
    link_st = os.lstat(os.path.join(tree.root, "link"))
    assert (link_st.st_uid, link_st.st_gid, link_st.st_mtime_ns) == (1234, 4321, 7)

    after = os.lstat(real_target)
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_size, after.st_mtime_ns) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
        before.st_size,
        before.st_mtime_ns,
    )
    with open(real_target, "rb") as f:
        assert f.read() in (OUTSIDE_TEXT, b"inside")

    # The link is shown as a link and handled as one.
    assert stat.S_ISLNK(tree.lstat("link").st_mode)
    assert tree.exists("link") and tree.exists("dangling")
    assert tree.readlink("link") == target
    fd = tree.open("link", os.O_PATH)  # O_PATH|O_NOFOLLOW: the link itself
    assert stat.S_ISLNK(os.fstat(fd).st_mode)
    os.close(fd)
    tree.rename("link", "moved")
    assert tree.readlink("moved") == target
    tree.unlink("moved")
    assert os.path.exists(real_target)


def test_rename(tree):
    tree.mkdir("a", 0o755)
    tree.mkdir("b", 0o755)
    tree.mkdir("b/c", 0o755)
    _write(tree, "a/f", b"one")
    tree.rename("a/f", "b/c/g")
    assert _read(tree, "b/c/g") == b"one" and not tree.exists("a/f")
    tree.rename("b/c", "a/c2")  # a directory across directories
    assert _read(tree, "a/c2/g") == b"one"

    _write(tree, "a/x", b"new")
    _write(tree, "b/y", b"old")
    assert _errno(tree.rename, "a/x", "b/y", noreplace=True) == errno.EEXIST
    assert _read(tree, "b/y") == b"old" and _read(tree, "a/x") == b"new"
    tree.symlink("/nowhere", "b/dangling")
    assert _errno(tree.rename, "a/x", "b/dangling", noreplace=True) == errno.EEXIST  # a link counts
    tree.rename("a/x", "b/z", noreplace=True)
    assert _read(tree, "b/z") == b"new" and not tree.exists("a/x")
    tree.rename("b/z", "b/y")  # replaces
    assert _read(tree, "b/y") == b"new"
    assert _errno(tree.rename, "nope", "b/q") == errno.ENOENT
    assert _errno(tree.rename, "nope", "b/q", noreplace=True) == errno.ENOENT


def test_rename_noreplace_without_rename_flags(tree, monkeypatch):
    """Filesystems with no renameat2 flags (NFS: EINVAL): files and links still move without replacing."""

    def no_flags(*args):
        raise OSError(errno.EINVAL, "no rename flags here")

    monkeypatch.setattr(localfs, "_renameat2", no_flags)
    tree.mkdir("a", 0o755)
    tree.mkdir("b", 0o755)
    _write(tree, "a/f", b"one")
    _write(tree, "b/taken", b"old")
    tree.symlink("/nowhere", "a/link")
    assert _errno(tree.rename, "a/f", "b/taken", noreplace=True) == errno.EEXIST
    assert _read(tree, "b/taken") == b"old" and _read(tree, "a/f") == b"one"
    tree.rename("a/f", "b/f", noreplace=True)
    tree.rename("a/link", "b/link", noreplace=True)
    assert _read(tree, "b/f") == b"one" and tree.readlink("b/link") == "/nowhere"
    assert sorted(name for name, _ in tree.listdir("a")) == []
    assert tree.lstat("b/f").st_nlink == 1
    assert _errno(tree.rename, "a", "c", noreplace=True) == errno.EINVAL  # a directory cannot move this way


def test_swapping_a_directory_for_a_symlink_never_escapes(tree, outside):
    """Another thread keeps exchanging `d` with a symlink to the outside directory (atomically, with
    RENAME_EXCHANGE) while the tree creates, opens, renames and changes files under `d`."""
    root = tree.root
    os.mkdir(f"{root}/d")
    with open(f"{root}/d/secret", "wb") as f:
        f.write(b"inside")
    os.symlink(str(outside), f"{root}/evil")
    before = _snapshot(outside)
    stop = threading.Event()
    swaps = [0]

    def _create(rel: str) -> None:
        os.close(tree.open(rel, os.O_WRONLY | os.O_CREAT, 0o644))

    def _check_inside(rel: str) -> None:
        assert _read(tree, rel) == b"inside", "read a file outside the root"

    def swapper():
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        try:
            while not stop.is_set():
                localfs._renameat2(root_fd, "d", root_fd, "evil", 2)  # RENAME_EXCHANGE
                swaps[0] += 1
        finally:
            os.close(root_fd)

    thread = threading.Thread(target=swapper)
    thread.start()
    outcomes: dict[str, int] = {}
    try:
        for i in range(400):
            calls = [
                (_create, f"d/f{i}"),
                (_check_inside, "d/secret"),
                (tree.mkdir, f"d/m{i}", 0o755),
                (tree.symlink, "x", f"d/s{i}"),
                (tree.chmod, "d/secret", 0o644),
                (tree.utimens, "d/secret", ((0, i), (0, i))),
                (tree.truncate, "d/secret", 6),
                (tree.chown, "d/secret", 0, 0),
                (tree.rename, "d/secret", "d/secret"),
                (tree.listdir, "d"),
            ]
            for call, *args in calls:
                try:
                    call(*args)
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except OSError as exc:
                    assert exc.errno in (*BLOCKED, errno.EEXIST), exc
                    name = errno.errorcode[exc.errno]
                    outcomes[name] = outcomes.get(name, 0) + 1
    finally:
        stop.set()
        thread.join()
    assert _snapshot(outside) == before
    print(f"\nswap race ({'openat2' if tree._openat2 else 'walk'}): {swaps[0]} swaps, outcomes {outcomes}")


def test_thread_safety(tree):
    """Many threads at once, each in its own directory plus one shared one: no crossed fds, no leaks."""
    fds_before = len(os.listdir("/proc/self/fd"))
    tree.mkdir("shared", 0o755)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            mine = f"t{n}"
            tree.mkdir(mine, 0o755)
            for i in range(60):
                data = f"{n}-{i}".encode()
                _write(tree, f"{mine}/f", data)
                assert _read(tree, f"{mine}/f") == data
                assert tree.lstat(f"{mine}/f").st_size == len(data)
                tree.rename(f"{mine}/f", f"shared/{n}-{i}", noreplace=True)
                assert _read(tree, f"shared/{n}-{i}") == data
                tree.symlink(f"{n}", f"{mine}/l{i}")
                assert tree.readlink(f"{mine}/l{i}") == f"{n}"
                names = {name for name, _ in tree.listdir("shared")}
                assert f"{n}-{i}" in names
                tree.unlink(f"shared/{n}-{i}")
                tree.unlink(f"{mine}/l{i}")
            tree.rmdir(mine)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert tree.listdir("") == [("shared", tree.lstat("shared").st_mode)]
    assert tree.listdir("shared") == []
    tree.close()  # and with it any directory fds it keeps
    assert _fds() == fds_before - 1  # the root's


def test_no_fd_leaks_on_errors(tree, outside):
    tree.mkdir("a", 0o755)
    tree.mkdir("a/b", 0o755)
    tree.symlink(str(outside), "a/b/link")
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        _errno(tree.open, "a/b/link/secret", os.O_RDONLY)
        _errno(tree.lstat, "a/b/nope/x")
        _errno(tree.chmod, "a/b/link", 0o777)
        _errno(tree.rename, "a/b/nope", "a/b/x")
        _errno(tree.rename, "a/b", "a/b/link/x")
    assert _fds() == fds_before


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM])
def test_openat2_refused_falls_back_to_the_walk(tmp_path, monkeypatch, outside, err):
    """An old kernel (ENOSYS) or a seccomp filter that predates openat2 (EPERM): probed once, then walk."""
    calls = []

    def refused(*args):
        calls.append(args)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(localfs, "_OPENAT2", None)
    monkeypatch.setattr(localfs, "_openat2", refused)
    first = LocalTree(tmp_path / "one")
    second = LocalTree(tmp_path / "two")
    assert (first._openat2, second._openat2, len(calls)) == (False, False, 1)
    first.symlink(str(outside), "link")
    assert _errno(first.open, "link/x", os.O_WRONLY | os.O_CREAT) == errno.ELOOP
    assert os.listdir(outside) == ["secret"]
    first.close()
    second.close()


def test_openat2_probe_error_is_not_swallowed(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(localfs, "_OPENAT2", None)
    monkeypatch.setattr(localfs, "_openat2", broken)
    fds_before = len(os.listdir("/proc/self/fd"))
    assert _errno(LocalTree, tmp_path / "r") == errno.EACCES
    assert localfs._OPENAT2 is None
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_env_knob_forces_the_walk(tmp_path):
    code = "from hffs_neuron.views.localfs import LocalTree; import sys; print(LocalTree(sys.argv[1])._openat2)"
    env = {**os.environ, "HFFS_NO_OPENAT2": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_dir_cache_follows_renames_and_rmdirs(mode, tmp_path):
    """Directory fds kept by the cache never stand for a path that now names another directory (or none):
    renames and rmdirs through the tree drop them, and a symlink put in a directory's place is refused."""
    fds_before = _fds()
    tree = LocalTree(tmp_path / "root", dir_cache=8)
    try:
        tree.mkdir("v", 0o755)
        tree.mkdir("v/m", 0o755)
        _write(tree, "v/m/f", b"1")
        assert tree.lstat("v/m/f").st_size == 1  # v/m resolved and kept
        tree.rename("v/m", "v/moved")
        with pytest.raises(FileNotFoundError):
            tree.lstat("v/m/f")
        assert _read(tree, "v/moved/f") == b"1"
        tree.mkdir("v/m", 0o755)  # a new directory under the old name
        _write(tree, "v/m/g", b"22")
        assert sorted(os.listdir(os.path.join(tree.root, "v/m"))) == ["g"]
        assert sorted(n for n, _ in tree.listdir("v/moved")) == ["f"]
        tree.unlink("v/m/g")
        tree.rmdir("v/m")
        tree.symlink(os.path.join(tree.root, "v/moved"), "v/m")  # a link where the directory was
        assert _errno(tree.lstat, "v/m/f") in BLOCKED
        assert _errno(tree.open, "v/m/new", os.O_WRONLY | os.O_CREAT) in BLOCKED
        tree.unlink("v/m")
        tree.rename("v/moved", "v/m")  # renamed back: the old fd of v/moved is not used for v/m's parent
        tree.rename("v", "w")  # a parent moved: everything below it is resolved again
        assert _read(tree, "w/m/f") == b"1"
        with pytest.raises(FileNotFoundError):
            tree.lstat("v/m/f")
        for i in range(20):  # more directories than the cache holds: the oldest fds are closed
            tree.mkdir(f"w/d{i}", 0o755)
            _write(tree, f"w/d{i}/f", b"x")
        fds = _fds()
        for i in range(20):
            assert tree.lstat(f"w/d{i}/f").st_size == 1
        assert _fds() == fds  # at most 8 kept, and already open before this loop
    finally:
        tree.close()
    assert _fds() == fds_before  # the root's fd closed, and every kept directory fd with it


def test_missing_directories_remembered_show_at_once_when_made_through_the_tree(mode, tmp_path, outside):
    tree = LocalTree(tmp_path / "root", absent_ttl=0.5)
    try:
        for rel in ("a/b/f", "m/f", "s/f", "x/f"):
            with pytest.raises(FileNotFoundError):
                tree.lstat(rel)
        tree.mkdir("a", 0o755)
        tree.mkdir("a/b", 0o755)
        _write(tree, "a/b/f", b"1")
        assert tree.lstat("a/b/f").st_size == 1
        tree.mkdir("z", 0o755)
        _write(tree, "z/f", b"22")
        tree.rename("z", "m")
        assert tree.lstat("m/f").st_size == 2
        tree.symlink(str(outside), "s")  # a link where a directory was missing: refused, not "absent"
        assert _errno(tree.lstat, "s/f") in BLOCKED
        # Made behind the tree's back: shown once the memo's time is up.
        os.makedirs(os.path.join(tree.root, "x"))
        with open(os.path.join(tree.root, "x", "f"), "wb") as f:
            f.write(b"333")
        deadline = time.monotonic() + 5
        while True:
            try:
                assert tree.lstat("x/f").st_size == 3
                break
            except FileNotFoundError:
                assert time.monotonic() < deadline, "a directory made outside the tree never showed"
                time.sleep(0.05)
    finally:
        tree.close()


def test_overhead_report(tree):
    """Per-call cost of LocalTree against plain os calls (printed with -s; no timing asserts)."""
    tree.mkdir("a", 0o755)
    tree.mkdir("a/b", 0o755)
    tree.mkdir("a/b/c", 0o755)
    _write(tree, "a/b/c/f", b"x")
    path = os.path.join(tree.root, "a/b/c/f")
    n = 5000

    def per_call(fn) -> float:
        return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6

    rows = {
        "os.lstat": per_call(lambda: os.lstat(path)),
        "tree.lstat": per_call(lambda: tree.lstat("a/b/c/f")),
        "os.open+close": per_call(lambda: os.close(os.open(path, os.O_RDONLY))),
        "tree.open+close": per_call(lambda: os.close(tree.open("a/b/c/f", os.O_RDONLY))),
    }
    label = "openat2" if tree._openat2 else "walk"
    print(f"\nLocalTree overhead ({label}, depth 4):", ", ".join(f"{k} {v:.2f} us" for k, v in rows.items()))
