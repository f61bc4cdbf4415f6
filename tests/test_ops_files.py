"""Operations files: service units, launchd plists, install scripts, monitoring config.

Static checks always run; the external tools (systemd-analyze, promtool, shellcheck,
plutil) are used when present and their tests skip otherwise. Install scripts only ever
run with --dry-run, temp directories and a PATH whose mutating commands are stubs that
record any call, so nothing here can touch the machine.
"""
from __future__ import annotations

import http.server
import inspect
import json
import os
import plistlib
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

try:  # the `test` extra installs PyYAML; without it only the YAML tests skip
    import yaml
except ImportError:  # pragma: no cover
    yaml = None
needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML not installed (pip install -e '.[test]')")

from config.settings import DEFAULTS, load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# What the server exports (app/metrics.py). Counters with their _total sample name,
# histograms by family name (the _bucket/_sum/_count samples are derived).
HISTOGRAMS = {
    "orchard:time_to_first_token_seconds",
    "orchard:inter_token_latency_seconds",
    "orchard:e2e_request_latency_seconds",
    "orchard:request_queue_time_seconds",
}
COUNTERS = {
    "orchard:prompt_tokens_total",
    "orchard:prompt_tokens_cached_total",
    "orchard:generation_tokens_total",
    "orchard:request_success_total",
    "orchard:http_requests_total",
}
GAUGES = {
    "orchard:num_requests_running",
    "orchard:num_requests_waiting",
    "orchard:request_queue_capacity",
    "orchard:batch_size",
    "orchard:kv_cache_bytes",
    "orchard:prefix_cache_bytes",
    "orchard:prefix_cache_entries",
    "orchard:mlx_active_memory_bytes",
    "orchard:mlx_peak_memory_bytes",
    "orchard:engine_up",
    "orchard:process_resident_memory_bytes",
    "orchard:process_cpu_percent",
    "orchard:system_memory_used_ratio",
    "orchard:model_weight_bytes",
}
EXPORTED = HISTOGRAMS | COUNTERS | GAUGES
# Per model, labelled {model} (model_state also {state}): app/model_metrics.py, collected from
# the catalog of served models at scrape time.
PER_MODEL_GAUGES = {
    "orchard:model_state",
    "orchard:model_size_bytes",
    "orchard:model_requests_running",
    "orchard:model_requests_waiting",
    "orchard:model_generation_tokens",
    "orchard:model_loads",
    "orchard:model_unloads",
}
# Every name a PromQL expression may use: Prometheus' own `up` plus the exported samples.
QUERYABLE = ({"up"} | COUNTERS | GAUGES | PER_MODEL_GAUGES
             | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")})

GRACEFUL_TIMEOUT = int(DEFAULTS["GRACEFUL_TIMEOUT"])
# The operations scripts (scripts/ also holds unrelated helpers).
SHELL_SCRIPTS = sorted(
    [*(ROOT / "systemd").glob("*.sh"), *(ROOT / "launchd").glob("*.sh"),
     *(ROOT / "scripts").glob("*install-systemd.sh"), *(ROOT / "scripts").glob("*install-launchd.sh")]
)
UNITS = ("orchard.service", "orchard-watchdog.service", "orchard-watchdog.timer")


# --------------------------------------------------------------------------- helpers

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                 "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (good enough for the expressions in this repo)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)                 # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                           # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                          # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = m.group(0)
        rest = expr[m.end():].lstrip()
        if rest.startswith("("):                                    # function call
            continue
        if word.lower() in _PROMQL_WORDS or word.startswith("$"):
            continue
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] in ".$"):
            continue                                                # 1e3, 0.5, $var
        names.add(word)
    return names


