"""Command line: parse options, run the levels, print/write the results."""
from __future__ import annotations

import argparse
import asyncio
import sys

from bench.client import RequestSpec
from bench.prompts import load_prompts
from bench.report import (build_document, comparison_table, comparisons,
                          results_table, write_json)
from bench.runner import BenchError, Progress, Target, run_all

DEFAULT_URL = "http://127.0.0.1:8001/v1"
DEFAULT_LEVELS = "1,2,5,8,10,15,20"


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad concurrency list {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return levels


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Closed-loop streaming benchmark for OpenAI-compatible chat servers. "
                    "For each concurrency level c, c workers send streaming "
                    "/chat/completions requests back-to-back until the level's "
                    "request count is done.")
    p.add_argument("--url", action="append", metavar="BASE_URL",
                   help=f"base URL including /v1 (default {DEFAULT_URL}); repeat for A/B")
    p.add_argument("--url-b", metavar="BASE_URL", help="second target (A/B mode)")
    p.add_argument("--label-a", default="A", help="label of the first target (default A)")
    p.add_argument("--label-b", default="B", help="label of the second target (default B)")
    p.add_argument("--model", help="model id (default: first id from GET <url>/models, "
                                   "per target)")
    p.add_argument("--concurrency", type=_levels, default=_levels(DEFAULT_LEVELS),
                   metavar="LIST", help=f"comma-separated levels (default {DEFAULT_LEVELS})")
    p.add_argument("--requests-per-level", type=_positive, metavar="N",
                   help="requests per level (default max(3*c, 10))")
    p.add_argument("--max-tokens", type=_positive, default=64, help="default 64")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send \"ignore_eos\": true so every request generates max-tokens "
                        "(default on; dropped automatically if the server answers 400)")
    p.add_argument("--usage", action=argparse.BooleanOptionalAction, default=True,
                   help="send stream_options.include_usage and count tokens from the "
                        "usage chunk (default on; else content chunks are counted)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="unrecorded requests per target before the first level (default 1; "
                        "one probe request is always sent)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="per-request timeout in seconds (default 300)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompt file (.txt one per line, .json list, .jsonl); "
                        "default: built-in fixed set, used in order")
    p.add_argument("--json", metavar="OUT.json", help="write raw numbers + metadata")
    p.add_argument("--plot", metavar="OUT.png", help="write a PNG chart (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--processes", type=_positive, default=1, metavar="P",
                   help="client processes a level's streams are spread over (default 1; use more "
                        "where one Python process cannot keep up with the server's events)")
    return p


def make_targets(args) -> list[Target]:
    """Targets in A, B, C... order from --url (repeated) and --url-b."""
    urls = list(args.url or []) + ([args.url_b] if args.url_b else [])
    if not urls:
        urls = [DEFAULT_URL]
    labels = [args.label_a, args.label_b] + [chr(ord("C") + i) for i in range(len(urls))]
    targets = []
    for url, label in zip(urls, labels):
        spec = RequestSpec(model=args.model or "", max_tokens=args.max_tokens,
                           temperature=args.temperature, ignore_eos=args.ignore_eos,
                           include_usage=args.usage, api_key=args.api_key)
        targets.append(Target(label, url.rstrip("/"), spec))
    if len({t.label for t in targets}) != len(targets):
        raise BenchError("target labels must be distinct")
    return targets


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return a process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error
        return exc.code if isinstance(exc.code, int) else 2
    n_for_level = ((lambda c: args.requests_per_level) if args.requests_per_level
                   else (lambda c: max(3 * c, 10)))
    try:
        targets = make_targets(args)
        prompts = load_prompts(args.prompts)
        records = asyncio.run(run_all(targets, args.concurrency, n_for_level, prompts,
                                      args.timeout, max(args.warmup, 0),
                                      Progress(enabled=not args.quiet), args.processes))
    except (BenchError, ValueError, OSError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    labels = [t.label for t in targets]
    out = sys.stdout
    out.write("\n")
    for t in targets:
        out.write(f"{t.label}: {t.url} model={t.spec.model} max_tokens={t.spec.max_tokens}"
                  f" ignore_eos={t.spec.ignore_eos} usage={t.spec.include_usage}\n")
        for note in t.notes:
            out.write(f"  note: {note}\n")
    out.write("\n" + results_table(records, show_target=len(targets) > 1) + "\n")
    comps = comparisons(records, labels) if len(targets) > 1 else []
    if comps:
        out.write(f"\nRatios are B/A ({' and '.join(labels[1:])} over {labels[0]}): "
                  "tok/s B/A > 1 and TTFT B/A < 1 favour B.\n\n"
                  + comparison_table(comps) + "\n")
    if args.json:
        write_json(build_document(vars(args), argv, targets, records, comps), args.json)
        out.write(f"\nwrote {args.json}\n")
    if args.plot:
        from bench.plot import plot_records
        try:
            plot_records(records, labels, args.plot,
                         title=" vs ".join(f"{t.label}: {t.url}" for t in targets))
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        out.write(f"wrote {args.plot}\n")
    return 0
