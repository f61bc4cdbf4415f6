"""Markdown tables, A/B ratios and the JSON result document."""
from __future__ import annotations

import json
import os
import platform
import socket
from datetime import datetime, timezone

from bench.stats import ratio

# (header, summary key, scale, format)
COLUMNS = [
    ("c", "concurrency", 1, "{:d}"),
    ("reqs", "requests", 1, "{:d}"),
    ("ok %", "success_rate", 100, "{:.1f}"),
    ("lat mean s", "latency_mean", 1, "{:.3f}"),
    ("lat p50 s", "latency_p50", 1, "{:.3f}"),
    ("lat p95 s", "latency_p95", 1, "{:.3f}"),
    ("lat p99 s", "latency_p99", 1, "{:.3f}"),
    ("TTFT p50 ms", "ttft_p50", 1000, "{:.1f}"),
    ("TTFT p95 ms", "ttft_p95", 1000, "{:.1f}"),
    ("ITL mean ms", "itl_mean", 1000, "{:.2f}"),
    ("ITL p95 ms", "itl_p95", 1000, "{:.2f}"),
    ("req/s", "req_per_s", 1, "{:.2f}"),
    ("out tok/s", "tok_per_s", 1, "{:.1f}"),
    ("tok/s/stream", "stream_tok_per_s", 1, "{:.1f}"),
]


def _fmt(value, scale, fmt) -> str:
    return "-" if value is None else fmt.format(value * scale if scale != 1 else value)


def _errors(errs: dict) -> str:
    return ", ".join(f"{k}:{v}" for k, v in errs.items()) or "-"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """Render a markdown table with right-aligned, padded columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def results_table(records: list[dict], show_target: bool) -> str:
    """One row per (level, target)."""
    headers = (["target"] if show_target else []) + [c[0] for c in COLUMNS] + ["errors"]
    rows = []
    for rec in records:
        s = rec["summary"]
        row = [rec["target"]] if show_target else []
        row += [_fmt(s[key], scale, fmt) for _, key, scale, fmt in COLUMNS]
        rows.append(row + [_errors(s["errors"])])
    return markdown_table(headers, rows)


def comparisons(records: list[dict], labels: list[str]) -> list[dict]:
    """Per level, ratio of each other target to the first (B/A)."""
    by = {(r["target"], r["summary"]["concurrency"]): r["summary"] for r in records}
    base, out = labels[0], []
    for other in labels[1:]:
        for (lab, c), s in by.items():
            if lab != other or (base, c) not in by:
                continue
            a = by[(base, c)]
            out.append({"concurrency": c, "a": base, "b": other,
                        "tok_per_s_a": a["tok_per_s"], "tok_per_s_b": s["tok_per_s"],
                        "tok_per_s_ratio": ratio(s["tok_per_s"], a["tok_per_s"]),
                        "ttft_p95_a": a["ttft_p95"], "ttft_p95_b": s["ttft_p95"],
                        "ttft_p95_ratio": ratio(s["ttft_p95"], a["ttft_p95"])})
    return out


def comparison_table(comps: list[dict]) -> str:
    """Markdown table of B/A ratios (>1 tok/s is better for B, <1 TTFT is better)."""
    headers = ["c", "A", "B", "A tok/s", "B tok/s", "tok/s B/A",
               "A TTFT p95 ms", "B TTFT p95 ms", "TTFT p95 B/A"]
    rows = [[str(x["concurrency"]), x["a"], x["b"],
             _fmt(x["tok_per_s_a"], 1, "{:.1f}"), _fmt(x["tok_per_s_b"], 1, "{:.1f}"),
             _fmt(x["tok_per_s_ratio"], 1, "{:.3f}"),
             _fmt(x["ttft_p95_a"], 1000, "{:.1f}"), _fmt(x["ttft_p95_b"], 1000, "{:.1f}"),
             _fmt(x["ttft_p95_ratio"], 1, "{:.3f}")] for x in comps]
    return markdown_table(headers, rows)


def host_info() -> dict:
    """Where the client ran."""
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def build_document(args: dict, argv: list[str], targets: list, records: list[dict],
                   comps: list[dict]) -> dict:
    """Everything worth keeping from a run, JSON-serializable."""
    safe_args = {k: ("***" if k == "api_key" and v else v) for k, v in args.items()}
    return {
        "meta": {"tool": "orchard-bench", "version": 1,
                 "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "argv": ["***" if i and argv[i - 1] == "--api-key" else a
                          for i, a in enumerate(argv)],
                 "args": safe_args, "host": host_info()},
        "targets": [{"label": t.label, "url": t.url, "model": t.spec.model,
                     "max_tokens": t.spec.max_tokens, "temperature": t.spec.temperature,
                     "ignore_eos": t.spec.ignore_eos,
                     "include_usage": t.spec.include_usage, "notes": t.notes}
                    for t in targets],
        "levels": records,
        "comparisons": comps,
    }


def write_json(doc: dict, path: str) -> None:
    """Write the document, creating parent folders."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
