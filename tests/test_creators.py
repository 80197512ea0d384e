"""The creator record of a local layer (issue 12 item 1): persisted, moved with renames, bounded."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hffs_neuron.proc import pid_start_time
from hffs_neuron.views import creators
from hffs_neuron.views.creators import Caller, CreatorLog
from hffs_neuron.views.localfs import LocalTree


def test_records_survive_a_restart_and_follow_renames(tmp_path: Path) -> None:
    tree = LocalTree(tmp_path / "layer")
    log = CreatorLog(tree)
    me = Caller(1234, 1234, os.getpid())
    log.record("v/MODULE_a/model.neff", me)
    log.record("v/MODULE_a/model.done", Caller(5, 5, 0))  # another pid namespace: unknown pid
    log.record("v/MODULE_b", me)
    log.move("v/MODULE_a", "v/MODULE_c")
    log.forget("v/MODULE_b")
    log.close()

    again = CreatorLog(tree)
    neff = again.get("v/MODULE_c/model.neff")
    assert neff is not None and (neff.uid, neff.pid, neff.start) == (1234, os.getpid(), pid_start_time(os.getpid()))
    assert neff.start > 0
    done = again.get("v/MODULE_c/model.done")
    assert done is not None and (done.pid, done.start) == (0, 0)
    assert again.get("v/MODULE_a/model.neff") is None and again.get("v/MODULE_b") is None
    assert stat.S_IMODE(os.stat(tmp_path / "layer" / "creators.jsonl").st_mode) == 0o600


def test_churn_does_not_grow_the_log_without_bound(tmp_path: Path) -> None:
    tree = LocalTree(tmp_path / "layer")
    log = CreatorLog(tree)
    me = Caller(1, 1, os.getpid())
    for i in range(3 * creators._COMPACT_SLACK):  # lock files created and removed all day
        log.record(f"m/{i % 10}.lock", me)
        log.forget(f"m/{i % 10}.lock")
    log.record("kept", me)
    lines = (tmp_path / "layer" / "creators.jsonl").read_text().splitlines()
    assert len(lines) <= creators._COMPACT_SLACK + 10
    log.close()
    assert CreatorLog(tree).get("kept") is not None
