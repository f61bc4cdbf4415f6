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
from typing import Mapping


class SettingsError(ValueError):
    """A setting has a value Orchard cannot use; the message names the variable."""


def _spec(env: str, help: str, **bounds):
    return field(metadata={"env": env, "help": help, **bounds})


@dataclass(frozen=True)
class Settings:
    host: str = _spec("HOST", "address to bind")
    port: int = _spec("PORT", "TCP port", min=1, max=65535)
    model: str = _spec("MODEL", "'embedded', a .gguf file, an MLX model directory or a Hugging Face repo id")
    model_id: str = _spec("MODEL_ID", "name clients use in the `model` field (default: derived from MODEL)")
    model_dtype: str = _spec("MODEL_DTYPE", "weight dtype after GGUF import", choices=("auto", "keep", "float32", "float16", "bfloat16"))
    load_format: str = _spec("LOAD_FORMAT", "'weights' or 'dummy' (random weights from config.json, for benchmarks)", choices=("weights", "dummy"))
    orchard_home: str = _spec("ORCHARD_HOME", "cache folder for imported models")
    worker_connections: int = _spec("WORKER_CONNECTIONS", "gevent connections of the one worker", min=16, max=100000)
    keep_alive: int = _spec("KEEP_ALIVE", "seconds an idle keep-alive connection stays open", min=0, max=3600)
    timeout: int = _spec("TIMEOUT", "gunicorn worker heartbeat timeout, seconds", min=10, max=3600)
    graceful_timeout: int = _spec("GRACEFUL_TIMEOUT", "seconds gunicorn waits for the worker to drain on stop", min=1, max=3600)
    max_concurrent_requests: int = _spec("MAX_CONCURRENT_REQUESTS", "sequences that decode together in one batch", min=1, max=1024)
    request_queue_size: int = _spec("REQUEST_QUEUE_SIZE", "requests that may wait for a batch slot", min=0, max=100000)
    max_tokens_limit: int = _spec("MAX_TOKENS_LIMIT", "largest max_tokens a request may ask for", min=1, max=1_000_000)
    default_max_tokens: int = _spec("DEFAULT_MAX_TOKENS", "max_tokens when a request gives none", min=1, max=1_000_000)
    prefill_step_size: int = _spec("PREFILL_STEP_SIZE", "prompt tokens processed per engine step (smaller keeps decode smooth)", min=16, max=65536)
    prefill_batch_size: int = _spec("PREFILL_BATCH_SIZE", "prompts prefilled together", min=1, max=1024)
    blas: str = _spec("ORCHARD_BLAS", "Linux CPU BLAS: 'auto' preloads OpenBLAS when installed, 'bundled' keeps MLX's own", choices=("auto", "bundled"))
    log_level: str = _spec("LOG_LEVEL", "logging level", choices=("debug", "info", "warning", "error"))
    allow_public_bind: bool = _spec("ALLOW_PUBLIC_BIND", "allow a non-loopback HOST without API keys")

    @property
    def cache_dir(self) -> Path:
        return Path(self.orchard_home).expanduser()

    @property
    def is_loopback(self) -> bool:
        if self.host in ("localhost", ""):
            return self.host == "localhost"
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value, help) for every setting: `orchard config check` prints it."""
        return [(f.metadata["env"], str(getattr(self, f.name)), f.metadata["help"]) for f in fields(self)]


DEFAULTS: dict[str, str] = {
    "HOST": "127.0.0.1",
    "PORT": "8001",
    "MODEL": "embedded",
    "MODEL_ID": "",
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
    "PREFILL_STEP_SIZE": "512",
    "PREFILL_BATCH_SIZE": "8",
    "ORCHARD_BLAS": "auto",
    "LOG_LEVEL": "info",
    "ALLOW_PUBLIC_BIND": "false",
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
