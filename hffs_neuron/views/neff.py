"""NEFF view: a Storage Bucket's flat Neuron compile-cache layout, usable as NEURON_COMPILE_CACHE_URL.

Remote layout (depth counted from the mount root):

    0  neuronxcc-<compiler version>/
    1      MODULE_<graph hash>+<flags hash>/      (anything else here is the per-model area)
    2          model.hlo_module.pb, compile_flags.json, model.neff, model.done, ...

Poison never crosses: remote `*.lock` files and `model.log` are hidden, `model.done` is shown only next
to a `model.neff`, and a module left with nothing visible (a failed compile) does not exist at all. The
per-model area is hidden unless `show_model_area` (then it is read-only).

Writes land in a local layer that merges over the bucket (see `MergedView`); deleting a remote entry
records a whiteout so it stays hidden across remounts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import posixpath
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from cachetools import LRUCache

from ..errors import IntegrityError, MountError, RemoteNotFound
from ..remote.base import Remote, RemoteEntry
from ..store.blobstore import BlobStore, blob_key
from ..store.metacache import MetadataCache
from .creators import Caller
from .layer_events import LayerEvents
from .localfs import LocalTree
from .merged import FileHandle, MergedView, VNode, fs_error
from .neff_names import MODULE_PREFIX, VERSION_PREFIX, is_lock_name

if TYPE_CHECKING:
    from .neff_probe import NameProber

logger = logging.getLogger(__name__)

# Up to this many not-yet-listed modules, a readdir lists each to hide failed ones.
EAGER_MODULE_CHECKS = 64
# Directory fds of the local layer kept open (the modules being compiled, their version directories).
LAYER_DIR_FDS = 256


def is_module_complete(names: set[str]) -> bool:
    """A compiled entry is complete when its NEFF and done marker exist and nothing says otherwise."""
    return "model.neff" in names and "model.done" in names and "model.log" not in names


class NeffView(LayerEvents, MergedView):
    hides_virtual = True
    layer_keep_cache = True  # the layer lives in the private cache dir; only the mount changes it
    #: Probe mode (`NameProber`, set by the daemon): names published upstream after a listing was cached.
    prober: NameProber | None = None
    #: Event mode (set by the daemon): True while the bucket's event feed keeps cached listings current;
    #: probes are then not needed.
    events_live: Callable[[], bool] = staticmethod(lambda: False)

    def __init__(
        self,
        remote: Remote,
        store: BlobStore,
        meta: MetadataCache,
        state_dir: str | os.PathLike,
        *,
        read_only: bool = False,
        show_model_area: bool = False,
        listing_ttl: float | None = None,
        private: bool = False,
        group_gid: int | None = None,
    ):
        self.state_dir = os.fspath(state_dir)
        # The layer changes only through this view: directory fds may be kept (see LocalTree).
        tree = LocalTree(self.state_dir, dir_cache=LAYER_DIR_FDS)
        self._lock_fd = _lock_layer(tree, self.state_dir)
        super().__init__(tree, upper="upper", tmp="tmp", state=tree, read_only=read_only, group_gid=group_gid)
        self.remote = remote
        self.store = store
        self.meta = meta
        self.show_model_area = show_model_area
        self.listing_ttl = listing_ttl
        self.private = private
        self._hidden, self._opaque_dirs = self._load_whiteouts()
        self._wh_lock = threading.Lock()
        self._visible_memo: LRUCache = LRUCache(maxsize=4096)
        self._children_memo: LRUCache = LRUCache(maxsize=1024)
        self._memo_lock = threading.Lock()

    def close(self) -> None:
        super().close()
        os.close(self._lock_fd)  # releases the layer for the next mount

    # -- remote side, filtered ------------------------------------------------------------------
    def _remote_listing(self, path: str) -> dict[str, RemoteEntry]:
        """Raw remote children of `path`, cached for the listing TTL."""

        def load() -> dict[str, RemoteEntry]:
            self.bump_generation()
            try:
                return {e.name: e for e in self.remote.list(path)}
            except RemoteNotFound:
                return {}

        listing = self.meta.get(self._listing_key(path), load, ttl=self.listing_ttl)
        return self.prober.listing(path, listing) if self.prober else listing

    # -- upstream changes (event mode) ----------------------------------------------------------
    def apply_remote_change(self, path: str, entry: RemoteEntry | None, *, partial: bool = False) -> list[str]:
        """File `path` was added or changed upstream (`entry`) or deleted (None): edit the cached listings
        that show it, without relisting. `partial`: `entry` lacks fields the change did not report, so the
        parent's listing (a module's: small) is dropped and reloaded on the next lookup instead.

        Returns the paths whose kernel caches must be dropped (the file and its directories).
        """
        parent, name = posixpath.split(path)
        if entry is None:
            self._edit_listing(parent, lambda listing: {n: e for n, e in listing.items() if n != name})
            directory = parent
            while directory and self.meta.peek(self._listing_key(directory)) == {}:  # left empty: gone
                up, gone = posixpath.split(directory)
                self._edit_listing(up, lambda listing, gone=gone: {n: e for n, e in listing.items() if n != gone})
                directory = up
        elif partial:
            self.meta.update(self._listing_key(parent), lambda _listing: None)
        else:
            self._seed_new_directories(parent)
            self._edit_listing(parent, lambda listing: {**listing, name: entry})
        if entry is not None:  # its directories exist now (bucket directories are implicit)
            directory = parent
            while directory:
                up, child = posixpath.split(directory)
                dir_entry = RemoteEntry(path=directory, is_dir=True, mtime=entry.mtime)
                self._edit_listing(
                    up,
                    lambda listing, child=child, d=dir_entry: listing if child in listing else {**listing, child: d},
                )
                directory = up
        self.bump_generation()
        affected = [path]
        directory = path
        while directory:
            directory = posixpath.dirname(directory)
            affected.append(directory)
        return affected

    def _seed_new_directories(self, directory: str) -> None:
        """Cache an empty listing for each directory of `directory` (top down) that its parent's cached
        listing lacks: it is new upstream, so every file in it arrives through the feed, which fills the
        listing. Without this each node that follows the bucket would list a module another node just
        published on its next lookup (one tree listing per module per node)."""
        chain = []
        while directory:
            chain.append(directory)
            directory = posixpath.dirname(directory)
        for directory in reversed(chain):
            up, child = posixpath.split(directory)
            above = self.meta.peek(self._listing_key(up))
            if isinstance(above, dict) and child not in above:
                self.meta.get(self._listing_key(directory), dict, ttl=self.listing_ttl)  # no-op if cached

    def forget_listings(self) -> None:
        """Drop every cached listing (the event feed lost track: the next lookups relist)."""
        namespace = self.remote.cache_namespace
        self.meta.invalidate(lambda key: isinstance(key, tuple) and key[:2] == (namespace, "list"))
        self.bump_generation()

    def _edit_listing(self, path: str, change: Callable[[dict[str, RemoteEntry]], dict[str, RemoteEntry]]) -> None:
        # A new dict each time: memos compare listings by identity.
        self.meta.update(self._listing_key(path), change)

    def _is_model_area(self, path: str) -> bool:
        parts = path.split("/")
        return len(parts) >= 2 and parts[0].startswith(VERSION_PREFIX) and not parts[1].startswith(MODULE_PREFIX)

    def _visible_children(self, path: str) -> dict[str, RemoteEntry]:
        """Remote children of `path` after the poison and model-area rules.

        Memoized per listing object: every lookup in a 10,000-module directory would otherwise refilter
        the whole listing.
        """
        listing = self._remote_listing(path)
        with self._memo_lock:
            memo = self._visible_memo.get(path)
        if memo is not None and memo[0] is listing:
            return memo[1]
        visible = self._filter_listing(path, listing)
        with self._memo_lock:
            self._visible_memo[path] = (listing, visible)
        return visible

    def _filter_listing(self, path: str, listing: dict[str, RemoteEntry]) -> dict[str, RemoteEntry]:
        depth = 0 if not path else path.count("/") + 1
        parts = path.split("/") if path else []
        in_module = depth == 2 and parts[0].startswith(VERSION_PREFIX) and parts[1].startswith(MODULE_PREFIX)
        visible = {}
        for name, entry in listing.items():
            if not entry.is_dir and is_lock_name(name):
                continue
            child = f"{path}/{name}" if path else name
            if self._is_model_area(child) and not self.show_model_area:
                continue
            if in_module and name == "model.log":
                continue
            visible[name] = entry
        if in_module:
            if "model.neff" not in listing:
                visible.pop("model.done", None)
                if "model.log" in listing:  # a failed compile: nothing of it crosses
                    visible = {}
        return visible

    def _module_is_empty(self, path: str) -> bool:
        return not self._visible_children(path)

    def virtual_lookup(self, path: str) -> VNode | None:
        if not path:
            return VNode("dir")
        parent, name = posixpath.split(path)
        if parent and self.virtual_lookup(parent) is None:
            # Below a directory the bucket does not have (a new module, a compiler's scratch tree): no
            # listing to ask for, however deep the path (each level's answer is a cached listing).
            return None
        entry = self._visible_children(parent).get(name)
        if entry is None and self.prober is not None and not self.events_live() and self.prober.probe(parent, name):
            self.bump_generation()
            entry = self._visible_children(parent).get(name)
        if entry is None:
            return None
        if entry.is_dir:
            if self._is_module_dir(path) and self._module_is_empty(path):
                return None  # poisoned or lock-only module: as if absent
            return VNode("dir", mtime_ns=_ns(entry.mtime))
        return VNode("file", size=entry.size, mtime_ns=_ns(entry.mtime), mode=0o644)

    def virtual_children(self, path: str) -> dict[str, VNode]:
        children = self._visible_children(path)
        # Reused until the listing or any module listing changes (every load bumps the generation).
        with self._memo_lock:
            memo = self._children_memo.get(path)
        if memo is not None and memo[0] is children and memo[1] == self.generation_ns:
            return memo[2]
        generation = self.generation_ns
        out = self._build_children(path, children)
        with self._memo_lock:
            self._children_memo[path] = (children, generation, out)
        return out

    def _build_children(self, path: str, children: dict[str, RemoteEntry]) -> dict[str, VNode]:
        modules = [f"{path}/{n}" for n, e in children.items() if e.is_dir and self._is_module_dir(f"{path}/{n}")]
        # Hiding failed modules needs their listings. A small directory is checked in full so that
        # `ls` never shows a name that then does not exist; a huge one (thousands of modules) is not
        # listed module by module just for a readdir: there only modules already known are filtered.
        unknown = {m for m in modules if self.meta.peek(self._listing_key(m)) is None}
        check_all = len(unknown) <= EAGER_MODULE_CHECKS
        out = {}
        for name, entry in children.items():
            child = f"{path}/{name}" if path else name
            if entry.is_dir:
                if self._is_module_dir(child) and (check_all or child not in unknown):
                    if self._module_is_empty(child):
                        continue
                out[name] = VNode("dir", mtime_ns=_ns(entry.mtime))
            else:
                out[name] = VNode("file", size=entry.size, mtime_ns=_ns(entry.mtime), mode=0o644)
        return out

    def _listing_key(self, path: str) -> tuple:
        return (self.remote.cache_namespace, "list", path)

    @staticmethod
    def _is_module_dir(path: str) -> bool:
        parts = path.split("/")
        return len(parts) == 2 and parts[0].startswith(VERSION_PREFIX) and parts[1].startswith(MODULE_PREFIX)

    def virtual_open(self, path: str, node: VNode) -> FileHandle:
        parent, name = posixpath.split(path)
        entry = self._visible_children(parent).get(name)
        if entry is None or entry.is_dir:
            raise fs_error(errno.ENOENT)
        try:
            return self._open_entry(entry)
        except IntegrityError:
            # The bytes upstream are not the listed ones: the file was replaced after it was listed (two
            # nodes publishing one module at once: the second upload replaces the first's files before its
            # re-list finds the conflict). Open what the bucket holds now, once; the feed or the TTL brings
            # the kernel's attributes along.
            fresh = self.remote.stat(path)
            if fresh.content_id is None or fresh.content_id == entry.content_id:
                raise
            logger.info("%s was replaced upstream since it was listed; opening the new content", path)
            self.apply_remote_change(path, fresh)
            return self._open_entry(fresh)

    def _open_entry(self, entry: RemoteEntry) -> FileHandle:
        key = entry.content_id or f"{self.remote.cache_namespace}|{entry.path}|{entry.size}|{entry.mtime}"
        fd, unpin = self.store.open_blob(blob_key(key), self.remote, entry)
        return FileHandle(fd=fd, keep_cache=True, on_release=unpin)

    # -- local layer rules ----------------------------------------------------------------------
    def can_copy_up(self, path: str, node: VNode) -> bool:
        return True  # remote files become local ones when modified (model-area writes stop earlier)

    def check_write(self, path: str, caller: Caller | None) -> None:
        super().check_write(path, caller)
        if self._is_model_area(path):
            raise fs_error(errno.EROFS)

    def policy_mode(self, path: str, is_dir: bool) -> int | None:
        """Shared-host semantics, like /tmp: every user's compiler creates version and module
        directories and their files (sticky: only their creator or the owner removes them), and opens
        the root `lock` for writing."""
        if is_dir and (not path or self._is_version_dir(path) or self._is_module_dir(path)):
            return 0o1777
        if path == "lock" and not is_dir:
            return 0o666
        return None

    def owned_by_mount(self, path: str, is_dir: bool) -> bool:
        """Version and module directories are the owner's whoever creates them: with the sticky bit,
        the kernel then lets each user remove only their own files there, never the bucket's or another
        user's, nor the directory itself."""
        return is_dir and (not path or self._is_version_dir(path) or self._is_module_dir(path))

    def trust_scope(self, path: str) -> str | None:
        parts = path.split("/")
        if len(parts) > 2 and parts[0].startswith(VERSION_PREFIX) and parts[1].startswith(MODULE_PREFIX):
            return f"{parts[0]}/{parts[1]}"
        return None

    def adjust_attrs(self, path: str, attrs: dict) -> None:
        super().adjust_attrs(path, attrs)
        if self.private and not path:
            self.restrict(attrs)  # a private bucket: nobody else gets past the root

    @staticmethod
    def _is_version_dir(path: str) -> bool:
        return "/" not in path and path.startswith(VERSION_PREFIX)

    # -- whiteouts (persisted so deletions survive remounts) ------------------------------------
    def _load_whiteouts(self) -> tuple[set[str], set[str]]:
        try:
            fd = self.local.open(_WHITEOUTS, os.O_RDONLY)
        except FileNotFoundError:
            return set(), set()
        try:
            with os.fdopen(fd) as f:
                data = json.load(f)
            return set(data.get("hidden", [])), set(data.get("opaque", []))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable whiteout file in %s: %s", self.state_dir, exc)
            return set(), set()

    def _save_whiteouts(self) -> None:
        tmp = f"{_WHITEOUTS}.tmp"  # one writer: the layer lock admits one mount, _wh_lock one thread
        fd = self.local.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"hidden": sorted(self._hidden), "opaque": sorted(self._opaque_dirs)}, f)
            f.flush()
            os.fsync(f.fileno())
        self.local.rename(tmp, _WHITEOUTS)

    def _opaque_above(self, path: str) -> bool:
        parent = posixpath.dirname(path)
        while parent:
            if parent in self._opaque_dirs or parent in self._hidden:
                return True
            parent = posixpath.dirname(parent)
        return False

    def is_hidden(self, path: str) -> bool:
        return path in self._hidden or self._opaque_above(path)

    def hidden_children(self, path: str) -> set[str]:
        prefix = f"{path}/" if path else ""
        return {h[len(prefix) :] for h in self._hidden if h.startswith(prefix) and "/" not in h[len(prefix) :]}

    def _opaque(self, path: str) -> bool:
        return path in self._opaque_dirs

    def hide(self, path: str) -> None:
        with self._wh_lock:
            self._hidden.add(path)
            self._save_whiteouts()

    def unhide(self, path: str, *, opaque: bool) -> None:
        with self._wh_lock:
            if path not in self._hidden and not opaque:
                return
            self._hidden.discard(path)
            if opaque:
                self._opaque_dirs.add(path)
            self._save_whiteouts()


_WHITEOUTS = "whiteouts.json"


def _lock_layer(tree: LocalTree, state_dir: str) -> int:
    """Hold the layer's lock for the life of the mount: a second mount of the same bucket and prefix
    on this host would keep its own whiteouts and lose the other's deletions (layers are per host)."""
    fd = tree.open("mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise MountError(
            f"this bucket and prefix are already mounted on this host (daemon pid {holder}, layer {state_dir}): "
            "unmount that mount first, or use another --cache-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _ns(seconds: float | None) -> int:
    return int(seconds * 1e9) if seconds else 0
