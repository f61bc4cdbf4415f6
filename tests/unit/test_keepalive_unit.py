"""app/keepalive.py on real gevent sockets: at stop, a connection waiting with nothing sent ends its
wait as its keep-alive timeout would, and one with a request on the wire is left to be read."""
from __future__ import annotations

import gevent
import gevent.socket

from app.keepalive import IdleConnections


class FakeWorker:
    """The two methods of Gunicorn's async worker that IdleConnections wraps, used as its keep-alive loop does."""

    keepalive = 30.0

    def __init__(self):
        self.outcomes = {}

    def timeout_ctx(self):
        return gevent.Timeout(self.keepalive, False)

    def handle(self, listener, client, addr):
        data = None
        with self.timeout_ctx():  # as base_async: `with self.timeout_ctx(): req = next(parser)`
            data = client.recv(100)
        self.outcomes[addr] = data  # None: the wait ended with no request (the connection closes)


def test_close_idle_ends_only_the_waits_with_nothing_on_the_wire():
    worker = FakeWorker()
    idle = IdleConnections(worker)
    quiet_server, quiet_client = gevent.socket.socketpair()
    busy_server, busy_client = gevent.socket.socketpair()
    handlers = [gevent.spawn(worker.handle, None, quiet_server, "quiet"),
                gevent.spawn(worker.handle, None, busy_server, "busy")]
    gevent.sleep(0.05)
    assert idle.idle == 2
    busy_client.sendall(b"POST / HTTP/1.1\r\n")  # a request arrived just as the stop began
    assert idle.close_idle() == 1
    gevent.joinall(handlers, timeout=5)
    assert all(h.dead for h in handlers)
    assert worker.outcomes == {"quiet": None, "busy": b"POST / HTTP/1.1\r\n"}
    assert idle.idle == 0 and idle.closed == 1
    for sock in (quiet_server, quiet_client, busy_server, busy_client):
        sock.close()


def test_a_wait_that_ended_is_no_longer_tracked_and_the_timeout_still_applies():
    worker = FakeWorker()
    worker.keepalive = 0.05
    idle = IdleConnections(worker)
    server, client = gevent.socket.socketpair()
    handler = gevent.spawn(worker.handle, None, server, "slow")
    handler.join(timeout=5)
    assert handler.dead and worker.outcomes == {"slow": None}  # KEEP_ALIVE ran out as before
    assert idle.idle == 0 and idle.close_idle() == 0
    server.close()
    client.close()
