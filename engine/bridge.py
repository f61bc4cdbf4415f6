"""Hand-off of engine outputs from the native engine thread to request greenlets.

The engine thread never touches gevent objects directly: gevent's events and
queues are not safe across OS threads. It appends (request_id, message) pairs
to a plain deque and calls `send()` on one gevent async watcher, which is the
one thread-safe way into the hub. The hub then routes every pending message
to its RequestStream and wakes the waiting greenlet. One wake-up per engine
step, however many requests it served; no polling, no sleeps.
"""
from __future__ import annotations

import collections
from typing import Iterable, Optional

import gevent
from gevent.event import Event

from engine.messages import Finished


class RequestStream:
    """What one request greenlet reads: token deltas, then one Finished. Hub side only."""

    def __init__(self, request_id: str, ready: Optional[Event] = None):
        self.request_id = request_id
        self._pending: collections.deque = collections.deque()
        self._ready = ready or Event()  # several streams may share one (a request's n choices)
        self.finished: Optional[Finished] = None

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def push(self, message) -> None:
        self._pending.append(message)
        self._ready.set()

    def next_batch(self, timeout: Optional[float] = None) -> list:
        """Messages since the last call; [] if `timeout` passed with nothing new."""
        if not self._pending:
            self._ready.wait(timeout)
        self._ready.clear()
        return self.take()

    def take(self) -> list:
        """Messages since the last call, without waiting (the caller waits on the shared event)."""
        out = list(self._pending)
        self._pending.clear()
        for message in out:
            if isinstance(message, Finished):
                self.finished = message
        return out


class OutputBridge:
    """Routes engine outputs to RequestStreams. Create it on the thread that runs the hub."""

    def __init__(self):
        self._outbox: collections.deque = collections.deque()
        self._streams: dict[str, RequestStream] = {}
        self._watcher = gevent.get_hub().loop.async_()
        self._watcher.start(self._deliver)

    def open(self, request_id: str, ready: Optional[Event] = None) -> RequestStream:
        stream = RequestStream(request_id, ready)
        self._streams[request_id] = stream
        return stream

    def post(self, items: Iterable[tuple[str, object]]) -> None:
        """Thread-safe: called by the engine thread once per step."""
        self._outbox.extend(items)
        self._watcher.send()

    def end_all(self, finished: Finished) -> int:
        """Hub side: end every open stream with `finished`, for when the engine thread can no
        longer answer (it stalled). Whatever it posts for them later is dropped. Returns how many."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.push(finished)
        return len(streams)

    def _deliver(self) -> None:
        while self._outbox:
            request_id, message = self._outbox.popleft()
            stream = self._streams.get(request_id)
            if stream is None:
                continue  # the request greenlet is gone; the engine was told to abort
            stream.push(message)
            if isinstance(message, Finished):
                del self._streams[request_id]

