"""One streaming chat completion over SSE, with timing and error classification."""
from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from time import perf_counter

from bench.httpconn import Connection, ProtocolError

CHAT_PATH = "/chat/completions"
_decoder = json.JSONDecoder()


@dataclass
class RequestSpec:
    """What to send: model, sampling and server-extension flags."""

    model: str
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True
    include_usage: bool = True
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def body(self, prompt: str) -> bytes:
        b = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
             "max_tokens": self.max_tokens, "temperature": self.temperature,
             "stream": True}
        if self.include_usage:
            b["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            b["ignore_eos"] = True
        return json.dumps(b).encode()


@dataclass
class RequestResult:
    """Outcome of one request. Times are seconds; start is perf_counter()."""

    start: float = 0.0
    ok: bool = False
    error: str | None = None
    detail: str = ""
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    chunks: int = 0
    token_source: str = "chunks"
    finish_reason: str | None = None
    gaps: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, t0: float = 0.0) -> dict:
        d = {k: getattr(self, k) for k in ("ok", "error", "detail", "ttft", "e2e",
                                           "tokens", "chunks", "token_source",
                                           "finish_reason")}
        d["start"] = self.start - t0
        return d


def classify(exc: BaseException) -> str:
    """Map an exception to a short error kind."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "connection_reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection_closed"
    if isinstance(exc, (ProtocolError, asyncio.LimitOverrunError, ValueError)):
        return "protocol_error"
    if isinstance(exc, ssl.SSLError):
        return "ssl_error"
    if isinstance(exc, OSError):
        return f"os_error_{exc.errno}" if exc.errno else "os_error"
    return f"client_{type(exc).__name__}"


def _content_of(choice: dict) -> str | None:
    delta = choice.get("delta") or {}
    return (delta.get("content") or delta.get("reasoning_content")
            or delta.get("reasoning") or choice.get("text"))


async def stream_chat(conn: Connection, spec: RequestSpec, prompt: str,
                      timeout: float) -> RequestResult:
    """Send one streaming chat request on conn and time it. Never raises."""
    res = RequestResult()
    body, headers = spec.body(prompt), spec.headers()
    res.start = t0 = perf_counter()
    try:
        async with asyncio.timeout(timeout):
            resp = await conn.request("POST", CHAT_PATH, body, headers)
            if resp.status != 200:
                data = await conn.read_body()
                res.error = f"http_{resp.status}"
                res.detail = data[:300].decode("utf-8", "replace")
                return res
            if "event-stream" not in resp.headers.get("content-type", ""):
                await conn.read_body()
                res.error = "not_sse"
                return res
            done = await _consume_sse(conn, res, t0)
        res.e2e = perf_counter() - t0
        if res.error is None and not (done or res.finish_reason):
            res.error = "truncated_stream"
        res.ok = res.error is None
    except asyncio.CancelledError:
        conn.close()
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is data here
        conn.close()
        res.error, res.detail = classify(exc), repr(exc)[:300]
    return res


async def _consume_sse(conn: Connection, res: RequestResult, t0: float) -> bool:
    """Parse the SSE body into res; return True when [DONE] was seen."""
    buf, last, usage_tokens, done = b"", 0.0, None, False
    loads = _decoder.decode
    async for data in conn.iter_body():
        now = perf_counter()
        buf += data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events = buf.split(b"\n\n")
        buf = events.pop()
        for ev in events:
            if ev.startswith(b"data: ") and b"\n" not in ev:
                payload = ev[6:]  # the common single-line event
            else:
                payload = b"\n".join(ln[5:].lstrip() for ln in ev.split(b"\n")
                                     if ln.startswith(b"data:"))
            if not payload:
                continue
            if payload == b"[DONE]":
                done = True
                continue
            obj = loads(payload.decode())
            if obj.get("error"):
                res.error = "stream_error"
                res.detail = str(obj["error"])[:300]
                continue
            for choice in obj.get("choices") or ():
                if _content_of(choice):
                    res.chunks += 1
                    if res.ttft is None:
                        res.ttft = now - t0
                    else:
                        res.gaps.append(now - last)
                    last = now
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
            usage = obj.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
    if usage_tokens is not None:
        res.tokens, res.token_source = usage_tokens, "usage"
    else:
        res.tokens = res.chunks
    return done


async def preflight(conn: Connection, spec: RequestSpec, prompt: str,
                    timeout: float) -> tuple[RequestResult, list[str]]:
    """Send one request, dropping extensions the server rejects with HTTP 400.

    Mutates spec (ignore_eos / include_usage) and returns notes on what changed.
    """
    notes: list[str] = []
    res = await stream_chat(conn, spec, prompt, timeout)
    if res.error == "http_400" and spec.ignore_eos:
        spec.ignore_eos = False
        notes.append("server rejected ignore_eos (HTTP 400); sent without it")
        res = await stream_chat(conn, spec, prompt, timeout)
    if res.error == "http_400" and spec.include_usage:
        spec.include_usage = False
        notes.append("server rejected stream_options.include_usage; counting chunks")
        res = await stream_chat(conn, spec, prompt, timeout)
    if res.ok and spec.include_usage and res.token_source != "usage":
        notes.append("no usage chunk in stream; tokens counted as content chunks")
    return res, notes
