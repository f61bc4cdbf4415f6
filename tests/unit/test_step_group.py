"""The plan channel of a distributed group (engine/distributed.py) over real loopback sockets:
the leader's plan arrives whole on every follower, in order, and a follower whose turn count
differs from the leader's fails at once."""
import socket
import threading

import pytest

from engine.distributed import StepGroup


class FakeGroup:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def free_pair_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connected(size: int) -> list[StepGroup]:
    address = ("127.0.0.1", free_pair_port())
    groups: dict[int, StepGroup] = {}
    leader = threading.Thread(target=lambda: groups.__setitem__(0, StepGroup(FakeGroup(0, size), address, 10)))
    leader.start()
    for rank in range(1, size):
        groups[rank] = StepGroup(FakeGroup(rank, size), address, 10)
    leader.join()
    return [groups[r] for r in range(size)]


def test_every_follower_gets_the_leaders_plans_in_order():
    leader, *followers = connected(3)
    plans = [[], [(0, {"add": list(range(5000))})], [(1, "abort")], []]
    for turn, plan in enumerate(plans):
        assert leader.share(plan, turn) == plan
        for follower in followers:
            assert follower.share(None, turn) == plan


def test_a_follower_out_of_step_fails_at_once():
    leader, follower = connected(2)
    leader.share([(0, "x")], 7)
    with pytest.raises(RuntimeError, match="out of step"):
        follower.share(None, 6)


def test_a_lost_leader_ends_the_follower():
    leader, follower = connected(2)
    for peer in leader._peers:
        peer.close()
    with pytest.raises(RuntimeError, match="group is lost"):
        follower.share(None, 0)


LEADER_ON_A_NATIVE_THREAD = r"""
from gevent import monkey
monkey.patch_all()  # as Gunicorn's gevent worker does
import gevent
gevent.sleep(0)  # the main hub runs (and starts its monitor) before the engine thread starts
# getaddrinfo's first call imports this; imported here, so that the thread does not wait on gevent's
# import lock while this script imports too (that wait would run the thread's hub, for reasons of
# this script, not of the plan channel).
import encodings.idna  # noqa: F401
import sys
from gevent._hub_local import get_hub_if_exists
from engine.distributed import StepGroup
sys.path.insert(0, "tests/unit")
from test_step_group import FakeGroup, free_pair_port

address = ("127.0.0.1", free_pair_port())
seen = {}

def leader():  # the engine thread
    group = StepGroup(FakeGroup(0, 2), address, 10)
    group.share([(0, "plan")], 1)
    hub = get_hub_if_exists()  # imports may make one (gevent's import locks): it must never run
    seen["hub"] = "ran" if hub and (bool(hub) or hub.periodic_monitoring_thread) else "never ran"
    seen["socket"] = type(group._peers[0]).__module__

import time
monkey.get_original("_thread", "start_new_thread")(leader, ())  # a real OS thread, as engine/host.py starts it
follower = StepGroup(FakeGroup(1, 2), address, 10)
assert follower.share(None, 1) == [(0, "plan")]
while "socket" not in seen:
    time.sleep(0.01)
print(seen["hub"], "|", seen["socket"])
"""


def test_the_leaders_engine_thread_gets_no_gevent_hub():
    """In the gevent worker, rank 0's plan channel runs on the engine thread: its sockets must
    be plain ones, or that thread runs a gevent hub of its own, which gevent's monitor then
    reports as a blocked loop every 0.1 s while the engine works: 290,000 log lines in one
    run of tests/test_distributed_e2e.py on a loaded machine."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": "0.1"}
    out = subprocess.run([sys.executable, "-c", LEADER_ON_A_NATIVE_THREAD], cwd=root, capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "never ran | _socket", out.stdout
