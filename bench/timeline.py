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


def occupancy(records: list[dict], wall_s: float, bucket_s: float) -> list[tuple[float, int, int]]:
    """(time, in flight, decoding) at every bucket boundary of the level's wall time.

    In flight: sent and not yet finished. Decoding: first token seen and not yet finished."""
    spans = [(r["start"], r["start"] + (r["e2e"] if r.get("ttft") is None else r["ttft"]), r["start"] + r["e2e"])
             for r in records if r.get("ok") and r.get("e2e") is not None]
    rows, t = [], 0.0
    while t < wall_s:
        in_flight = sum(1 for start, _, end in spans if start <= t < end)
        decoding = sum(1 for _, first, end in spans if first <= t < end)
        rows.append((round(t, 3), in_flight, decoding))
        t += bucket_s
    return rows


def summarize(level: dict, bucket_s: float = 0.1) -> dict:
    summary = level["summary"]
    rows = occupancy(level["requests"], summary["wall_s"], bucket_s)
    n = len(rows) or 1
    return {"concurrency": summary["concurrency"], "wall_s": summary["wall_s"],
            "mean_in_flight": round(sum(r[1] for r in rows) / n, 1),
            "mean_decoding": round(sum(r[2] for r in rows) / n, 1), "timeline": rows}


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
