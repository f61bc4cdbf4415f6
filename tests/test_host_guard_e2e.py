"""DNS rebinding (issue 15.1), through real servers: without API keys only loopback Host names
(or ALLOWED_HOSTS) are answered; with keys every Host is, as before."""
from __future__ import annotations

import json
import socket

import pytest


def get(port: int, host: str, path: str = "/v1/models", key: str | None = None) -> tuple[int, dict]:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def keyless(tiny_server_factory):
    return tiny_server_factory(ALLOWED_HOSTS="orchard.lan")


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:8001", "localhost.evil.example.com",
                                  "127.0.0.1.nip.io", "rebind.attacker.net"])
def test_a_keyless_server_refuses_other_host_names(keyless, host):
    status, body = get(keyless.port, host)
    assert status == 403 and body["error"]["code"] == "host_not_allowed"
    status, body = get(keyless.port, host, "/v1/messages")  # Anthropic's envelope there
    assert status == 403 and body["type"] == "error" and body["error"]["type"] == "permission_error"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "orchard.lan"])
def test_loopback_names_and_allowed_hosts_are_answered(keyless, host):
    status, body = get(keyless.port, f"{host}:{keyless.port}")
    assert status == 200 and body["data"][0]["id"] == "tiny"


def test_with_keys_every_host_is_accepted_with_a_key(tiny_server_factory):
    server = tiny_server_factory(API_KEYS="k-1")
    assert get(server.port, "evil.example.com", key="k-1")[0] == 200
    assert get(server.port, "evil.example.com")[0] == 401
