"""Log-probabilities for the API: the chosen token's and the k most likely, from rows of a
log-softmax. Engine thread only; one gather and one partial sort for all rows, one host transfer."""
from __future__ import annotations

import mlx.core as mx

from engine.messages import TokenLogprob


def top_logprobs(dist: mx.array, chosen: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Row i of `dist` (rows x vocab log-probabilities): `chosen[i]`'s value and the `ks[i]` most
    likely tokens, sorted; tokens a grammar masked (-inf) are never listed."""
    picked = mx.take_along_axis(dist, mx.array(chosen)[:, None], axis=1)[:, 0]
    k = max(ks)
    if k:
        top_ids = mx.argpartition(-dist, k - 1, axis=1)[:, :k]
        top_lps = mx.take_along_axis(dist, top_ids, axis=1)
        mx.eval(picked, top_ids, top_lps)
        ids, lps = top_ids.tolist(), top_lps.tolist()
    else:
        mx.eval(picked)
        ids = lps = [[] for _ in chosen]
    out = []
    for value, row_ids, row_lps, row_k in zip(picked.tolist(), ids, lps, ks):
        ranked = sorted(((i, v) for i, v in zip(row_ids, row_lps) if v > float("-inf")),
                        key=lambda pair: (-pair[1], pair[0]))
        out.append(TokenLogprob(value, tuple(ranked[:row_k])))
    return out
