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
