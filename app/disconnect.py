"""Notice a client that hangs up while its request is still generating.

A streamed response notices on its next write, but a queued stream or a
non-streamed request writes nothing for a long time. So each generating request
gets a tiny greenlet that waits for its socket to turn readable: during a
request a well-behaved client sends nothing, so readable means EOF (peek gives
b'') and the sequence is aborted at once, within one engine step.
"""
from __future__ import annotations

import socket
from typing import Callable, Optional

import gevent
from gevent.socket import wait_read


def watch(environ: dict, on_disconnect: Callable[[], None]) -> Optional[gevent.Greenlet]:
    sock = environ.get("gunicorn.socket")
    if sock is None:  # in-process test client: nothing to watch
        return None
    return gevent.spawn(_wait_for_hangup, sock, on_disconnect)


def _wait_for_hangup(sock, on_disconnect) -> None:
    try:
        wait_read(sock.fileno())
        if sock.recv(1, socket.MSG_PEEK) == b"":
            on_disconnect()
    except OSError:  # reset or closed: the client is gone too
        on_disconnect()


def stop(watcher: Optional[gevent.Greenlet]) -> None:
    if watcher is not None:
        watcher.kill(block=False)
