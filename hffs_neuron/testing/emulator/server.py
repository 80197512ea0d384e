"""The HTTP layer: threaded servers for the two origins ("hub" and "cdn"), request dispatch with fault
injection and accounting, the ``/_emulator/*`` control routes, and response writing (``sendfile``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hffs_neuron.testing.emulator.accounting import RequestRecord
from hffs_neuron.testing.emulator.faults import ANSWER_KINDS, BODY_KINDS, CONNECTION_KINDS, PRE_KINDS, FaultRule
from hffs_neuron.testing.emulator.network import NetworkProfile, Pacer
from hffs_neuron.testing.emulator.protocol import EmulatorHub, FileBody, HubError, Request, Response, json_response
from hffs_neuron.testing.emulator.xet_bridge import INTERNAL_HEADER

logger = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_CORRUPT_BYTES = 64
#: How much of a request the black-hole check peeks at: its first line, in practice.
_PEEK_BYTES = 8192
#: A trickle sends a write about this often (at least one byte each).
_TRICKLE_TICK_S = 0.1
_UNSHAPED = NetworkProfile()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256  # many parallel workers (e.g. 32 compile ranks) connect at once

    def __init__(self, address: tuple[str, int], emulator: EmulatorHub, role: str):
        self.emulator = emulator
        self.role = role  # "hub" or "cdn"
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can block for seconds without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut every open connection, so a stopped emulator no longer answers on pooled keep-alives."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hffs-hub-emulator/1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 120  # idle keep-alive connections eventually free their thread
    server: Server

    def setup(self) -> None:
        super().setup()
        self._pacer = Pacer(self.server.emulator.stop_event)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def handle_one_request(self) -> None:
        try:
            head = self.rfile.peek(_PEEK_BYTES)[:_PEEK_BYTES]
        except (TimeoutError, OSError):  # idle keep-alive or client gone: end it, as the normal path would
            self.close_connection = True
            return
        if self._blackholed(head):
            self.close_connection = True
            return
        super().handle_one_request()

    def _blackholed(self, head: bytes) -> bool:
        """Apply a ``blackhole`` fault to the next request, if one matches: hold the connection for the
        fault's ``seconds`` without reading the request (it stays in the socket buffer) or answering.

        The request line is peeked at, not read; one that has not fully arrived in the first segment
        passes through (requests from local clients arrive whole)."""
        line, sep, rest = head.partition(b"\r\n")
        parts = line.decode("latin-1").split()
        if not sep or len(parts) != 3 or INTERNAL_HEADER.lower().encode() in rest.lower():
            return False
        split = urlsplit(parts[1])
        path = unquote(split.path)
        if path.startswith("/_emulator/"):
            return False
        emu = self.server.emulator
        fault = emu.faults.take(path, parts[0], CONNECTION_KINDS)
        if fault is None:
            return False
        rec = emu.accounting.record(parts[0], path, split.query, None)
        rec.fault = fault.kind
        emu.stop_event.wait(fault.seconds)
        return True

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:  # LFS uploads (commits.py)
        self._dispatch()

    # -- request handling --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        emu = self.server.emulator
        split = urlsplit(self.path)
        raw_path, query = split.path, split.query
        path = unquote(raw_path)
        body = self._read_body()
        if path.startswith("/_emulator/") and self.server.role == "hub":
            self._send(self._control(path, query, body), None)
            return
        if self.headers.get(INTERNAL_HEADER) == "1":
            # The emulator's own hf_xet traffic (xet conversion): no faults, shaping or accounting.
            self._send(self._answer(raw_path, query, body), None)
            return
        rec = emu.accounting.record(self.command, path, query, self.headers.get("Range"))
        if emu.network.latency_ms:
            emu.stop_event.wait(emu.network.latency_ms / 1000)
        fault = emu.faults.take(path, self.command, PRE_KINDS)
        if fault is not None:
            rec.fault = fault.kind
            if fault.kind == "latency":
                emu.stop_event.wait(fault.seconds)
            elif fault.kind == "stall":
                # A server that accepted the request and never answers; give up silently afterwards.
                emu.stop_event.wait(fault.seconds)
                self.close_connection = True
                return
            else:
                headers = {"Content-Type": "application/json"}
                if fault.retry_after is not None:
                    ra = fault.retry_after
                    headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
                self._send(json_response({"error": "injected fault"}, fault.status, headers), rec)
                return
        if "Range" in self.headers and emu.faults.take(path, self.command, ANSWER_KINDS) is not None:
            rec.fault = "ignore_range"
            del self.headers["Range"]
        self._send(self._answer(raw_path, query, body), rec)

    def _answer(self, raw_path: str, query: str, body: bytes) -> Response:
        try:
            segments = [unquote(s) for s in raw_path.split("/")[1:]]
            req = Request(self.server.role, self.command, raw_path, segments, parse_qs(query), body, self.headers)
            return self.server.emulator.route(req)
        except HubError as e:
            return e.response()
        except Exception:
            logger.exception("emulator error on %s %s", self.command, self.path)
            return HubError(500, None, "internal emulator error").response()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _control(self, path: str, query: str, body: bytes) -> Response:
        """The ``/_emulator/*`` routes: stats, faults and the network profile of a subprocess-run emulator."""
        emu = self.server.emulator
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if path == "/_emulator/stats" and self.command == "GET":
            contains, method = params.get("path_contains", ""), params.get("method")
            return json_response(
                {
                    "bytes_served": emu.bytes_served(contains),
                    "requests": [dataclasses.asdict(r) for r in emu.requests(contains, method)],
                }
            )
        if self.command != "POST":
            return HubError(405, None, "method not allowed").response()
        if path == "/_emulator/faults":
            try:
                emu.faults.add(**json.loads(body or b"{}"))
            except (TypeError, ValueError) as e:
                return HubError(400, None, str(e)).response()
        elif path == "/_emulator/network":
            try:
                emu.set_network(**json.loads(body or b"{}"))
            except (TypeError, ValueError) as e:
                return HubError(400, None, str(e)).response()
        elif path == "/_emulator/bucket_events":
            emu.bucket_events.enabled = bool(json.loads(body or b"{}").get("enabled", True))
        elif path == "/_emulator/reset_stats":
            emu.reset_stats()
        elif path == "/_emulator/clear_faults":
            emu.faults.clear()
        else:
            return HubError(404, None, "not found").response()
        return json_response({"ok": True})

    # -- response writing --------------------------------------------------------------------------

    def _send(self, resp: Response, rec: RequestRecord | None) -> None:
        """Write status, headers and (unless HEAD) the body, applying any body fault."""
        if resp.stream is not None:
            self._send_stream(resp, rec)
            return
        emu = self.server.emulator
        length = resp.length
        fault = None
        if rec is not None and self.command != "HEAD" and length > 0:
            fault = emu.faults.take(rec.path, self.command, BODY_KINDS)
            if fault is not None:
                rec.fault = fault.kind
        emu.accounting.begin_response()
        try:
            self.send_response(resp.status)
            for key, value in resp.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if rec is not None:
                rec.status = resp.status
            if self.command == "HEAD" or length == 0:
                return
            kind = fault.kind if fault is not None else None
            if fault is not None and kind == "trickle":
                self._trickle(resp.body, length, fault, rec)
                return
            count = length // 2 if kind in ("reset", "truncate") else length
            self._write_body(resp.body, count, kind == "corrupt", rec)
            if kind == "truncate":
                self.close_connection = True
            elif kind == "reset":
                self._abort_connection()
        except OSError as e:  # client gone, or a bucket file vanished mid-body: the response is lost
            logger.debug("aborted %s %s: %s", self.command, self.path, e)
            self.close_connection = True
        finally:
            emu.accounting.end_response()

    def _send_stream(self, resp: Response, rec: RequestRecord | None) -> None:
        """A long-lived answer (server-sent events): chunked, written as the stream yields, then closed.
        Not counted as a response in flight: a follower holds one for the life of its mount."""
        self.close_connection = True
        try:
            self.send_response(resp.status)
            for key, value in resp.headers.items():
                self.send_header(key, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if rec is not None:
                rec.status = resp.status
            for chunk in resp.stream or ():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError as e:  # the client went away
            logger.debug("stream %s ended: %s", self.path, e)
        finally:
            close = getattr(resp.stream, "close", None)
            if close is not None:
                close()

    def _write_body(
        self, body: bytes | FileBody | list[bytes | FileBody], count: int, corrupt: bool, rec: RequestRecord | None
    ) -> None:
        """Write the first ``count`` bytes of the body (parts in order); ``corrupt`` damages the first part."""
        for part in body if isinstance(body, list) else [body]:
            n = min(count, part.length if isinstance(part, FileBody) else len(part))
            if n <= 0:
                return
            self._write_part(part, n, corrupt, rec)
            count, corrupt = count - n, False

    def _write_part(self, body: bytes | FileBody, count: int, corrupt: bool, rec: RequestRecord | None) -> None:
        count_bytes = self.server.emulator.accounting.count_bytes
        # Control and internal answers (rec is None) are never shaped.
        network = self.server.emulator.network if rec is not None else _UNSHAPED
        if isinstance(body, bytes):
            data = _flip(body[:count]) if corrupt else body[:count]
            step = network.write_size()
            for start in range(0, len(data), step):
                chunk = data[start : start + step]
                self._paced_write(chunk, network)
                count_bytes(rec, len(chunk))
            return
        with open(body.path, "rb") as f:
            offset, end = body.offset, body.offset + count
            if corrupt or network.conn_mbps is not None:
                # The slow path: bytes pass through user space to be damaged or paced.
                f.seek(offset)
                first = True
                while offset < end:
                    chunk = f.read(min(network.write_size() if network.conn_mbps else _CHUNK, end - offset))
                    if not chunk:
                        raise ConnectionError("file shrank while serving")
                    if first and corrupt:
                        chunk = _flip(chunk)
                    first = False
                    self._paced_write(chunk, network)
                    offset += len(chunk)
                    count_bytes(rec, len(chunk))
                    if rec is not None:
                        network = self.server.emulator.network  # set_network applies mid-body
                return
            while offset < end:
                sent = self.connection.sendfile(f, offset, min(_CHUNK, end - offset))
                if sent <= 0:
                    raise ConnectionError("file shrank while serving")
                offset += sent
                count_bytes(rec, sent)

    def _trickle(
        self, body: bytes | FileBody | list[bytes | FileBody], length: int, fault: FaultRule, rec: RequestRecord | None
    ) -> None:
        """Send the body at the fault's ``rate_bps``; past its ``seconds``, close the connection mid-body."""
        emu = self.server.emulator
        rate = fault.rate_bps or 0.0
        start = time.monotonic()
        give_up = start + fault.seconds
        step = max(1, int(rate * _TRICKLE_TICK_S))
        sent = 0
        for part in body if isinstance(body, list) else [body]:
            for chunk in _chunks(part, step):
                due = start + (sent + len(chunk)) / rate if rate > 0 else give_up
                if due >= give_up:
                    emu.stop_event.wait(max(0.0, give_up - time.monotonic()))
                    self.close_connection = True
                    return
                if emu.stop_event.wait(max(0.0, due - time.monotonic())):
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                emu.accounting.count_bytes(rec, len(chunk))
        if sent < length:  # a file shrank while serving
            self.close_connection = True

    def _paced_write(self, data: bytes, network: NetworkProfile) -> None:
        """Write ``data``, first waiting for this connection's token bucket when a cap is set."""
        rate = network.bytes_per_s
        if rate is not None:
            self._pacer.wait(len(data), rate)
        self.wfile.write(data)

    def _abort_connection(self) -> None:
        """Abort with a TCP RST: SO_LINGER 0, then close (the fd really closes in ``finish()``)."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()


def _chunks(part: bytes | FileBody, step: int) -> Iterator[bytes]:
    """One body part in pieces of ``step`` bytes, read from its file as they are needed."""
    if isinstance(part, bytes):
        for start in range(0, len(part), step):
            yield part[start : start + step]
        return
    with open(part.path, "rb") as f:
        f.seek(part.offset)
        left = part.length
        while left > 0:
            chunk = f.read(min(step, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def _flip(data: bytes) -> bytes:
    """Invert the first bytes of a chunk: same length, different content."""
    n = min(_CORRUPT_BYTES, len(data))
    return bytes(b ^ 0xFF for b in data[:n]) + data[n:]
