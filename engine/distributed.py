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

import logging
import os
import pickle
from typing import Optional

log = logging.getLogger("orchard.engine")


class StepGroup:
    def __init__(self, group, backend: str):
        import mlx.core as mx

        self.group = group
        self.rank, self.size = group.rank(), group.size()
        # The model's stream (the engine thread's default): the plan's collectives queue behind
        # the step's, in the same order on every rank.
        self._stream = mx.default_stream(mx.default_device())

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def share(self, plan: Optional[list]) -> list:
        """Rank 0's plan, on every rank (followers pass None). Two sums: the length, then the
        bytes (followers add zeros); an empty plan costs one small collective."""
        import mlx.core as mx
        import numpy as np

        payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL) if self.is_leader and plan else b""
        with mx.stream(self._stream):
            length = mx.distributed.all_sum(mx.array([len(payload)], dtype=mx.int64), group=self.group)
            mx.eval(length)
            size = int(length.item())
            if size == 0:
                return []
            data = np.frombuffer(payload, dtype=np.uint8) if self.is_leader else np.zeros(size, dtype=np.uint8)
            total = mx.distributed.all_sum(mx.array(data), group=self.group)
            mx.eval(total)
        return plan if self.is_leader else pickle.loads(np.array(total, copy=False).tobytes())

    def check_same(self, value: int) -> None:
        """Raise unless every rank holds the same `value` (a cheap guard that ranks are in step)."""
        import mlx.core as mx

        with mx.stream(self._stream):
            total = mx.distributed.all_sum(mx.array([value, 1], dtype=mx.int64), group=self.group)
            mx.eval(total)
        summed, ranks = (int(x) for x in total.tolist())
        if summed != value * ranks:
            raise RuntimeError(f"ranks are out of step: rank {self.rank} holds {value}, the group sums {summed}")


def join(hostfile: str, rank: int, backend: str) -> StepGroup:
    """Join the group (blocks until every rank is there). MLX reads its launch environment."""
    import mlx.core as mx

    os.environ["MLX_HOSTFILE"] = hostfile
    os.environ["MLX_RANK"] = str(rank)
    group = mx.distributed.init(strict=True, backend=backend)
    log.info("joined the %s group as rank %d of %d", backend, group.rank(), group.size())
    return StepGroup(group, backend)


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
