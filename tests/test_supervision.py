"""Daemon threads (issue 24): a round that raises is logged and the loop goes on; a thread that ends by an
exception anyway is reported by name with its error (the status `threads` section)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from hffs_neuron import supervision


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_round_that_raises_does_not_end_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    stop = threading.Event()

    def body() -> None:
        rounds.append(len(rounds))
        if len(rounds) in (1, 2):  # the same error twice: logged in full once
            raise RuntimeError("bad round")

    worker = supervision.thread("test-loop", lambda: supervision.every(0.01, stop, "test round", body))
    with caplog.at_level(logging.DEBUG, logger="hffs_neuron.supervision"):
        worker.start()
        wait_for(lambda: len(rounds) >= 5)
        assert worker.is_alive() and supervision.health()["test-loop"] == supervision.OK
        stop.set()
        worker.join(timeout=5)
    full = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(full) == 1 and "test round failed" in full[0].getMessage()
    assert "test-loop" not in supervision.health()  # it returned: stopped on purpose, not dead


def test_a_thread_that_dies_is_reported_with_its_error() -> None:
    def body() -> None:
        raise ValueError("the loop itself broke")

    worker = supervision.thread("test-dies", body)
    worker.start()
    worker.join(timeout=5)
    try:
        assert supervision.health()["test-dies"] == "ValueError: the loop itself broke"
        assert supervision.dead(supervision.health()) == {"test-dies": "ValueError: the loop itself broke"}
    finally:
        supervision.forget("test-dies")
    assert "test-dies" not in supervision.health()