def test_promql_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (job, le) (rate(orchard:e2e_request_latency_seconds_bucket'
            '{route!~"/health|x"}[5m]))) > 5 or up{job="orchard"} == 0 and on(instance) orchard:engine_up')
    assert promql_metric_names(expr) == {"orchard:e2e_request_latency_seconds_bucket", "up", "orchard:engine_up"}


def read_unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """systemd unit as {section: [(key, value), ...]}; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def unit_value(unit: dict, section: str, key: str) -> str:
    values = unit_values(unit, section, key)
    assert values, f"{key}= missing from [{section}]"
    return values[-1]


def seconds(value: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(s|sec|min|m)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def env_production() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.production").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def load_plist(name: str) -> dict:
    with open(ROOT / "launchd" / name, "rb") as f:
        return plistlib.load(f)


def render(text: str, **values: str) -> str:
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    assert not re.search(r"@[A-Z_]+@", text), "placeholder left after rendering"
    return text


def fake_checkout(root: Path) -> Path:
    """An install prefix: the templates and scripts of this checkout plus a stub venv."""
    prefix = root / "opt" / "orchard"
    for d in ("systemd", "launchd", "logrotate", "newsyslog"):
        shutil.copytree(ROOT / d, prefix / d)
    for f in ("gunicorn.conf.py", ".env.production"):
        shutil.copy(ROOT / f, prefix / f)
    venv = prefix / ".venv" / "bin"
    venv.mkdir(parents=True)
    for exe in ("python", "orchard"):
        (venv / exe).write_text("#!/bin/sh\nexit 0\n")
        (venv / exe).chmod(0o755)
    return prefix


MUTATING = ("systemctl", "useradd", "userdel", "groupadd", "groupdel", "launchctl", "sudo", "install", "cp",
            "rm", "mkdir", "chown", "chgrp", "chmod", "ln", "mv", "plutil", "tee", "runuser", "logrotate")


def stub_path(root: Path, names=MUTATING) -> tuple[dict[str, str], Path]:
    """Environment whose PATH starts with stubs that record their calls (default: every
    command that could change the system)."""
    bin_dir = Path(tempfile.mkdtemp(dir=root, prefix="stub-bin-"))
    log = bin_dir.with_suffix(".log")
    for name in names:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 0\n')
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def run_script(script: str, *args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


class _HealthServer:
    """GET /health on a loopback port: answers the codes in `codes`, then the last one forever."""

    def __init__(self, codes: list[int]):
        self.codes, self.hits = list(codes), 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                code = outer.codes[min(outer.hits, len(outer.codes) - 1)]
                outer.hits += 1
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def health_server():
    servers = []

    def start(codes):
        servers.append(_HealthServer(codes))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _port_nobody_listens_on() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- monitoring

def load_alert_rules() -> list[dict]:
    doc = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())


def dashboard_targets(dash: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


@needs_yaml
def test_alerts_parse_with_objectives():
    rules = {r["alert"]: r for r in load_alert_rules()}
    assert set(rules) >= {"OrchardDown", "OrchardLatencyP95High", "OrchardSuccessRateLow", "OrchardMemoryHigh",
                          "OrchardCPUHigh", "OrchardQueueFull"}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
    flat = {name: " ".join(rule["expr"].split()) for name, rule in rules.items()}
    # The seed report's objectives.
    assert "histogram_quantile(0.95," in flat["OrchardLatencyP95High"]
    assert "orchard:e2e_request_latency_seconds_bucket" in flat["OrchardLatencyP95High"]
    assert flat["OrchardLatencyP95High"].endswith("> 5")
    assert 'status=~"5.."' in flat["OrchardSuccessRateLow"] and flat["OrchardSuccessRateLow"].endswith("> 0.01")
    assert flat["OrchardMemoryHigh"] == "orchard:system_memory_used_ratio > 0.7"
    assert flat["OrchardCPUHigh"] == "orchard:process_cpu_percent > 60"
    assert "up{" in flat["OrchardDown"] and "orchard:engine_up" in flat["OrchardDown"]
    assert "orchard:num_requests_waiting >= 0.9 * orchard:request_queue_capacity" in flat["OrchardQueueFull"]


@needs_yaml
def test_alerts_use_only_exported_metrics():
    for rule in load_alert_rules():
        unknown = promql_metric_names(rule["expr"]) - QUERYABLE
        assert not unknown, f"{rule['alert']} uses metrics the server does not export: {unknown}"


def test_dashboard_parses_and_uses_only_exported_metrics():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    used = set()
    for title, expr in dashboard_targets(dash):
        names = promql_metric_names(expr)
        assert not names - QUERYABLE, f"panel {title!r} uses unknown metrics: {names - QUERYABLE}"
        used |= names
    # Every panel the brief asks for has its metric on the dashboard.
    for needed in ("orchard:generation_tokens_total", "orchard:http_requests_total",
                   "orchard:time_to_first_token_seconds_bucket", "orchard:e2e_request_latency_seconds_bucket",
                   "orchard:inter_token_latency_seconds_bucket", "orchard:num_requests_running",
                   "orchard:num_requests_waiting", "orchard:request_queue_capacity", "orchard:batch_size",
                   "orchard:mlx_active_memory_bytes", "orchard:process_resident_memory_bytes",
                   "orchard:kv_cache_bytes", "orchard:process_cpu_percent"):
        assert needed in used, f"no dashboard panel shows {needed}"


@needs_yaml
def test_prometheus_config():
    cfg = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert cfg["global"]["scrape_interval"] == "15s"
    assert "alerts.yml" in cfg["rule_files"]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "orchard")
    assert job["metrics_path"] == "/metrics"
    port = DEFAULTS["PORT"]
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]
    assert env_production().get("PORT", port) == port
    # The bearer-token option is documented, commented out.
    assert "credentials_file" in (ROOT / "monitoring" / "prometheus.yml").read_text()


def nginx_upstream_ports() -> list[int]:
    """The instances of `upstream orchard` in deploy/nginx/orchard.conf."""
    conf = (ROOT / "deploy" / "nginx" / "orchard.conf").read_text()
    block = re.search(r"upstream orchard \{(.*?)\}", conf, re.S).group(1)
    return [int(port) for port in re.findall(r"^\s*server 127\.0\.0\.1:(\d+) ", block, re.M)]


@needs_yaml
def test_replica_prometheus_config_scrapes_every_nginx_upstream():
    single = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    replicas = yaml.safe_load((ROOT / "monitoring" / "prometheus-replicas.yml").read_text())
    assert replicas["global"] == single["global"] and replicas["rule_files"] == single["rule_files"]
    job = next(j for j in replicas["scrape_configs"] if j["job_name"] == "orchard")  # alerts.yml selects job="orchard"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert nginx_upstream_ports() == [8001, 8002, 8003]
    assert targets == [f"127.0.0.1:{port}" for port in nginx_upstream_ports()]


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


@needs_promtool
def test_promtool_check_config_and_rules():
    for args in (["check", "config", "prometheus.yml"], ["check", "config", "prometheus-replicas.yml"],
                 ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts.test.yml"]):
        r = subprocess.run(["promtool", *args], cwd=ROOT / "monitoring", capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"


@needs_promtool
@needs_yaml
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool has no expression checker; recording rules made of the panel queries do."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_targets(dashboard())):
        expr = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


class _Anything:
    """Stands in for the engine: every attribute is another _Anything, every number 0."""

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getitem__(self, key):
        return _Anything()

    def __float__(self):
        return 0.0

    def __int__(self):
        return 0

    __index__ = __int__


def _exported_families(registry) -> set[str]:
    """Family names as EXPORTED spells them: prometheus_client drops a counter's _total."""
    return {family.name + "_total" if family.type == "counter" else family.name for family in registry.collect()}


def test_metric_list_matches_app_metrics():
    """The list above is what app/metrics.py registers (skips until the module exists)."""
    metrics_mod = pytest.importorskip("app.metrics", reason="app/metrics.py not written yet")
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    cls = getattr(metrics_mod, "Metrics", None)
    if cls is None:
        pytest.skip("app.metrics has no Metrics class")
    settings = load_settings({}, dotenv=False)
    kwargs = {}
    for name in list(inspect.signature(cls).parameters):
        kwargs[name] = settings if name == "settings" else _Anything()
    metrics = cls(**kwargs)
    registry = getattr(metrics, "registry", None)
    if not isinstance(registry, CollectorRegistry):
        registry = next((v for v in vars(metrics).values() if isinstance(v, CollectorRegistry)), None)
    assert registry is not None, "Metrics keeps no CollectorRegistry"
    exported = _exported_families(registry)
    assert exported == EXPORTED, (f"dashboards/alerts expect {sorted(EXPORTED - exported)} (missing) and do not "
                                  f"know {sorted(exported - EXPORTED)}: update EXPORTED and monitoring/")


def test_metric_list_matches_live_metrics_endpoint(tiny_model_dir):
    """GET /metrics of a real app on the tiny model (skips until the route exists)."""
    pytest.importorskip("app.metrics", reason="app/metrics.py not written yet")
    import gevent

    from app import create_app

    settings = load_settings({"MODEL": str(tiny_model_dir), "MODEL_ID": "tiny"}, dotenv=False)
    app = create_app(settings)
    try:
        client = app.test_client()
        with gevent.Timeout(120):
            while client.get("/health").status_code != 200:
                gevent.sleep(0.05)
        response = client.get("/metrics")
        if response.status_code in (401, 403, 404):
            pytest.skip(f"/metrics answers {response.status_code}")
        assert response.status_code == 200
        text = response.get_data(as_text=True)
    finally:
        app.extensions["orchard"].engine.shutdown()
    families = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            families[m.group(1)] = m.group(2)
    # prometheus_client also exposes <counter/histogram>_created as gauges: not metrics of ours.
    created = {name for name in families if name.endswith("_created")
               and {families.get(name[: -len("_created")]), families.get(name[: -len("_created")] + "_total")}
               & {"counter", "histogram"}}
    exported = {name + "_total" if kind == "counter" and not name.endswith("_total") else name
                for name, kind in families.items() if name.startswith("orchard:") and name not in created}
    expected = EXPORTED | PER_MODEL_GAUGES
    assert exported == expected, f"missing {sorted(expected - exported)}, unknown {sorted(exported - expected)}"


# --------------------------------------------------------------------------- systemd

def test_orchard_service_settings():
    unit = read_unit("orchard.service")
    s = "Service"
    assert unit_value(unit, s, "Type") == "simple"
    assert unit_value(unit, s, "Restart") == "always"
    assert seconds(unit_value(unit, s, "RestartSec")) > 0
    assert unit_value(unit, s, "KillSignal") == "SIGTERM"
    assert unit_value(unit, s, "KillMode") == "mixed"
    assert seconds(unit_value(unit, s, "TimeoutStartSec")) >= 300, "too short to load a model"
    assert unit_value(unit, s, "User") == unit_value(unit, s, "Group") == "@ORCHARD_USER@"
    assert unit_value(unit, s, "ExecStart").startswith("@ORCHARD_DIR@/.venv/bin/")
    assert "gunicorn -c @ORCHARD_DIR@/gunicorn.conf.py" in unit_value(unit, s, "ExecStart")
    assert "orchard-ready.sh" in unit_value(unit, s, "ExecStartPost")
    assert "@ORCHARD_DIR@/.env.production" in unit_values(unit, s, "EnvironmentFile")
    assert not unit_values(unit, s, "ExecReload"), "SIGHUP would load a second copy of the model"
    assert unit_value(unit, s, "StateDirectory") == "orchard"
    assert unit_value(unit, s, "StandardOutput") == "journal"
    # Enough descriptors for every gevent connection.
    assert int(unit_value(unit, s, "LimitNOFILE")) >= 4 * int(DEFAULTS["WORKER_CONNECTIONS"])
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectControlGroups",
                "RestrictSUIDSGID", "LockPersonality"):
        assert unit_value(unit, s, key) == "yes", key
    assert unit_value(unit, s, "ProtectSystem") == "strict"
    # MLX's CPU backend compiles and dlopen()s kernels at run time.
    assert not unit_values(unit, s, "MemoryDenyWriteExecute")
    assert "MemoryDenyWriteExecute" in (ROOT / "systemd" / "orchard.service").read_text(), "say why it is off"
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


