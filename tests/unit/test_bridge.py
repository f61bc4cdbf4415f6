"""OutputBridge.end_all: the hub ends every open stream when the engine thread cannot (it stalled)."""
import threading

import gevent

from engine.bridge import OutputBridge
from engine.messages import Finished, TokenDelta


def test_end_all_ends_every_open_stream_and_drops_what_the_engine_posts_later():
    bridge = OutputBridge()
    first, second = bridge.open("a"), bridge.open("b")
    poster = threading.Thread(target=bridge.post, args=([("a", TokenDelta([1]))],))  # the engine thread
    poster.start()
    poster.join()
    assert [m.token_ids for m in first.next_batch(timeout=5)] == [[1]]

    gone = Finished("error", error="the engine stalled")
    assert bridge.end_all(gone) == 2
    assert first.next_batch(timeout=5) == [gone] and first.finished is gone
    assert second.next_batch(timeout=5) == [gone] and second.finished is gone

    bridge.post([("a", TokenDelta([2])), ("b", Finished("length"))])  # the thread wakes up late
    gevent.sleep(0.05)
    assert not first.has_pending and not second.has_pending
    assert first.finished is gone and second.finished is gone
    assert bridge.end_all(gone) == 0  # nothing is open any more


def test_a_stream_opened_after_end_all_is_served_as_usual():
    bridge = OutputBridge()
    bridge.end_all(Finished("error", error="stalled"))
    stream = bridge.open("c")
    bridge.post([("c", TokenDelta([7])), ("c", Finished("stop"))])
    messages = stream.next_batch(timeout=5)
    assert [type(m) for m in messages] == [TokenDelta, Finished] and stream.finished.finish_reason == "stop"
