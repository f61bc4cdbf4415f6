"""PNG charts of a run (matplotlib imported lazily, Agg backend)."""
from __future__ import annotations

import os


def plot_records(records: list[dict], labels: list[str], path: str,
                 title: str = "") -> None:
    """Left: aggregate output tok/s vs concurrency. Right: latency p50/p95 and
    TTFT p95 vs concurrency. One colour per target, one line style per metric."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        rows = sorted((r["summary"] for r in records if r["target"] == label),
                      key=lambda s: s["concurrency"])
        cs = [s["concurrency"] for s in rows]
        col = colors[i % len(colors)]
        ax_tp.plot(cs, [s["tok_per_s"] for s in rows], "o-", color=col, label=label)
        for key, style, name in (("latency_p50", "o-", "e2e p50"),
                                 ("latency_p95", "s--", "e2e p95"),
                                 ("ttft_p95", "^:", "TTFT p95")):
            ys = [s[key] if s[key] is not None else float("nan") for s in rows]
            ax_lat.plot(cs, ys, style, color=col, label=f"{label} {name}")
    ax_tp.set(xlabel="concurrency", ylabel="output tokens/s (aggregate)",
              title="Throughput")
    ax_lat.set(xlabel="concurrency", ylabel="seconds", title="Latency")
    levels = sorted({r["summary"]["concurrency"] for r in records})
    for ax in (ax_tp, ax_lat):
        ax.set_xticks(levels)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
