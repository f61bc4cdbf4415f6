"""The DNS-rebinding guard's Host parsing, without a server."""
import pytest

from app.host_guard import allowed, host_name


@pytest.mark.parametrize("header, name", [
    ("localhost", "localhost"), ("LOCALHOST:8001", "localhost"), ("127.0.0.1:8001", "127.0.0.1"),
    ("[::1]:8001", "::1"), ("[::1]", "::1"), ("evil.example.com:80", "evil.example.com"), ("", ""),
])
def test_host_names_drop_the_port_and_brackets(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize("header, extra, ok", [
    ("localhost:8001", (), True), ("127.0.0.1", (), True), ("127.1.2.3:9", (), True), ("[::1]:8001", (), True),
    ("evil.example.com", (), False), ("localhost.evil.example.com", (), False), ("127.0.0.1.evil.com", (), False),
    ("", (), False), ("orchard.lan:8000", ("orchard.lan",), True), ("evil.example.com", ("orchard.lan",), False),
])
def test_only_loopback_names_and_listed_hosts_are_allowed(header, extra, ok):
    assert allowed(header, extra) is ok


def test_the_bind_address_is_accepted_but_not_a_wildcard():
    from types import SimpleNamespace

    from app.host_guard import accepted_names

    assert accepted_names(SimpleNamespace(host="192.168.1.5", hosts=lambda: ("orchard.lan",))) == (
        "orchard.lan", "192.168.1.5")
    assert accepted_names(SimpleNamespace(host="0.0.0.0", hosts=lambda: ())) == ()
    assert accepted_names(SimpleNamespace(host="::", hosts=lambda: ())) == ()
