"""app/worker.py's run loop, in-process on real gevent sockets: a stop wakes it at once, and after
the stop it leaves as soon as the last connection ends (Gunicorn's GeventWorker looks once a
second in both places)."""
import os
import time

import gevent
import gevent.socket
import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from app.worker import HEARTBEAT_S, OrchardWorker


@pytest.fixture
def worker(tmp_path):
    cfg = Config()
    cfg.set("worker_tmp_dir", str(tmp_path))
    cfg.set("graceful_timeout", 5)
    listener = gevent.socket.socket()  # as the patched worker's are: accept waits cooperatively
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    w = OrchardWorker(0, os.getppid(), [listener], None, 30, cfg, Logger(cfg))  # its master: ours
    w._stopping = gevent.event.Event()  # what init_process sets up (it also patches and loads the app)
    w.alive = True
    yield w
    listener.close()
    w.tmp.close()


def running(w: OrchardWorker) -> gevent.Greenlet:
    loop = gevent.spawn(w.run)
    gevent.sleep(0.05)  # it started its servers, told the master it lives, and waits
    assert not loop.dead
    return loop


def test_a_stop_wakes_the_loop_at_once(worker):
    loop = running(worker)
    started = time.monotonic()
    worker.handle_exit(None, None)
    loop.join(timeout=HEARTBEAT_S * 3)
    assert loop.dead and time.monotonic() - started < HEARTBEAT_S / 2


def test_after_a_stop_the_loop_leaves_when_the_last_connection_ends(worker):
    worker.handle = lambda listener, client, addr: gevent.sleep(0.3)  # a request that takes 0.3 s
    loop = running(worker)
    client = gevent.socket.create_connection(worker.sockets[0].getsockname())
    gevent.sleep(0.05)  # accepted: its handler runs
    started = time.monotonic()
    worker.handle_exit(None, None)
    loop.join(timeout=HEARTBEAT_S * 3)
    took = time.monotonic() - started
    client.close()
    assert loop.dead and 0.2 < took < 0.3 + HEARTBEAT_S / 2, took


def test_a_connection_past_graceful_timeout_is_cut(worker):
    worker.cfg.set("graceful_timeout", 1)
    worker.handle = lambda listener, client, addr: gevent.sleep(30)  # past graceful_timeout (1 s)
    loop = running(worker)
    client = gevent.socket.create_connection(worker.sockets[0].getsockname())
    gevent.sleep(0.05)
    worker.handle_exit(None, None)
    loop.join(timeout=5)
    client.close()
    assert loop.dead
