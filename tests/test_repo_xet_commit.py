"""Publishing to a repo source with Xet on, as against today's Hub: huggingface_hub's `create_commit` uploads the
LFS files through hf_xet (the repo's `xet-write-token`, then xorbs and shards to the emulator's CAS, no LFS
`PUT`), and the commit names them by sha256, which the emulator maps to the Xet file its shard named
(hffs_neuron/testing/emulator/commits.py). Read back over Xet by a second mount and over `resolve`.

The publishing daemon and the reading mount run with Xet on (the suite's environment disables it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import Mounts
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download
from huggingface_hub.errors import BadRequestError
from huggingface_hub.lfs import post_lfs_batch_info
from huggingface_hub.utils import get_session
from test_repo_source import REPO, SOURCE, _compile, _sha
from test_repo_source import repo as repo  # noqa: F401 - the `repo` fixture
from test_xet_path import state_of
from test_xet_path import xet_env as xet_env  # noqa: F401 - the `xet_env` fixture

from hffs_neuron.store.verify import xet_hash
from hffs_neuron.testing.hub_emulator import HubEmulator

pytestmark = pytest.mark.timeout(180)


def test_publish_to_a_repo_uploads_through_the_cas(
    hub: HubEmulator, repo: dict, mounts: Mounts, hub_token: str, xet_env: dict[str, str], tmp_path: Path
) -> None:
    mp = Path(mounts("neff", SOURCE, token=hub_token, publish=True, commit_interval=1, env=xet_env).mountpoint)
    first = len(hub.commits.log)
    neffs = {_compile(mp, f"MODULE_{i}3333333333333333333+ccccccc{i}", os.urandom(300_000 + i)): i for i in range(2)}
    deadline = time.monotonic() + 60
    while (publish := state_of(mp)["publish"])["published"] < len(neffs):
        assert not publish["failed"] and time.monotonic() < deadline, publish
        time.sleep(0.2)

    # Through the CAS: a write token from the repo's route, xorbs and shards, and no LFS upload.
    tokens = hub.requests(f"/api/models/{REPO}/xet-write-token/main")
    assert tokens and all(r.status == 200 for r in tokens)
    assert any(r.status == 200 for r in hub.requests("/v1/xorbs/default/", method="POST"))
    assert any(r.status == 200 for r in hub.requests("/v1/shards", method="POST"))
    assert hub.requests("/_lfs/", method="PUT") == []
    # The commits: every module's files, then its done marker in a later commit.
    commits = hub.commits.log[first:]
    for module in neffs:
        neff_at = next(i for i, (_, _, paths) in enumerate(commits) if f"{module}/model.neff" in paths)
        done_at = next(i for i, (_, _, paths) in enumerate(commits) if f"{module}/model.done" in paths)
        assert done_at > neff_at, commits

    fresh = Path(mounts("neff", SOURCE, name="fresh", cache="fresh-cache", env=xet_env).mountpoint)
    for module in neffs:
        local = mp / module / "model.neff"
        content, expected_hash = local.read_bytes(), xet_hash(local)
        # The tree answer carries the Xet hash the client uploaded, and the second mount (Xet on) reads the
        # same bytes from the CAS under that hash.
        (info,) = HfApi(endpoint=hub.url).get_paths_info(REPO, [f"{module}/model.neff"])
        assert info.xet_hash == expected_hash and info.lfs is not None and info.lfs.sha256 == _sha(content)
        before = hub.bytes_served(expected_hash)
        assert (fresh / module / "model.neff").read_bytes() == content
        assert hub.bytes_served(expected_hash) > before
        # And the resolve route serves the same bytes (this process has Xet off: plain HTTP).
        path = hf_hub_download(REPO, f"{module}/model.neff", cache_dir=tmp_path / "hf")
        assert Path(path).read_bytes() == content
    assert state_of(fresh)["transfers"]["xet"]["count"] == len(neffs)


def test_lfs_batch_answers_the_xet_transfer_when_offered(hub: HubEmulator, repo: dict, hub_token: str) -> None:
    (upload,) = [CommitOperationAdd("x/model.neff", os.urandom(1000)).upload_info]

    def batch(transfers: list[str]) -> tuple[list[dict], str | None]:
        objects, errors, chosen = post_lfs_batch_info(
            [upload], token=hub_token, repo_type="model", repo_id=REPO, endpoint=hub.url, transfers=transfers
        )
        assert errors == []
        return objects, chosen

    objects, chosen = batch(["basic", "multipart", "xet"])
    assert chosen == "xet" and [o.get("actions") for o in objects] == [None]  # the client uploads to the CAS
    objects, chosen = batch(["basic", "multipart"])
    assert chosen == "basic" and "upload" in objects[0]["actions"]
    hub.xet = False
    objects, chosen = batch(["basic", "multipart", "xet"])
    assert chosen == "basic" and "upload" in objects[0]["actions"]


def test_xet_commits_need_write_access_and_matching_content(
    hub: HubEmulator, repo: dict, hub_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_route = f"{hub.url}/api/models/{REPO}/xet-write-token/main"
    assert get_session().get(token_route).status_code == 403
    assert get_session().get(token_route, headers={"Authorization": f"Bearer {hub_token}"}).status_code == 200
    # A client whose shard names another sha256 than the content's: the commit naming it is refused.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    lying = CommitOperationAdd("x/model.neff", os.urandom(50_000))
    lying.upload_info.sha256 = bytes.fromhex(_sha(b"other content"))
    first = len(hub.commits.log)
    with pytest.raises(BadRequestError, match="does not match its sha256"):
        HfApi(endpoint=hub.url, token=hub_token).create_commit(REPO, [lying], commit_message="lie")
    assert hub.requests("/v1/shards", method="POST") and len(hub.commits.log) == first
