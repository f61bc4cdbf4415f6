"""Gunicorn's gevent worker, with a stop that follows events instead of one-second polls.

Gunicorn's `GeventWorker.run` looks at `alive` once a second, and after a stop looks at its
connection pool once a second until it is empty. So every stop took up to two seconds longer
than its work: an idle server here needed 1.1-1.2 s from SIGTERM to exit, all of it waiting for
the next look, and a drain ended up to a second after its last request. This worker waits on the
same two conditions as events: a stop wakes it at once, and so does the pool's last connection
ending. Everything else is GeventWorker's: monkey patching, signals, `handle`, and the heartbeat
to the master (`notify`) at least once a second, which the master's `timeout` relies on.

Orchard serves through Gunicorn's plain gevent worker path (`StreamServer` with Gunicorn's own
HTTP parser), the only one this run loop starts; `worker_class` names this class in
gunicorn.conf.py.
"""
from __future__ import annotations

import time
from functools import partial

from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

HEARTBEAT_S = 1.0  # how often the master hears from the worker, as in GeventWorker


class OrchardWorker(GeventWorker):
    def init_process(self):
        self._stopping = Event()
        super().init_process()

    def load_wsgi(self):
        from engine.host import EngineHost

        EngineHost.freeze_start_up = True  # this process serves one host for its life
        super().load_wsgi()

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)  # alive = False
        self.wake()

    def wake(self) -> None:
        """Look at `alive` now (whoever set it to False calls this), not at the next heartbeat."""
        self._stopping.set()

    def run(self):
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for sock in self.sockets:
            sock.setblocking(1)
            server = StreamServer(sock, handle=partial(self.handle, sock), spawn=Pool(self.worker_connections),
                                  **ssl_args)
            if self.cfg.workers > 1:
                server.max_accept = 1
            server.start()
            servers.append(server)

        while self.alive:
            self.notify()
            self._stopping.wait(HEARTBEAT_S)

        try:
            for server in servers:  # stop accepting; the master keeps the port
                server.close()
            # Connections still open finish within graceful_timeout: wake when the last one ends.
            deadline = time.monotonic() + self.cfg.graceful_timeout
            while True:
                busy = [s.pool for s in servers if s.pool.free_count() != s.pool.size]
                left = deadline - time.monotonic()
                if not busy or left <= 0:
                    break
                self.notify()
                busy[0].join(timeout=min(HEARTBEAT_S, left))
            if busy:
                self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
                for server in servers:
                    server.stop(timeout=1)
        except Exception:  # as GeventWorker: the worker is leaving either way
            pass
