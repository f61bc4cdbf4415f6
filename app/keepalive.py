"""Idle keep-alive connections end as soon as the worker stops.

After SIGTERM, Gunicorn's gevent worker closes its listener and then waits until every connection
handler has returned. A handler waiting for a keep-alive connection's next request returns only
when KEEP_ALIVE runs out, and the worker looks once a second: every stop took up to KEEP_ALIVE + 1 s
longer than its work whenever a client (a connection pool, an nginx upstream) held a connection
open, which is nearly always. With the default 5 s that was about 6 s per stop: every `systemctl
restart`, and every server the test suite stops (the whole suite: 591 s before, 517 s after).

Here the wait for each connection's next request is tracked. When the worker stops, a connection
with nothing on the wire ends its wait exactly as its keep-alive timeout would have: the handler
sees no request and closes the connection, writing nothing (HTTP/1.1 lets a server close an idle
connection, and clients open a new one; the nginx drain test passes with it). A connection with bytes
waiting is left alone, so a request already sent is still read and answered (a draining server
answers it 503 `shutting_down`). Requests in flight are untouched: the drain ends them
(app/state.py), and Gunicorn closes their connections after their responses.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import gevent
from gevent import monkey

_select = monkey.get_original("select", "select")  # a non-blocking look, never a gevent wait
log = logging.getLogger("orchard.worker")


def _has_bytes(sock) -> bool:
    """The peer sent something (a request, or its close): the handler should read it."""
    try:
        readable, _, _ = _select([sock.fileno()], [], [], 0)
    except (OSError, ValueError):  # closed under us: nothing to protect
        return False
    return bool(readable) or bool(getattr(sock, "pending", lambda: 0)())  # TLS-buffered bytes count too


class IdleConnections:
    """Wraps a Gunicorn async worker's `handle` and `timeout_ctx` (call before it runs)."""

    def __init__(self, worker):
        self._sockets: dict = {}  # handler greenlet -> its client socket, for the connection's life
        self._waiting: dict = {}  # handler greenlet -> the keep-alive timeout it waits under
        self.closed = 0  # idle connections ended at stop
        handle: Callable = worker.handle
        timeout_ctx: Callable = worker.timeout_ctx

        def tracked_handle(listener, client, addr):
            current = gevent.getcurrent()
            self._sockets[current] = client
            try:
                return handle(listener, client, addr)
            finally:
                self._sockets.pop(current, None)

        @contextlib.contextmanager
        def tracked_wait():
            timeout = timeout_ctx()  # gevent.Timeout(KEEP_ALIVE, False): expiring ends the wait silently
            current = gevent.getcurrent()
            self._waiting[current] = timeout
            try:
                with timeout:
                    yield
            finally:
                self._waiting.pop(current, None)

        worker.handle, worker.timeout_ctx = tracked_handle, tracked_wait

    @property
    def idle(self) -> int:
        return len(self._waiting)

    def close_idle(self) -> int:
        """End the wait of every connection with nothing on the wire; returns how many."""
        hub = gevent.get_hub()
        ended = 0
        for current, timeout in list(self._waiting.items()):
            sock = self._sockets.get(current)
            if sock is None or _has_bytes(sock):
                continue
            hub.loop.run_callback(self._end_wait, current, timeout)
            ended += 1
        self.closed += ended
        if ended:
            log.info("stop: closing %d idle keep-alive connection%s", ended, "" if ended == 1 else "s")
        return ended

    def _end_wait(self, current, timeout) -> None:
        """In the hub, as the timeout's own timer would on expiry: throw it into the waiting greenlet,
        if it still waits under it (a request that arrived since the look has left the wait)."""
        if self._waiting.get(current) is timeout:
            current.throw(timeout)
