"""The one settings object, filled from the environment and validated at start.

Every setting is read here and nowhere else. `.env` (if present in the working
directory) is loaded by python-dotenv; the service files load `.env.production`
through their own environment mechanism (systemd EnvironmentFile, launchd).
Invalid values stop start-up with a message naming the variable.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Optional


class SettingsError(ValueError):
    """A setting has a value Orchard cannot use; the message names the variable."""


def _spec(env: str, help: str, **bounds):
    return field(metadata={"env": env, "help": help, **bounds})


@dataclass(frozen=True)
class Settings:
    host: str = _spec("HOST", "address to bind")
    port: int = _spec("PORT", "TCP port", min=1, max=65535)
    model: str = _spec("MODEL", "'embedded', a .gguf file, an MLX model directory or a Hugging Face repo id")
    models_file: str = _spec("MODELS_FILE", "YAML list of the models served (ids, aliases, sources or remote "
                                            "upstreams); empty: MODEL alone")
    model_id: str = _spec("MODEL_ID", "name clients use in the `model` field (default: derived from MODEL)")
    model_dtype: str = _spec("MODEL_DTYPE", "weight dtype after GGUF import", choices=("auto", "keep", "float32", "float16", "bfloat16"))
    load_format: str = _spec("LOAD_FORMAT", "'weights'; 'dummy': random weights from config.json; 'synthetic': no model, "
                                            "tokens without compute (HTTP-path benchmark)", choices=("weights", "dummy", "synthetic"))
    orchard_home: str = _spec("ORCHARD_HOME", "cache folder for imported models")
    worker_connections: int = _spec("WORKER_CONNECTIONS", "gevent connections of the one worker", min=16, max=100000)
    keep_alive: int = _spec("KEEP_ALIVE", "seconds an idle keep-alive connection stays open", min=0, max=3600)
    timeout: int = _spec("TIMEOUT", "gunicorn worker heartbeat timeout, seconds", min=10, max=3600)
    graceful_timeout: int = _spec("GRACEFUL_TIMEOUT", "seconds gunicorn waits for the worker to drain on stop", min=1, max=3600)
    max_concurrent_requests: int = _spec("MAX_CONCURRENT_REQUESTS", "sequences that decode together in one batch", min=1, max=1024)
    request_queue_size: int = _spec("REQUEST_QUEUE_SIZE", "requests that may wait for a batch slot", min=0, max=100000)
    max_tokens_limit: int = _spec("MAX_TOKENS_LIMIT", "largest max_tokens a request may ask for", min=1, max=1_000_000)
    default_max_tokens: int = _spec("DEFAULT_MAX_TOKENS", "max_tokens when a request gives none", min=1, max=1_000_000)
    model_aliases: str = _spec("MODEL_ALIASES", "comma-separated names or glob patterns (e.g. claude-*) that clients "
                                                "may use for the served model; from the operator only")
    responses_store_count: int = _spec("RESPONSES_STORE_COUNT", "stored /v1/responses objects kept (all keys)",
                                       min=0, max=1_000_000)
    responses_store_bytes: int = _spec("RESPONSES_STORE_BYTES", "bytes the /v1/responses store may hold",
                                       min=0, max=1 << 40)
    responses_store_ttl: int = _spec("RESPONSES_STORE_TTL", "seconds a stored response lives", min=1, max=30 * 86400)
    max_n: int = _spec("MAX_N", "largest `n` (choices per request) a request may ask for", min=1, max=128)
    tool_parser: str = _spec("TOOL_PARSER", "tool-call format: auto (from the chat template), hermes or llama3_json")
    prefill_step_size: str = _spec("PREFILL_STEP_SIZE", "prompt tokens prefilled per engine step, all prompts together, beside the decoding rows (smaller keeps streams smooth while prompts arrive): 'auto' (512 on the CPU, 4096 on a GPU) or 16-65536")
    prefill_chunk_size: str = _spec("PREFILL_CHUNK_SIZE", "the most prompt tokens one prompt advances per engine step (a long prompt's share of PREFILL_STEP_SIZE; smaller keeps the other streams smooth while it prefills): 'auto' (128 on the CPU, 512 on a GPU) or 16-65536")
    prefill_batch_size: int = _spec("PREFILL_BATCH_SIZE", "prompts prefilled together", min=1, max=1024)
    warmup_tokens: str = _spec("WARMUP_TOKENS", "before /health says ready, the engine prefills a synthetic prompt of this many tokens and decodes at batch sizes 1, 2, 4... up to MAX_CONCURRENT_REQUESTS, so the kernels of the shapes it will serve are compiled before the first request: 'auto' (8192 on a GPU, off on the CPU, where nothing compiles per shape), 0 (off) or a count")
    warmup_shapes: str = _spec("WARMUP_SHAPES", "what the GPU warm-up runs besides the decode batches and the long prompt: 'all' (also every prompt-batch shape bucketed prefill can form: no first request pays a kernel build, but every distinct shape MLX has run leaves each later step slower, issue 14) or 'lean' (prompt-batch shapes are built when traffic first forms them)", choices=("all", "lean"))
    decode_batch: str = _spec("DECODE_BATCH", "the batching core: 'slots' (Orchard's: rows keep a KV slot, join the next decode step, no whole-cache copies; models with plain KV caches, others fall back) or 'mlx-lm' (mlx-lm's BatchGenerator)", choices=("slots", "mlx-lm"))
    decode_attention: str = _spec("DECODE_ATTENTION", "attention of the slot batcher's decode steps: 'auto' (on CUDA, Orchard's kernel that reads each row's left padding, so no mask drives MLX off its fused path; elsewhere, and for models whose attention calls MLX directly or whose heads are not a multiple of 32 wide, mlx-lm's masked attention) or 'mask' (always mlx-lm's)", choices=("auto", "mask"))
    cpu_math: str = _spec("CPU_MATH", "the exp-heavy parts of a forward pass (SwiGLU's sigmoid, attention's softmax) on an x86 CPU: 'auto' (through MLX's vectorized power: its exp runs one element at a time there; 10-18 % of a 20-row decode step of the embedded model; nothing changes on a GPU or another CPU) or 'mlx' (MLX's own)", choices=("auto", "mlx"))
    admission_wait_steps: str = _spec("ADMISSION_WAIT_STEPS", "engine steps a newcomer may wait for others to join the running batch with it: 'auto' (0 with the slot batcher, where a joining row rides the next decode step; 8 with mlx-lm's BatchGenerator, where every admission costs an extra forward pass), or 0-1000")
    blas: str = _spec("ORCHARD_BLAS", "Linux CPU BLAS: 'auto' preloads OpenBLAS when installed, 'bundled' keeps MLX's own", choices=("auto", "bundled"))
    log_level: str = _spec("LOG_LEVEL", "logging level", choices=("debug", "info", "warning", "error"))
    allow_public_bind: bool = _spec("ALLOW_PUBLIC_BIND", "allow a non-loopback HOST without API keys")
    api_keys: str = _spec("API_KEYS", "comma-separated bearer keys; empty: no authentication")
    allowed_hosts: str = _spec("ALLOWED_HOSTS", "without API keys: Host names accepted besides localhost, "
                                                "127.0.0.1 and [::1] (comma-separated; e.g. the name nginx forwards)")
    api_keys_file: str = _spec("API_KEYS_FILE", "file with one key per line (added to API_KEYS)")
    rate_limit: int = _spec("RATE_LIMIT", "requests per minute per key (0: off)", min=0, max=10_000_000)
    token_rate_limit: int = _spec("TOKEN_RATE_LIMIT", "prompt + max_tokens per minute per key (0: off)", min=0, max=10**12)
    queue_timeout: int = _spec("QUEUE_TIMEOUT", "seconds a request may wait for a batch slot", min=1, max=3600)
    drain_timeout: int = _spec("DRAIN_TIMEOUT", "seconds in-flight requests get to finish after SIGTERM", min=0, max=3600)
    engine_stall_timeout: int = _spec("ENGINE_STALL_TIMEOUT", "seconds the engine loop may make no progress while it has "
                                      "work; then its requests end with an error and a fresh worker starts", min=1, max=3600)
    kv_cache_budget: str = _spec("KV_CACHE_BUDGET", "bytes of KV cache admitted requests may reserve: 'auto' or e.g. 2GiB")
    distributed_hostfile: str = _spec("DISTRIBUTED_HOSTFILE", "one model across ranks: MLX's hostfile (JSON, one "
                                                              "list of host:port per rank); empty: one process")
    distributed_rank: int = _spec("DISTRIBUTED_RANK", "this process's rank; 0 serves HTTP and leads", min=0, max=1023)
    distributed_backend: str = _spec("DISTRIBUTED_BACKEND", "mx.distributed backend", choices=("ring", "jaccl", "nccl"))
    memory_budget: str = _spec("MEMORY_BUDGET", "with a models file: bytes every loaded model's weights, KV and prefix "
                                                "caches share ('auto': what is free at start, less a margin; e.g. 48GiB)")
    prefix_cache_bytes: str = _spec("PREFIX_CACHE_BYTES", "KV cache kept from finished requests for reuse by prompts that share a prefix: 'auto' (what the KV budget leaves free), 0 (off) or a size cap")
    max_body_bytes: int = _spec("MAX_BODY_BYTES", "largest request body", min=1024, max=1 << 30)
    metrics_require_key: bool = _spec("METRICS_REQUIRE_KEY", "whether /metrics needs the API key")
    log_prompts: bool = _spec("LOG_PROMPTS", "log prompt text (off: prompts never reach the logs)")
    fault_injection: bool = _spec("FAULT_INJECTION", "enable /debug/fault for resilience tests (never in production)")

    @property
    def cache_dir(self) -> Path:
        return Path(self.orchard_home).expanduser()

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def kv_budget_bytes(self) -> int | None:
        """None means 'auto': the engine picks a safe share of device memory."""
        if self.kv_cache_budget == "auto":
            return None
        return parse_size("KV_CACHE_BUDGET", self.kv_cache_budget)

    @property
    def memory_budget_bytes(self) -> int | None:
        """None means 'auto': pinned models' weights plus the KV share of what is free then."""
        if self.memory_budget == "auto":
            return None
        return parse_size("MEMORY_BUDGET", self.memory_budget)

    @property
    def prefix_cache_cap(self) -> int | None:
        """None means 'auto': bounded only by the KV budget that running requests leave free."""
        if self.prefix_cache_bytes == "auto":
            return None
        return parse_size("PREFIX_CACHE_BYTES", self.prefix_cache_bytes)

    def prefill_tokens(self, cpu: bool) -> int:
        """The per-step prompt-token budget, all prompts together. 'auto': on the 2-core CPU a
        prefill token costs about as much as a decoding row, so one prompt advances at most
        PREFILL_CHUNK_SIZE (128: a 4k prompt's longest freeze of the others 2.7 s, not 7-9 s at
        512), but a burst of short prompts may take 512 together (16 new prompts of ~50 tokens
        get in within two steps, not eight: TTFT p95 below mlx_lm.server's at 8 and 20 users,
        docs/benchmarks.md, stop 19); on a GPU a prompt token costs a small fraction of a decode
        step, and a closed loop's new prompts (16 of ~150 tokens each) must get in within a step
        or two, so 4096."""
        return self._token_count("PREFILL_STEP_SIZE", self.prefill_step_size, 512 if cpu else 4096)

    def prefill_chunk(self, cpu: bool) -> int:
        """The most one prompt advances per step: a long prompt's chunk (its attention grows
        with its context, so its chunk is what the other streams wait for)."""
        return self._token_count("PREFILL_CHUNK_SIZE", self.prefill_chunk_size, 128 if cpu else 512)

    def admission_wait(self) -> Optional[int]:
        """ADMISSION_WAIT_STEPS as a number, or None for 'auto' (the engine decides once it
        knows its batching core: engine/engine.py)."""
        raw = self.admission_wait_steps.strip()
        if raw == "auto":
            return None
        if not raw.isdigit() or int(raw) > 1000:
            raise SettingsError(f"ADMISSION_WAIT_STEPS={raw!r} must be 'auto' or a whole number from 0 to 1000")
        return int(raw)

    @staticmethod
    def _token_count(name: str, value: str, auto: int) -> int:
        if value == "auto":
            return auto
        raw = value.strip()
        if not raw.isdigit() or not 16 <= int(raw) <= 65536:
            raise SettingsError(f"{name}={raw!r} must be 'auto' or a whole number from 16 to 65536")
        return int(raw)

    def warmup(self, cpu: bool) -> int:
        """Prompt tokens of the start-up warm-up (0: none). 'auto': a GPU compiles kernels per
        shape on first use (a fresh server's first long prompt took 2-4x a warm one's, issue 14);
        the CPU does not, and there the warm-up would only delay readiness."""
        if self.warmup_tokens == "auto":
            return 0 if cpu else 8192
        raw = self.warmup_tokens.strip()
        if not raw.isdigit() or int(raw) > 1_000_000:
            raise SettingsError(f"WARMUP_TOKENS={raw!r} must be 'auto' or a whole number from 0 to 1000000")
        return int(raw)

    def aliases(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.model_aliases.split(",") if a.strip())

    def hosts(self) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())

    def keys(self) -> tuple[str, ...]:
        """API keys from API_KEYS and API_KEYS_FILE (blank lines and # comments ignored)."""
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file:
            try:
                lines = Path(self.api_keys_file).expanduser().read_text().splitlines()
            except OSError as exc:
                raise SettingsError(f"API_KEYS_FILE={self.api_keys_file!r} cannot be read: {exc}") from None
            keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        return tuple(keys)


    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value, help) for every setting: `orchard config check` prints it."""
        secret = {"api_keys"}
        return [(f.metadata["env"], "***" if f.name in secret and getattr(self, f.name) else str(getattr(self, f.name)),
                 f.metadata["help"]) for f in fields(self)]


DEFAULTS: dict[str, str] = {
    "HOST": "127.0.0.1",
    "PORT": "8001",
    "MODEL": "embedded",
    "MODELS_FILE": "",
    "MODEL_ID": "",
    "MEMORY_BUDGET": "auto",
    "DISTRIBUTED_HOSTFILE": "",
    "DISTRIBUTED_RANK": "0",
    "DISTRIBUTED_BACKEND": "ring",
    "MODEL_DTYPE": "auto",
    "LOAD_FORMAT": "weights",
    "ORCHARD_HOME": "~/.cache/orchard",
    "WORKER_CONNECTIONS": "1000",
    "KEEP_ALIVE": "5",
    "TIMEOUT": "120",
    "GRACEFUL_TIMEOUT": "30",
    "MAX_CONCURRENT_REQUESTS": "32",
    "REQUEST_QUEUE_SIZE": "128",
    "MAX_TOKENS_LIMIT": "8192",
    "DEFAULT_MAX_TOKENS": "512",
    "MAX_N": "8",
    "RESPONSES_STORE_COUNT": "1000",
    "RESPONSES_STORE_BYTES": str(64 * 1024 * 1024),
    "RESPONSES_STORE_TTL": "3600",
    "MODEL_ALIASES": "",
    "TOOL_PARSER": "auto",
    "PREFILL_STEP_SIZE": "auto",
    "PREFILL_CHUNK_SIZE": "auto",
    "PREFILL_BATCH_SIZE": "16",
    "WARMUP_TOKENS": "auto",
    "WARMUP_SHAPES": "all",
    "DECODE_BATCH": "slots",
    "DECODE_ATTENTION": "auto",
    "CPU_MATH": "auto",
    "ADMISSION_WAIT_STEPS": "auto",
    "ORCHARD_BLAS": "auto",
    "LOG_LEVEL": "info",
    "ALLOW_PUBLIC_BIND": "false",
    "API_KEYS": "",
    "ALLOWED_HOSTS": "",
    "API_KEYS_FILE": "",
    "RATE_LIMIT": "0",
    "TOKEN_RATE_LIMIT": "0",
    "QUEUE_TIMEOUT": "60",
    "DRAIN_TIMEOUT": "20",
    "ENGINE_STALL_TIMEOUT": "30",
    "KV_CACHE_BUDGET": "auto",
    "PREFIX_CACHE_BYTES": "auto",
    "MAX_BODY_BYTES": str(8 * 1024 * 1024),
    "METRICS_REQUIRE_KEY": "false",
    "LOG_PROMPTS": "false",
    "FAULT_INJECTION": "false",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(f: dataclasses.Field, raw: str):
    env, meta = f.metadata["env"], f.metadata
    raw = raw.strip()
    if f.type == "int":
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{env}={raw!r} is not an integer") from None
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise SettingsError(f"{env}={value} is out of range: allowed {lo}..{hi}")
        return value
    if f.type == "bool":
        if raw.lower() not in _TRUE | _FALSE:
            raise SettingsError(f"{env}={raw!r} must be one of true/false/1/0/yes/no")
        return raw.lower() in _TRUE
    choices = meta.get("choices")
    if choices and raw.lower() not in choices:
        raise SettingsError(f"{env}={raw!r} is not allowed: choose one of {', '.join(choices)}")
    return raw.lower() if choices else raw


def load_settings(environ: Mapping[str, str] | None = None, *, dotenv: bool = True, **overrides) -> Settings:
    """Build Settings from `environ` (default: os.environ plus `.env`), then `overrides`."""
    if environ is None:
        if dotenv:
            from dotenv import load_dotenv

            load_dotenv(Path.cwd() / ".env", override=False)
        environ = os.environ
    values = {}
    for f in fields(Settings):
        env = f.metadata["env"]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        values[f.name] = _convert(f, environ.get(env, DEFAULTS[env]))
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def _check_consistency(s: Settings) -> None:
    if s.default_max_tokens > s.max_tokens_limit:
        raise SettingsError(
            f"DEFAULT_MAX_TOKENS={s.default_max_tokens} exceeds MAX_TOKENS_LIMIT={s.max_tokens_limit}"
        )
    needed = s.max_concurrent_requests + s.request_queue_size + 16
    if s.worker_connections < needed:
        raise SettingsError(
            f"WORKER_CONNECTIONS={s.worker_connections} must exceed MAX_CONCURRENT_REQUESTS + "
            f"REQUEST_QUEUE_SIZE + 16 = {needed}, or health checks cannot get through when the queue is full"
        )
    if s.graceful_timeout >= s.timeout:
        raise SettingsError(f"GRACEFUL_TIMEOUT={s.graceful_timeout} must be below TIMEOUT={s.timeout}")
    if s.drain_timeout >= s.graceful_timeout:
        raise SettingsError(f"DRAIN_TIMEOUT={s.drain_timeout} must be below GRACEFUL_TIMEOUT={s.graceful_timeout}, "
                            f"so requests end cleanly before Gunicorn kills the worker")
    if s.tool_parser not in ("auto", "hermes", "llama3_json"):
        raise SettingsError(f"TOOL_PARSER={s.tool_parser!r} must be auto, hermes or llama3_json")
    s.kv_budget_bytes, s.prefix_cache_cap, s.memory_budget_bytes  # validates the sizes
    s.prefill_tokens(cpu=True), s.prefill_chunk(cpu=True), s.admission_wait()
    s.warmup(cpu=False)
    if s.distributed_hostfile and not Path(s.distributed_hostfile).expanduser().is_file():
        raise SettingsError(f"DISTRIBUTED_HOSTFILE={s.distributed_hostfile!r}: no such file")
    if s.distributed_rank and not s.distributed_hostfile:
        raise SettingsError("DISTRIBUTED_RANK is set but DISTRIBUTED_HOSTFILE is empty")
    if s.models_file and not Path(s.models_file).expanduser().is_file():
        raise SettingsError(f"MODELS_FILE={s.models_file!r}: no such file (give the path of a YAML models file, "
                            f"or leave it empty to serve MODEL alone)")
    keys = s.keys()
    if not keys and not s.is_loopback and not s.allow_public_bind:
        raise SettingsError(f"HOST={s.host} is not a loopback address and API_KEYS is empty: anyone on the "
                            f"network could use the server. Set API_KEYS, or ALLOW_PUBLIC_BIND=true to accept that")
    if s.fault_injection and not s.is_loopback:
        raise SettingsError("FAULT_INJECTION=true is only allowed with a loopback HOST")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(env: str, raw: str) -> int:
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", raw)
    if not match or match.group(2).lower() not in _UNITS:
        raise SettingsError(f"{env}={raw!r} is not a size: use bytes or e.g. 512MiB, 2GiB, 'auto'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])