def test_instance_unit_is_orchard_service_on_the_port_of_its_name():
    single, instance = read_unit("orchard.service"), read_unit("orchard@.service")
    s = "Service"
    # Every setting but the per-port ones is the same as orchard.service's (hardening included).
    per_port = {"Description", "ExecStartPre", "ExecStart", "ExecStartPost", "EnvironmentFile", "SyslogIdentifier"}
    for section in ("Unit", "Service", "Install"):
        assert ([kv for kv in single[section] if kv[0] not in per_port]
                == [kv for kv in instance[section] if kv[0] not in per_port]), section
    # The port is the instance name and wins over PORT in the environment files.
    assert unit_value(instance, s, "ExecStart") == ("/usr/bin/env PORT=%i " + unit_value(single, s, "ExecStart"))
    assert unit_value(instance, s, "ExecStartPost") == ("/usr/bin/env PORT=%i "
                                                        + unit_value(single, s, "ExecStartPost"))
    assert "PORT=%i exec" in unit_value(instance, s, "ExecStartPre")
    assert unit_values(instance, s, "EnvironmentFile") == [*unit_values(single, s, "EnvironmentFile"),
                                                           "-/etc/orchard/orchard-%i.env"]
    assert unit_value(instance, s, "SyslogIdentifier") == "orchard-%i"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_instances(tmp_path):
    prefix = fake_checkout(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    text = render((ROOT / "systemd" / "orchard@.service").read_text(), ORCHARD_DIR=str(prefix),
                  ORCHARD_USER="orchard")
    names = [f"orchard@{port}.service" for port in nginx_upstream_ports()]
    for name in names:  # an instance's file: %i is its port
        (units / name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=units, capture_output=True,
                       text=True, timeout=120)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "orchard" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_watchdog_units():
    timer = read_unit("orchard-watchdog.timer")
    assert seconds(unit_value(timer, "Timer", "OnUnitActiveSec")) == 30
    assert unit_value(timer, "Timer", "Unit") == "orchard-watchdog.service"
    service = read_unit("orchard-watchdog.service")
    assert unit_value(service, "Service", "Type") == "oneshot"
    assert "orchard-watchdog.sh" in unit_value(service, "Service", "ExecStart")
    failures = [v for v in unit_values(service, "Service", "Environment") if v.startswith("ORCHARD_WATCHDOG_FAILURES=")]
    assert failures and int(failures[0].partition("=")[2]) >= 2, "one slow answer must not restart the server"


def test_shutdown_ordering():
    """engine drain < GRACEFUL_TIMEOUT < systemd TimeoutStopSec and launchd ExitTimeOut."""
    graceful = max(GRACEFUL_TIMEOUT, int(env_production().get("GRACEFUL_TIMEOUT", GRACEFUL_TIMEOUT)))
    if "DRAIN_TIMEOUT" in DEFAULTS:  # the engine's own drain, inside Gunicorn's
        drain = max(int(DEFAULTS["DRAIN_TIMEOUT"]), int(env_production().get("DRAIN_TIMEOUT", 0)))
        assert drain < graceful, f"DRAIN_TIMEOUT={drain} must be below GRACEFUL_TIMEOUT={graceful}"
    stop = seconds(unit_value(read_unit("orchard.service"), "Service", "TimeoutStopSec"))
    exit_timeout = load_plist("com.orchard.server.plist")["ExitTimeOut"]
    assert graceful < stop, f"TimeoutStopSec={stop} must exceed GRACEFUL_TIMEOUT={graceful}"
    assert graceful < exit_timeout, f"ExitTimeOut={exit_timeout} must exceed GRACEFUL_TIMEOUT={graceful}"
    assert graceful < int(DEFAULTS["TIMEOUT"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    prefix = fake_checkout(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        (units / name).write_text(render(text, ORCHARD_DIR=str(prefix), ORCHARD_USER="orchard"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *UNITS], cwd=units, capture_output=True,
                       text=True, timeout=120)
    # Only complaints about our units count (a container may warn about its own units).
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "orchard" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_logging_config_for_linux():
    logrotate = (ROOT / "logrotate" / "orchard").read_text()
    dropin = (ROOT / "systemd" / "file-logging.conf").read_text()
    assert "/var/log/orchard/*.log" in logrotate and "copytruncate" in logrotate
    assert "append:/var/log/orchard/orchard.log" in dropin


# --------------------------------------------------------------------------- launchd

def test_server_plist():
    plist = load_plist("com.orchard.server.plist")
    assert plist["Label"] == "com.orchard.server"
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plist["ThrottleInterval"] >= 5
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] > GRACEFUL_TIMEOUT
    args = plist["ProgramArguments"]
    assert args[-1] == "@ORCHARD_DIR@/launchd/orchard-launch.sh" and (ROOT / "launchd" / "orchard-launch.sh").exists()
    assert plist["WorkingDirectory"] == "@ORCHARD_DIR@"
    assert plist["StandardOutPath"].startswith("@LOG_DIR@/") and plist["StandardErrorPath"].startswith("@LOG_DIR@/")
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 2 * int(DEFAULTS["WORKER_CONNECTIONS"])
    # The wrapper sources .env.production (launchd has no EnvironmentFile) and execs gunicorn.
    launch = (ROOT / "launchd" / "orchard-launch.sh").read_text()
    assert ". \"$1\"" in launch and "load_env .env.production" in launch
    assert re.search(r'exec "\$venv/python" -m gunicorn -c "\$dir/gunicorn.conf.py"', launch)


def test_watchdog_plist():
    plist = load_plist("com.orchard.watchdog.plist")
    assert plist["Label"] == "com.orchard.watchdog"
    assert plist["StartInterval"] == 30
    assert plist["ProgramArguments"][-1] == "@ORCHARD_DIR@/launchd/orchard-watchdog.sh"
    assert int(plist["EnvironmentVariables"]["ORCHARD_WATCHDOG_FAILURES"]) >= 2
    assert "kickstart -k" in (ROOT / "launchd" / "orchard-watchdog.sh").read_text()


def test_launchd_instances_are_the_server_job_on_their_ports(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    r = run_script("launchd/orchard-instances.sh", "--prefix", str(ROOT), "--plist-dir", f"{tmp_path}/agents",
                   "--log-dir", f"{tmp_path}/logs", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    template = plistlib.loads(render((ROOT / "launchd" / "com.orchard.server.plist").read_text(),
                                     ORCHARD_DIR=str(ROOT), LOG_DIR="LOG", ENV_OVERRIDE="ENV").encode())
    for port in (8001, 8002, 8003):
        with open(tmp_path / "agents" / f"com.orchard.server.{port}.plist", "rb") as f:
            plist = plistlib.load(f)
        assert plist["Label"] == f"com.orchard.server.{port}"
        env_vars = plist["EnvironmentVariables"]
        assert env_vars["ORCHARD_INSTANCE_PORT"] == str(port)
        assert env_vars["ORCHARD_LOG_DIR"] == f"{tmp_path}/logs/{port}"  # orchard.log and orchard.pid apart
        assert env_vars["ORCHARD_ENV_OVERRIDE"] == f"{tmp_path}/.config/orchard/orchard.env"
        assert plist["StandardOutPath"] == f"{tmp_path}/logs/{port}/orchard.launchd.log"
        assert f"launchctl bootstrap gui/{os.getuid()} {tmp_path}/agents/com.orchard.server.{port}.plist" in r.stdout
        same = {k for k in template if k not in ("Label", "EnvironmentVariables", "StandardOutPath",
                                                 "StandardErrorPath")}
        assert {k: plist[k] for k in same} == {k: template[k] for k in same}
    # The wrapper applies the instance's port after the settings files.
    launch = (ROOT / "launchd" / "orchard-launch.sh").read_text()
    assert launch.index('load_env "$ORCHARD_ENV_OVERRIDE"') < launch.index('export PORT="$ORCHARD_INSTANCE_PORT"')
    assert run_script("launchd/orchard-instances.sh", "--plist-dir", f"{tmp_path}/x", "80", env=env).returncode == 1
    assert run_script("launchd/orchard-instances.sh", "--bogus", env=env).returncode == 2


@pytest.mark.skipif(shutil.which("plutil") is None, reason="plutil (macOS) not available")
def test_plutil_lint(tmp_path):
    for name in ("com.orchard.server.plist", "com.orchard.watchdog.plist"):
        text = render((ROOT / "launchd" / name).read_text(), ORCHARD_DIR="/opt/orchard", LOG_DIR="/tmp/orchard-logs",
                      ENV_OVERRIDE="/tmp/orchard.env", LAUNCHD_DOMAIN="gui/501")
        (tmp_path / name).write_text(text)
        r = subprocess.run(["plutil", "-lint", str(tmp_path / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_newsyslog_rotates_the_launchd_logs():
    lines = [line.split() for line in (ROOT / "newsyslog" / "orchard.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    files = {fields[0]: fields for fields in lines}
    server = load_plist("com.orchard.server.plist")
    watchdog = load_plist("com.orchard.watchdog.plist")
    for path in (server["StandardOutPath"], watchdog["StandardOutPath"], "@LOG_DIR@/orchard.log"):
        assert path in files, f"newsyslog does not rotate {path}"
    for fields in lines:
        assert len(fields) >= 7 and fields[1] == "@OWNER@" and fields[2].isdigit() and fields[3].isdigit()
    # Gunicorn's own log: signal SIGUSR1 (30 on macOS) to the PID Gunicorn writes.
    gunicorn_log = files["@LOG_DIR@/orchard.log"]
    assert gunicorn_log[-2:] == ["@LOG_DIR@/orchard.pid", "30"]
    launch = (ROOT / "launchd" / "orchard-launch.sh").read_text()
    assert '--error-logfile "$log_dir/orchard.log"' in launch and '--pid "$log_dir/orchard.pid"' in launch


# --------------------------------------------------------------------------- scripts

def test_placeholders_are_filled_by_the_install_scripts():
    installers = {
        "systemd": (ROOT / "scripts" / "install-systemd.sh").read_text(),
        "logrotate": (ROOT / "scripts" / "install-systemd.sh").read_text(),
        "launchd": (ROOT / "scripts" / "install-launchd.sh").read_text(),
        "newsyslog": (ROOT / "scripts" / "install-launchd.sh").read_text(),
    }
    for folder, installer in installers.items():
        for path in (ROOT / folder).iterdir():
            if path.suffix == ".sh":
                continue
            for placeholder in set(re.findall(r"@[A-Z_]+@", path.read_text())):
                assert f"s|{placeholder}|" in installer, f"{path.name}: {placeholder} is never substituted"


def test_shell_scripts_parse():
    assert SHELL_SCRIPTS
    for script in SHELL_SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        assert "set -euo pipefail" in script.read_text(), script.name


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    r = subprocess.run(["shellcheck", "--severity=style", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _dry_run(tmp_path, script, *args):
    env, log = stub_path(tmp_path)
    r = run_script(script, "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not log.exists(), f"--dry-run ran commands:\n{log.read_text()}"
    return r.stdout


def test_install_systemd_dry_run(tmp_path):
    prefix = fake_checkout(tmp_path)
    t = tmp_path
    out = _dry_run(tmp_path, "scripts/install-systemd.sh", "--prefix", str(prefix), "--unit-dir", f"{t}/units",
                   "--logrotate-dir", f"{t}/logrotate", "--env-dir", f"{t}/etc", "--file-logs")
    assert "useradd --system" in out or "user orchard exists" in out
    for name in UNITS:
        assert f"render {prefix}/systemd/{name} -> {t}/units/{name}" in out
    assert f"@ORCHARD_DIR@={prefix}" in out
    assert f"render {prefix}/logrotate/orchard -> {t}/logrotate/orchard" in out
    assert f"{t}/units/orchard.service.d/file-logging.conf" in out
    assert out.index("systemctl daemon-reload") < out.index("systemctl enable --now orchard.service")
    assert "systemctl enable --now orchard-watchdog.timer" in out
    assert not (t / "units").exists() and not (t / "etc").exists()

    out = _dry_run(tmp_path, "scripts/install-systemd.sh", "--prefix", str(prefix), "--unit-dir", f"{t}/units",
                   "--no-watchdog", "--no-start")
    systemctl = [line for line in out.splitlines() if line.startswith("[dry-run] systemctl")]
    assert "[dry-run] systemctl enable orchard.service " in systemctl
    assert not [line for line in systemctl if "--now" in line or "watchdog" in line], systemctl


def test_uninstall_systemd_dry_run(tmp_path):
    t = tmp_path
    out = _dry_run(tmp_path, "scripts/uninstall-systemd.sh", "--unit-dir", f"{t}/units", "--logrotate-dir",
                   f"{t}/logrotate", "--env-dir", f"{t}/etc", "--purge")
    assert out.index("disable --now orchard-watchdog.timer") < out.index("disable --now orchard.service")
    assert f"rm -f {t}/units/orchard.service" in out and f"rm -f {t}/logrotate/orchard" in out
    assert "systemctl daemon-reload" in out and "rm -rf /var/lib/orchard" in out


def test_install_launchd_dry_run(tmp_path):
    prefix = fake_checkout(tmp_path)
    t = tmp_path
    out = _dry_run(tmp_path, "scripts/install-launchd.sh", "--prefix", str(prefix), "--plist-dir", f"{t}/agents",
                   "--log-dir", f"{t}/logs", "--newsyslog-dir", f"{t}/newsyslog")
    uid = os.getuid()
    for label in ("com.orchard.server", "com.orchard.watchdog"):
        assert f"{t}/agents/{label}.plist" in out
        assert f"launchctl bootstrap gui/{uid} {t}/agents/{label}.plist" in out
    assert f"@LOG_DIR@={t}/logs" in out and f"@LAUNCHD_DOMAIN@=gui/{uid}" in out
    assert f"{t}/newsyslog/orchard.conf" in out
    assert not (t / "agents").exists() and not (t / "logs").exists()

    out = _dry_run(tmp_path, "scripts/install-launchd.sh", "--system", "--user", "nobody", "--prefix", str(prefix),
                   "--plist-dir", f"{t}/daemons", "--log-dir", f"{t}/logs", "--newsyslog-dir", f"{t}/newsyslog")
    assert "plutil -replace UserName -string nobody" in out
    assert f"launchctl bootstrap system {t}/daemons/com.orchard.server.plist" in out
    assert "install -m 0644 -o root -g wheel" in out


def test_uninstall_launchd_dry_run(tmp_path):
    t = tmp_path
    out = _dry_run(tmp_path, "scripts/uninstall-launchd.sh", "--plist-dir", f"{t}/agents", "--log-dir",
                   f"{t}/logs", "--newsyslog-dir", f"{t}/newsyslog", "--purge")
    assert out.index("bootout gui/") < out.index(f"rm -f {t}/agents/com.orchard.server.plist")
    assert out.index("com.orchard.watchdog") < out.index("com.orchard.server")
    assert f"{t}/newsyslog/orchard.conf" in out and f"rm -rf {t}/logs" in out


@pytest.mark.parametrize("script", ["install-systemd.sh", "uninstall-systemd.sh", "install-launchd.sh",
                                    "uninstall-launchd.sh"])
def test_script_options(script):
    assert run_script(f"scripts/{script}", "--help").returncode == 0
    assert run_script(f"scripts/{script}", "--bogus").returncode == 2


# --------------------------------------------------------------------------- health helpers

def test_ready_script_waits_for_health(health_server):
    server = health_server([503, 503, 503, 200])
    env = {**os.environ, "HOST": "0.0.0.0", "PORT": str(server.port), "ORCHARD_READY_INTERVAL": "0.1"}
    r = run_script("systemd/orchard-ready.sh", "20", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert server.hits == 4 and "healthy" in r.stdout


def test_ready_script_gives_up(health_server):
    server = health_server([503])
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(server.port), "ORCHARD_READY_INTERVAL": "0.1"}
    start = time.monotonic()
    r = run_script("systemd/orchard-ready.sh", "1", env=env)
    assert r.returncode == 1 and "503" in r.stderr
    assert time.monotonic() - start < 10
    # Gunicorn (MAINPID) died: stop at once instead of waiting for TimeoutStartSec.
    dead = subprocess.Popen(["true"])
    dead.wait()
    env["MAINPID"] = str(dead.pid)
    r = run_script("systemd/orchard-ready.sh", env=env, timeout=10)
    assert r.returncode == 1 and "exited" in r.stderr


def _systemctl_stub(tmp_path, state: str, main_pid: int) -> tuple[dict, Path]:
    env, log = stub_path(tmp_path, ["systemctl"])
    stub = Path(env["PATH"].split(":")[0]) / "systemctl"
    stub.write_text(f"""#!/bin/sh
case "$1" in
  is-active) echo {state}; [ {state} = active ] ;;
  show) echo {main_pid} ;;
  *) echo "systemctl $*" >> "{log}" ;;
esac
""")
    return env, log


def test_systemd_watchdog_restarts_after_consecutive_failures(tmp_path, health_server):
    server = health_server([503])
    env, log = _systemctl_stub(tmp_path, "active", 0)
    env.update(PORT=str(server.port), HOST="127.0.0.1", RUNTIME_DIRECTORY=str(tmp_path / "run"),
               ORCHARD_WATCHDOG_FAILURES="3")
    for attempt in (1, 2):
        r = run_script("systemd/orchard-watchdog.sh", env=env)
        assert r.returncode == 0 and f"({attempt}/3)" in r.stdout, r.stdout + r.stderr
        assert not log.exists()
    r = run_script("systemd/orchard-watchdog.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert log.read_text().strip() == "systemctl restart --no-block orchard.service"
    assert not (tmp_path / "run" / "failures").exists(), "counter resets after a restart"

    # A healthy answer resets the count.
    (tmp_path / "run" / "failures").write_text("2\n")
    env["PORT"] = str(health_server([200]).port)
    assert run_script("systemd/orchard-watchdog.sh", env=env).returncode == 0
    assert not (tmp_path / "run" / "failures").exists()


def test_systemd_watchdog_leaves_starting_and_young_servers_alone(tmp_path, health_server):
    port = str(_port_nobody_listens_on())
    env, log = _systemctl_stub(tmp_path, "activating", 0)
    env.update(PORT=port, RUNTIME_DIRECTORY=str(tmp_path / "run"), ORCHARD_WATCHDOG_FAILURES="1")
    assert run_script("systemd/orchard-watchdog.sh", env=env).returncode == 0
    assert not log.exists(), "acted on a unit that is still loading its model"

    young = subprocess.Popen(["sleep", "30"])
    try:
        env, log = _systemctl_stub(tmp_path, "active", young.pid)
        env.update(PORT=port, RUNTIME_DIRECTORY=str(tmp_path / "run"), ORCHARD_WATCHDOG_FAILURES="1",
                   ORCHARD_WATCHDOG_GRACE="600")
        r = run_script("systemd/orchard-watchdog.sh", env=env)
        assert r.returncode == 0 and "grace" in r.stdout and not log.exists(), r.stdout + r.stderr
    finally:
        young.kill()
        young.wait()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_launchd_watchdog_kickstarts_after_consecutive_failures(tmp_path, health_server):
    server = health_server([503])
    env, log = stub_path(tmp_path, ["launchctl"])
    stub = Path(env["PATH"].split(":")[0]) / "launchctl"
    stub.write_text(f"""#!/bin/sh
if [ "$1" = print ]; then printf 'gui/501/com.orchard.server = {{\\n\\tstate = running\\n\\tpid = 1\\n}}\\n'; exit 0; fi
echo "launchctl $*" >> "{log}"
""")
    dir_ = tmp_path / "orchard"
    dir_.mkdir()
    (dir_ / ".env.production").write_text(f"HOST=127.0.0.1\nPORT={server.port}\n")
    env.update(ORCHARD_DIR=str(dir_), ORCHARD_LAUNCHD_DOMAIN="gui/501", ORCHARD_WATCHDOG_FAILURES="2",
               ORCHARD_WATCHDOG_GRACE="0", ORCHARD_WATCHDOG_STATE=str(tmp_path / "failures"))
    r = run_script("launchd/orchard-watchdog.sh", env=env)
    assert r.returncode == 0 and "(1/2)" in r.stdout and not log.exists(), r.stdout + r.stderr
    r = run_script("launchd/orchard-watchdog.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert log.read_text().strip() == "launchctl kickstart -k gui/501/com.orchard.server"
