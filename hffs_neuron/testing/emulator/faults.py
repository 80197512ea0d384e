"""Fault injection: rules matched against request paths, applied by the server before or while answering."""

from __future__ import annotations

import dataclasses
import fnmatch
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass

FAULT_KINDS = ("latency", "stall", "status", "reset", "truncate", "corrupt", "blackhole", "trickle", "ignore_range")
#: Faults decided before the request is read: matched on its first line, peeked at without reading it.
CONNECTION_KINDS = frozenset({"blackhole"})
#: Faults decided before the response is chosen.
PRE_KINDS = frozenset({"latency", "stall", "status"})
#: Faults that change how the request is answered: ``ignore_range`` answers a ranged request in full
#: (200 and the whole body), as a proxy that drops ``Range`` does; it only counts for ranged requests.
ANSWER_KINDS = frozenset({"ignore_range"})
#: Faults that damage or slow a response body.
BODY_KINDS = frozenset({"reset", "truncate", "corrupt", "trickle"})


@dataclass
class FaultRule:
    """One fault registered with :meth:`FaultInjector.add`; ``fired`` counts its applications."""

    pattern: str
    kind: str
    count: int | None = None
    rate: float | None = None
    seconds: float = 0.0
    status: int = 503
    retry_after: float | None = None
    methods: tuple[str, ...] = ("GET", "HEAD")
    rate_bps: float | None = None
    fired: int = 0


class FaultInjector:
    """Thread-safe registry of faults applied to requests whose URL path matches a pattern.

    Kinds ``latency``, ``stall`` and ``status`` apply to any request. ``reset``, ``truncate`` and
    ``corrupt`` damage a response body, so they only apply (and only count) when a non-empty body
    is sent: a ``HEAD`` passes through untouched and the following ``GET`` gets the fault; so does
    ``trickle``, which sends normal headers, then the body at ``rate_bps`` bytes/s (``0``: nothing),
    closing the connection after ``seconds`` if the body is not through by then. ``blackhole`` holds
    the connection for ``seconds`` without reading the request or answering, then closes it.
    Connection-holding kinds need a positive ``seconds``, so every held connection ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._random = random.Random(0)

    def add(
        self,
        pattern: str,
        kind: str,
        *,
        count: int | None = None,
        rate: float | None = None,
        seconds: float = 0.0,
        status: int = 503,
        retry_after: float | None = None,
        methods: Iterable[str] = ("GET", "HEAD"),
        rate_bps: float | None = None,
    ) -> FaultRule:
        """Register a fault for URL paths matching the fnmatch ``pattern``; return it (for :meth:`remove`).

        ``count`` limits it to the next N matching requests, ``rate`` applies it with that
        probability (see :meth:`seed`); with neither it applies to every matching request.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if kind in ("blackhole", "trickle") and not float(seconds) > 0:
            raise ValueError(f"a {kind} fault needs seconds > 0 (how long it may hold the connection)")
        if kind == "trickle" and not (rate_bps is not None and float(rate_bps) >= 0):
            raise ValueError("a trickle fault needs rate_bps >= 0")
        rule = FaultRule(
            pattern=pattern,
            kind=kind,
            count=count,
            rate=rate,
            seconds=float(seconds),
            status=int(status),
            retry_after=retry_after,
            methods=tuple(m.upper() for m in methods),
            rate_bps=float(rate_bps) if rate_bps is not None else None,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: FaultRule) -> None:
        """Remove one fault :meth:`add` returned, leaving the others (tests that run cases side by side)."""
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._rules.clear()

    def seed(self, n: int) -> None:
        """Reseed the generator used by ``rate`` faults, for reproducible runs."""
        with self._lock:
            self._random.seed(n)

    def rules(self) -> list[FaultRule]:
        """Copies of the registered rules (with their ``fired`` counters)."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._rules]

    def take(self, path: str, method: str, kinds: Iterable[str]) -> FaultRule | None:
        """Return (and count) the first rule of one of ``kinds`` that fires for this request."""
        kinds = frozenset(kinds)
        with self._lock:
            for rule in self._rules:
                if rule.kind not in kinds or method not in rule.methods:
                    continue
                if not fnmatch.fnmatchcase(path, rule.pattern):
                    continue
                if rule.count is not None and rule.fired >= rule.count:
                    continue
                if rule.rate is not None and self._random.random() >= rule.rate:
                    continue
                rule.fired += 1
                return dataclasses.replace(rule)
        return None
