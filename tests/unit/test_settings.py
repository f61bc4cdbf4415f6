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

    values = dotenv_values(Path(__file__).resolve().parents[2] / ".env.production")
    s = load_settings(values, dotenv=False)
    assert s.model.startswith("mlx-community/Qwen2.5")


def test_api_keys_come_from_the_list_and_the_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# operators\nfile-key\n\n")
    s = load_settings({"API_KEYS": "a, b", "API_KEYS_FILE": str(keys_file)}, dotenv=False)
    assert s.keys() == ("a", "b", "file-key")
    assert "***" in dict((env, value) for env, value, _ in s.describe())["API_KEYS"]


def test_public_bind_without_keys_is_refused_unless_allowed():
    with pytest.raises(SettingsError) as info:
        load_settings({"HOST": "0.0.0.0"}, dotenv=False)
    assert "API_KEYS" in str(info.value) and "ALLOW_PUBLIC_BIND" in str(info.value)
    assert load_settings({"HOST": "0.0.0.0", "API_KEYS": "k"}, dotenv=False).keys() == ("k",)
    assert load_settings({"HOST": "0.0.0.0", "ALLOW_PUBLIC_BIND": "true"}, dotenv=False).allow_public_bind


@pytest.mark.parametrize("raw, expected", [("auto", None), ("1024", 1024), ("2GiB", 2 << 30), ("512MiB", 512 << 20),
                                           ("1.5GB", 1_500_000_000)])
def test_kv_budget_sizes(raw, expected):
    assert load_settings({"KV_CACHE_BUDGET": raw}, dotenv=False).kv_budget_bytes == expected


def test_drain_must_end_before_gunicorn_gives_up():
    with pytest.raises(SettingsError, match="DRAIN_TIMEOUT=30 must be below GRACEFUL_TIMEOUT=30"):
        load_settings({"DRAIN_TIMEOUT": "30"}, dotenv=False)
