"""How full the server's batch was over one level, seen from the client's request records.

A closed-loop level's throughput is (streams decoding on average) x (per-stream speed). This
turns the bench JSON's per-request records (start, TTFT, end) into that average and a
timeline, so a gap between "requests in flight" and "requests decoding" shows where the
time went: waiting for the first token (queueing, admission, prefill), not decoding.

    python -m bench.timeline RESULT.json [--level 64] [--bucket 0.1]
"""
from __future__ import annotations

import argparse
import json
import sys


def _spans(records: list[dict]) -> list[tuple[float, float, float]]:
    """(sent, first token, finished) of every request that succeeded."""
    return [(r["start"], r["start"] + (r["e2e"] if r.get("ttft") is None else r["ttft"]), r["start"] + r["e2e"])
            for r in records if r.get("ok") and r.get("e2e") is not None]


def occupancy(records: list[dict], wall_s: float, bucket_s: float) -> list[tuple[float, int, int]]:
    """(time, in flight, decoding) at every bucket boundary of the level's wall time.

    In flight: sent and not yet finished. Decoding: first token seen and not yet finished."""
    spans = _spans(records)
    rows, t = [], 0.0
    while t < wall_s:
        in_flight = sum(1 for start, _, end in spans if start <= t < end)
        decoding = sum(1 for _, first, end in spans if first <= t < end)
        rows.append((round(t, 3), in_flight, decoding))
        t += bucket_s
    return rows


def summarize(level: dict, bucket_s: float = 0.1) -> dict:
    """Exact time-weighted means (not the sampled rows: a short level could fall between them)."""
    summary = level["summary"]
    wall = summary["wall_s"]
    spans = _spans(level["requests"])
    in_flight = sum(min(end, wall) - min(start, wall) for start, _, end in spans)
    decoding = sum(min(end, wall) - min(first, wall) for _, first, end in spans)
    return {"concurrency": summary["concurrency"], "wall_s": wall,
            "mean_in_flight": round(in_flight / wall, 2) if wall > 0 else 0.0,
            "mean_decoding": round(decoding / wall, 2) if wall > 0 else 0.0,
            "timeline": occupancy(level["requests"], wall, bucket_s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="a JSON file written by `orchard bench --json`")
    parser.add_argument("--level", type=int, help="concurrency level (default: every level)")
    parser.add_argument("--bucket", type=float, default=0.1, help="seconds per timeline row (default 0.1)")
    args = parser.parse_args(argv)
    levels = json.load(open(args.result))["levels"]
    for level in levels:
        if args.level is not None and level["summary"]["concurrency"] != args.level:
            continue
        s = summarize(level, args.bucket)
        print(f"c={s['concurrency']} wall {s['wall_s']:.2f} s: on average {s['mean_in_flight']} in flight, "
              f"{s['mean_decoding']} decoding")
        for t, in_flight, decoding in s["timeline"]:
            print(f"  {t:7.2f} s  in flight {in_flight:4d}  decoding {decoding:4d}  {'#' * round(decoding / 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
