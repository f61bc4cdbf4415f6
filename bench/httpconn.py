"""Minimal asyncio HTTP/1.1 client: one keep-alive connection, streamed body.

Stdlib only and deliberately thin, so the per-chunk cost stays far below what a
server streaming tens of thousands of tokens/s would expose.
"""
from __future__ import annotations

import asyncio
import json
import ssl as _ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_READ_SIZE = 1 << 16


class ProtocolError(Exception):
    """The server sent something that is not valid HTTP/1.x."""


@dataclass
class Endpoint:
    """Parsed base URL: scheme, host, port and path prefix (e.g. '/v1')."""

    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad URL {url!r}: need http(s)://host[:port]/prefix")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass
class Response:
    """Status line and headers (lower-cased names) of one response."""

    status: int
    version: str
    headers: dict[str, str] = field(default_factory=dict)


class Connection:
    """A single reusable HTTP/1.1 connection to one endpoint."""

    def __init__(self, ep: Endpoint, connect_timeout: float = 10.0):
        self.ep = ep
        self.connect_timeout = connect_timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reusable = False  # True once a response was read to its end

    async def _open(self) -> None:
        ctx = _ssl.create_default_context() if self.ep.scheme == "https" else None
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.ep.host, self.ep.port, ssl=ctx, limit=1 << 20),
            self.connect_timeout)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.reusable = False

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Response:
        """Send a request and read the response head.

        A stale kept-alive connection (closed by the server while idle) is
        retried once on a fresh connection.
        """
        reused = self.writer is not None and self.reusable
        if self.writer is None or not self.reusable:
            self.close()
            await self._open()
        try:
            return await self._send(method, path, body, headers)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
            self.close()
            await self._open()
            return await self._send(method, path, body, headers)

    async def _send(self, method, path, body, headers) -> Response:
        self.reusable = False
        lines = [f"{method} {self.ep.prefix}{path} HTTP/1.1",
                 f"Host: {self.ep.host_header}", "Accept-Encoding: identity"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.writer.write(head + body if body else head)
        await self.writer.drain()
        status_line = await self.reader.readuntil(b"\r\n")
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        resp = Response(int(parts[1]), parts[0])
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            resp.headers[name.strip().lower()] = value.strip()
        self._resp = resp
        return resp

    async def iter_body(self):
        """Yield raw body bytes as they arrive (de-chunked)."""
        resp, reader = self._resp, self.reader
        te = resp.headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            async for data in _dechunk(reader):
                yield data
        elif "content-length" in resp.headers:
            left = int(resp.headers["content-length"])
            while left > 0:
                data = await reader.read(min(left, _READ_SIZE))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                yield data
        else:  # body delimited by connection close
            while data := await reader.read(_READ_SIZE):
                yield data
            self.close()
            return
        keep = resp.headers.get("connection", "").lower() != "close"
        self.reusable = keep and resp.version != "HTTP/1.0"
        if not self.reusable:
            self.close()

    async def read_body(self) -> bytes:
        """Read the whole response body."""
        return b"".join([c async for c in self.iter_body()])


async def _dechunk(reader: asyncio.StreamReader):
    """Decode chunked transfer coding from buffered reads: one network read
    yields every complete chunk it carries (fewer awaits per SSE event)."""
    buf, pos = b"", 0
    while True:
        out = []
        while (i := buf.find(b"\r\n", pos)) >= 0:
            size = int(buf[pos:i].split(b";", 1)[0], 16)
            if size == 0:  # last chunk, then optional trailers and CRLF
                if buf.startswith(b"\r\n", i + 2) or buf.find(b"\r\n\r\n", i) >= 0:
                    if out:
                        yield b"".join(out)
                    return
                break
            end = i + 2 + size
            if len(buf) < end + 2:
                break
            out.append(buf[i + 2:end])
            pos = end + 2
        buf, pos = buf[pos:], 0
        if out:
            yield b"".join(out)
        data = await reader.read(_READ_SIZE)
        if not data:
            raise asyncio.IncompleteReadError(buf, None)
        buf += data


async def get_json(url: str, path: str, headers: dict[str, str] | None = None,
                   timeout: float = 10.0):
    """GET url+path and decode a JSON body; raises on non-200."""
    conn = Connection(Endpoint.parse(url), timeout)
    try:
        async with asyncio.timeout(timeout):
            resp = await conn.request("GET", path, None, headers)
            body = await conn.read_body()
    finally:
        conn.close()
    if resp.status != 200:
        raise ProtocolError(f"GET {path} -> HTTP {resp.status}: {body[:200]!r}")
    return json.loads(body)
