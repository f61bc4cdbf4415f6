"""Per-model Prometheus gauges (label `model`), read from the catalog at scrape time, so a model
that is configured but not loaded is reported too (state 0, no weights)."""
from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

_STATES = ("loaded", "loading", "unloaded", "failed", "stopped", "remote")


class ModelCollector:
    def __init__(self, catalog):
        self._catalog = catalog

    def describe(self):
        return []  # collected at scrape time only: the set of models is the catalog's

    def collect(self):
        state = GaugeMetricFamily("orchard:model_state", "1 for the model's current state", labels=["model", "state"])
        gauges = {name: GaugeMetricFamily(f"orchard:model_{name}", doc, labels=["model"]) for name, doc in (
            ("size_bytes", "Bytes of the model's weights (an estimate until loaded)"),
            ("requests_running", "The model's sequences in its running batch"),
            ("requests_waiting", "The model's requests waiting for a slot or a load"),
            ("generation_tokens", "Tokens the model generated"),
            ("loads", "Times the model's weights were loaded on demand"),
            ("unloads", "Times the model's weights were unloaded"))}
        for row in self._catalog.report():
            for name in _STATES:
                state.add_metric([row["id"], name], 1.0 if row["state"] == name else 0.0)
            if "weight_bytes" not in row:
                continue
            values = {"size_bytes": row["weight_bytes"], "requests_running": row["running"],
                      "requests_waiting": row["waiting"], "generation_tokens": row["generated_tokens"],
                      "loads": row["loads"], "unloads": row["unloads"]}
            for name, value in values.items():
                gauges[name].add_metric([row["id"]], float(value))
        yield state
        yield from gauges.values()
