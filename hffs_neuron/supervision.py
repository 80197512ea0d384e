"""Long-lived daemon threads: survive a bad round, and say so when one dies anyway.

A daemon thread that ends by an exception is silent: the mount keeps serving without its state file,
status socket, event feed, stale-lock reaping or publishing. So each such loop runs its rounds in
`one_round` (an exception is logged and the loop goes on), and each thread runs `watched` (started by
`thread`, or wrapping a library thread's `run`): if it still ends by an exception, the process-wide
registry keeps the error, the status reports it (`threads: {name: "ok" | error}`) and
`mountctl status --check` fails naming it. A thread that returns (closing, or a feature that stops by
design, like an event feed that is not served) leaves the registry: that is not a failure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

OK = "ok"

_lock = threading.Lock()
_health: dict[str, str] = {}  # thread name -> OK, or the error that ended it
_last_failure: dict[str, str] = {}  # round name -> its last error, so a persistent one is logged once


def thread(name: str, body: Callable[[], None]) -> threading.Thread:
    """A daemon thread `name` (not started yet) that runs `body` watched (see `watched`)."""

    def run() -> None:
        with watched(name):
            body()

    return threading.Thread(target=run, name=name, daemon=True)


@contextmanager
def watched(name: str) -> Iterator[None]:
    """Around the whole life of thread `name`: healthy while inside, its error recorded if it ends by one."""
    with _lock:
        _health[name] = OK
    try:
        yield
    except BaseException as exc:
        with _lock:
            _health[name] = f"{type(exc).__name__}: {exc}"[:500]
        logger.exception("thread %s died (mountctl status --check reports it)", name)
        if not isinstance(exc, Exception):
            raise
    else:
        with _lock:
            _health.pop(name, None)


@contextmanager
def one_round(what: str) -> Iterator[None]:
    """One round of a long-lived loop: an exception is logged and swallowed, so the loop goes on.

    The same error again in the next rounds is logged at debug level only (a loop every second must not
    fill the log); once a round succeeds, the next failure is logged in full again.
    """
    try:
        yield
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        with _lock:
            repeated = _last_failure.get(what) == error
            _last_failure[what] = error
        if repeated:
            logger.debug("%s failed again: %s", what, error)
        else:
            logger.exception("%s failed; going on", what)
    else:
        if what in _last_failure:
            with _lock:
                _last_failure.pop(what, None)


def every(interval: float, stop: threading.Event, what: str, body: Callable[[], None]) -> None:
    """Run `body` every `interval` seconds until `stop` is set, each run as `one_round(what)`."""
    while not stop.wait(interval):
        with one_round(what):
            body()


def forget(name: str) -> None:
    """Thread `name` is being stopped on purpose: no longer reported."""
    with _lock:
        _health.pop(name, None)


def health() -> dict[str, str]:
    """The `threads` section of the status: {name: "ok" or the error that ended it}."""
    with _lock:
        return dict(_health)


def dead(threads: dict[str, str]) -> dict[str, str]:
    """The threads of a status' `threads` section that are not healthy, with their errors."""
    return {name: error for name, error in threads.items() if error != OK}
