"""One model across several processes or machines: MLX's distributed group (ring over TCP or
Thunderbolt, JACCL on macOS, NCCL on CUDA), tensor-parallel weights, and the step plan.

Every rank runs the same engine host loop. Rank 0 (the leader) also serves HTTP and makes
every decision: each loop iteration it drains its inbox and shares what it found (the plan:
admissions as token ids, aborts, unloads, shutdown) with every rank; each rank applies the same
plan to the same state, so every scheduling decision (admission, eviction, prefix-cache hits,
the step itself) comes out the same everywhere, and the model's collectives line up. Nothing in
the loop reads a clock, so no rank can decide differently. Followers publish nothing.

The group fails as one unit: a lost peer raises in the next collective, the host loop ends,
the process exits and its supervisor restarts it; the others see the same failure and do the
same, and the ring re-forms when every rank is back (`mx.distributed.init` waits for its peers).
"""
from __future__ import annotations

import _socket  # the C socket type: gevent's monkey patching replaces `socket.socket`, not this
import json
import logging
import os
import pickle
import struct
import time
from typing import Optional

log = logging.getLogger("orchard.engine")


class StepGroup:
    """This rank's view of the group: MLX's group (the model's collectives) and the plan channel,
    a TCP connection from the leader to each follower. Plans travel there, not through MLX
    collectives: a collective would have to wait for the step in flight on the device (one more
    host sync per step, no pipelining), while the plan only has to arrive before the follower's
    next turn; the model's own collectives keep the ranks in lockstep."""

    def __init__(self, group, plan_address: tuple[str, int], timeout_s: float = 300.0):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self._peers: list[_socket.socket] = []
        if self.size > 1:
            self._connect(plan_address, timeout_s)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _connect(self, address: tuple[str, int], timeout_s: float) -> None:
        """Plain blocking sockets, never gevent's: on rank 0 this runs on the engine thread, in a
        process gevent has patched, and a gevent socket there gives that thread a hub of its own
        (a second event loop that the engine thread blocks in every step, which gevent's monitor
        then reports, every 0.1 s, as a blocked loop)."""
        family, kind, proto, _, sockaddr = _socket.getaddrinfo(*address, 0, _socket.SOCK_STREAM)[0]
        if self.is_leader:
            server = _socket.socket(family, kind, proto)
            try:
                server.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)  # a re-formed group binds it again
                server.bind(sockaddr)
                server.listen(self.size)
                server.settimeout(timeout_s)
                while len(self._peers) < self.size - 1:
                    fd, _ = server._accept()
                    self._peers.append(_plan_socket(_socket.socket(fileno=fd)))
            finally:
                server.close()
            return
        deadline = time.monotonic() + timeout_s
        while True:
            peer = _socket.socket(family, kind, proto)
            peer.settimeout(5)
            try:
                peer.connect(sockaddr)
                break
            except OSError:
                peer.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the leader's listener is not up yet
        self._peers.append(_plan_socket(peer))

    def share(self, plan: Optional[list], turns: int = 0) -> list:
        """Rank 0's plan, on every rank (followers pass None and wait for it). Each frame also
        carries the leader's turn count, which every follower must have reached too: a rank
        that took another turn has diverged, and the group fails at once rather than
        computing garbage in lockstep."""
        if self.size == 1:
            return plan or []
        if self.is_leader:
            payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL) if plan else b""
            frame = struct.pack("!IQ", len(payload), turns) + payload
            for peer in self._peers:
                peer.sendall(frame)
            return plan or []
        size, leader_turns = struct.unpack("!IQ", self._read(12))
        if leader_turns != turns:
            raise RuntimeError(f"rank {self.rank} is out of step: {turns} turns here, {leader_turns} on rank 0")
        return pickle.loads(self._read(size)) if size else []

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = self._peers[0].recv(min(left, 1 << 20))
            if not chunk:
                raise RuntimeError("the leader closed the plan channel: the group is lost")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def _plan_socket(peer):
    """A connected plan socket: blocking without a deadline (a step may take long), and each
    frame sent at once (a plan is small and the followers wait for it)."""
    peer.settimeout(None)
    peer.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    return peer


def plan_address(hostfile: str) -> tuple[str, int]:
    """The leader's plan channel: rank 0's host, its group port + 1 (documented beside the hostfile)."""
    hosts = json.loads(open(hostfile).read())
    first = hosts[0][0] if isinstance(hosts[0], list) else hosts[0]
    host, _, port = first.rpartition(":")
    return host, int(port) + 1


def join(hostfile: str, rank: int, backend: str) -> StepGroup:
    """Join the group (blocks until every rank is there). MLX reads its launch environment:
    the ring and JACCL the hostfile itself; NCCL the address of rank 0 (the hostfile's first
    entry) and the world size."""
    import mlx.core as mx

    os.environ["MLX_HOSTFILE"] = hostfile
    os.environ["MLX_RANK"] = str(rank)
    if backend == "nccl":
        hosts = json.loads(open(hostfile).read())
        host, port = plan_address(hostfile)
        os.environ.update(NCCL_HOST_IP=host, NCCL_PORT=str(port - 1), MLX_WORLD_SIZE=str(len(hosts)))
    group = mx.distributed.init(strict=True, backend=backend)
    log.info("joined the %s group as rank %d of %d", backend, group.rank(), group.size())
    return StepGroup(group, plan_address(hostfile))


def shard(model, group) -> str:
    """Split the weights across the group (tensor parallel). mlx-lm's own `shard` where every
    layer's heads divide by the group size; otherwise only the MLP is split (its width divides)
    and attention is computed whole on every rank (the embedded SmolLM2's 9 heads do not split
    in two). Returns how it was split."""
    from mlx.nn.layers.distributed import shard_linear

    n = group.size()
    layers = model.layers
    attention = layers[0].self_attn
    heads = getattr(attention, "n_heads", getattr(attention, "num_heads", 0))
    kv_heads = getattr(attention, "n_kv_heads", getattr(attention, "num_key_value_heads", 0))
    if hasattr(model, "shard") and heads and heads % n == 0 and kv_heads % n == 0:
        model.shard(group)
        return "tensor parallel (attention and MLP)"
    for layer in layers:
        mlp = layer.mlp
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
    return "tensor parallel (MLP; attention whole on every rank)"
