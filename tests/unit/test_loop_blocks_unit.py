"""tests/server.py `loop_blocks`: which gevent monitor reports are about Orchard's event loop.
On a synthetic log in gevent's format: a monitor thread reporting itself, a report of it cut
short by another monitor's output (CI saw one read mid-write), the engine thread's steps, and
one real block of the main thread; only the last is ours."""
from tests.server import loop_blocks

MAIN, MONITOR, ENGINE = "0x7f50729e1b80", "0x7f50676fe6c0", "0x7f23a93ff6c0"


def report(thread: str, frame: str, threads: str) -> str:
    return (f"2026-11-27T23:34:45Z : Greenlet <greenlet.greenlet object at 0x1 suspended active started main>"
            f" appears to be blocked\n    Reported by <gevent._gevent_c_tracer.GreenletTracer object at 0x2>\n"
            f"Blocked Stack (for thread id {thread}):\n{frame}\nInfo:\n" + "*" * 80 + "\n* Threads\n" + "*" * 80
            + "\n" + threads + "\n")


MONITOR_FRAME = '  File "/v/gevent/_monitor.py", line 190, in __call__\n    thread_sleep(sleep_time)\n'
ENGINE_FRAME = ('  File "/w/engine/host.py", line 83, in _run\n    while self._drain(block=not self._has_work()):\n'
                '  File "/w/engine/host.py", line 162, in _collect\n')
MAIN_FRAME = ('  File "<frozen runpy>", line 198, in _run_module_as_main\n'
              '  File "/w/app/api/chat/serving.py", line 10, in prepare\n    time.sleep(0.3)\n')
THREADS = (f"Thread {MONITOR} (None)\n\n{MONITOR_FRAME}\n" + "*" * 80 + f"\nThread {ENGINE} (None)\n\n{ENGINE_FRAME}\n"
           + "*" * 80 + f"\nThread {MAIN} (None)\n\n{MAIN_FRAME}")


def test_only_the_main_loops_block_counts():
    log = (report(MONITOR, MONITOR_FRAME, THREADS)
           + report(ENGINE, ENGINE_FRAME, THREADS)
           # cut short: another monitor's output began before this one's stack was written
           + f"x appears to be blocked\nBlocked Stack (for thread id {MONITOR}):" + "=" * 80 + "\n\n"
           + report(MAIN, MAIN_FRAME, THREADS))
    blocks = loop_blocks(log)
    assert len(blocks) == 1 and "serving.py" in blocks[0], blocks


def test_a_block_of_an_unknown_thread_still_counts():
    """Only threads shown to be the monitor or the engine are left out."""
    assert len(loop_blocks(report("0xdead", MAIN_FRAME, ""))) == 1
