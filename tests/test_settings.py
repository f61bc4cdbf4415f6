"""Settings: defaults, parsing, and refusals that name the variable."""
import pytest

from config import SettingsError, load_settings


def test_defaults_follow_the_seed_port_and_loopback():
    s = load_settings({}, dotenv=False)
    assert (s.host, s.port, s.model) == ("127.0.0.1", 8001, "embedded")
    assert s.is_loopback


@pytest.mark.parametrize("env, fragment", [
    ({"PORT": "eighty"}, "PORT='eighty' is not an integer"),
    ({"PORT": "70000"}, "PORT=70000 is out of range"),
    ({"MAX_CONCURRENT_REQUESTS": "0"}, "MAX_CONCURRENT_REQUESTS=0 is out of range"),
    ({"MODEL_DTYPE": "int3"}, "MODEL_DTYPE='int3' is not allowed"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud' is not allowed"),
    ({"ALLOW_PUBLIC_BIND": "maybe"}, "ALLOW_PUBLIC_BIND='maybe' must be one of"),
    ({"WORKER_CONNECTIONS": "100"}, "WORKER_CONNECTIONS=100 must exceed"),
    ({"DEFAULT_MAX_TOKENS": "9000"}, "DEFAULT_MAX_TOKENS=9000 exceeds MAX_TOKENS_LIMIT"),
    ({"GRACEFUL_TIMEOUT": "200"}, "GRACEFUL_TIMEOUT=200 must be below TIMEOUT"),
])
def test_invalid_values_name_the_variable(env, fragment):
    with pytest.raises(SettingsError) as info:
        load_settings(env, dotenv=False)
    assert fragment in str(info.value)


def test_values_are_parsed():
    s = load_settings({"PORT": "9000", "MAX_CONCURRENT_REQUESTS": "4", "ALLOW_PUBLIC_BIND": "yes",
                       "HOST": "0.0.0.0"}, dotenv=False)
    assert (s.port, s.max_concurrent_requests, s.allow_public_bind, s.is_loopback) == (9000, 4, True, False)


def test_production_env_file_is_valid():
    from pathlib import Path

    from dotenv import dotenv_values

    values = dotenv_values(Path(__file__).resolve().parents[1] / ".env.production")
    s = load_settings(values, dotenv=False)
    assert s.model.startswith("mlx-community/Qwen2.5")
