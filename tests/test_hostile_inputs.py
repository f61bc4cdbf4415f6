"""Malformed and hostile requests against a real Gunicorn server on the tiny Qwen2.

Every request is sent byte-for-byte over a raw socket (no client library to normalise
it) with a valid key. Each must get the right 4xx and OpenAI's error envelope, exactly
{"error": {"message", "type", "param", "code"}}, as JSON: never HTML, never a 5xx. After
the whole table the server still answers a normal request. The module's server is
watched by gevent's monitor: no request may block the event loop over 100 ms.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

import pytest

KEY = "k"
MAX_BODY = 65536
LIMIT = 8192  # MAX_TOKENS_LIMIT's default
CONTEXT = 1024  # the tiny Qwen2's context length
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# ---- raw HTTP ------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated name keeps its last value
    header_names: list[str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def exchange(port: int, data: bytes, timeout: float = 30.0) -> Reply:
    """Send exactly `data`, read the answer until the server closes the connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body was read (413): the answer is already there
        raw = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
    finally:
        s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), raw[:200]
    pairs = [line.partition(":") for line in lines[1:]]
    headers = {name.strip().lower(): value.strip() for name, _, value in pairs}
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return Reply(int(lines[0].split()[1]), headers, [name.strip().lower() for name, _, _ in pairs], body)


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


@dataclass
class Req:
    """One request, built byte for byte."""

    body: bytes | dict | list | str | None = b""
    method: str = "POST"
    path: str = "/v1/chat/completions"
    content_type: str | None = "application/json"
    auth: str | None = f"Bearer {KEY}"
    chunked: bool = False
    host: str = "127.0.0.1"
    extra: list[bytes] = field(default_factory=list)  # raw header lines, sent as given

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()

    def to_bytes(self) -> bytes:
        payload = self.payload()
        lines = [f"{self.method} {self.path} HTTP/1.1".encode(), b"Host: " + self.host.encode(),
                 b"Connection: close"]
        if self.auth is not None:
            lines.append(b"Authorization: " + self.auth.encode())
        if self.content_type is not None:
            lines.append(b"Content-Type: " + self.content_type.encode())
        lines += self.extra
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            piece = 8192
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + piece]), payload[i:i + piece])
                              for i in range(0, len(payload), piece))
            return b"\r\n".join(lines) + b"\r\n\r\n" + chunks + b"0\r\n\r\n"
        if payload or self.method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d" % len(payload))
        return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def chat(**changes) -> dict:
    """A valid request with some fields changed; a value of ... removes the field."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def with_message(**changes) -> dict:
    message = {"role": "user", "content": "hi", **changes}
    return chat(messages=[{k: v for k, v in message.items() if v is not ...}])


def raw_chat(fragment: bytes) -> bytes:
    """A valid request with `fragment` (raw JSON bytes, e.g. b'"temperature": NaN') added."""
    return b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, ' + fragment + b"}"


VALID = json.dumps(chat()).encode()
# 70 KB of a valid document: padding inside a string, so only the size is wrong.
OVERSIZED = json.dumps(chat(messages=[{"role": "user", "content": "a" * (100 * 1024)}])).encode()
CHUNKED_HUGE = json.dumps(chat(messages=[{"role": "user", "content": "b" * (256 * 1024)}])).encode()


def case(req: Req, status: int, id: str, code: str | None = None, param: str | None = None):
    return pytest.param(req, status, code, param, id=id)


CASES = [
    # -- not JSON, or not an object --------------------------------------------------------
    case(Req(b"{not json"), 400, "invalid-json", "invalid_json"),
    case(Req(b'{"model": "tiny", "messages": ['), 400, "truncated-json", "invalid_json"),
    case(Req(VALID + b" trailing"), 400, "trailing-garbage", "invalid_json"),
    case(Req(b"{'model': 'tiny'}"), 400, "single-quoted-json", "invalid_json"),
    case(Req(b""), 400, "empty-body"),
    # -- /v1/embeddings: the served model here is a chat model ------------------------------
    case(Req(b"", path="/v1/embeddings"), 400, "embeddings-empty-body"),
    case(Req({"model": "tiny", "input": [[-1]]}, path="/v1/embeddings"), 400, "embeddings-negative-token",
         None, "input.0.0"),
    case(Req({"model": "tiny", "input": ""}, path="/v1/embeddings"), 400, "embeddings-empty-input", None, "input"),
    case(Req({"model": "tiny", "input": "hi", "encoding_format": "hex"}, path="/v1/embeddings"), 400,
         "embeddings-bad-format", None, "encoding_format"),
    case(Req({"model": "tiny", "input": "hi"}, path="/v1/embeddings"), 400, "embeddings-of-a-chat-model",
         "wrong_model_kind", "model"),
    case(Req({"model": "../tiny", "input": "hi"}, path="/v1/embeddings"), 404, "embeddings-path-like-model",
         "model_not_found", "model"),
    case(Req(b"null"), 400, "top-level-null"),
    case(Req(b"[]"), 400, "top-level-array"),
    case(Req(b'[{"model": "tiny"}]'), 400, "top-level-array-of-object"),
    case(Req(b'"tiny"'), 400, "top-level-string"),
    case(Req(b"42"), 400, "top-level-number"),
    case(Req(b"\xff\xfe\x00{}"), 400, "invalid-utf8-body", "invalid_json"),
    case(Req(raw_chat(b'"user": "a\xc3\x28b"')), 400, "invalid-utf8-in-string", "invalid_json"),
    case(Req(raw_chat(b'"user": "\\ud800"')), 400, "lone-surrogate-escape", "invalid_json"),
    case(Req(b"[" * 10_000), 400, "nested-10000-arrays", "invalid_json"),
    case(Req(b'{"model": "tiny", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"), 400,
         "nested-10000-in-messages", "invalid_json"),
    case(Req(b'{"a":' * 5_000 + b"1" + b"}" * 5_000), 400, "nested-5000-objects", "invalid_json"),
    # -- numbers out of range or of the wrong type -------------------------------------------
    case(Req(raw_chat(b'"temperature": 1e309')), 400, "temperature-1e309", "invalid_value", "temperature"),
    case(Req(chat(max_tokens=10**40)), 400, "max-tokens-10e40", None, "max_tokens"),
    case(Req(chat(seed=2**64)), 400, "seed-2e64", "invalid_value", "seed"),
    case(Req(chat(max_tokens=0)), 400, "max-tokens-zero", "invalid_value", "max_tokens"),
    case(Req(chat(max_tokens=-1)), 400, "max-tokens-negative", "invalid_value", "max_tokens"),
    case(Req(chat(max_tokens=LIMIT + 1)), 400, "max-tokens-above-cap", None, "max_tokens"),
    case(Req(chat(max_tokens=4.5)), 400, "max-tokens-float", "invalid_value", "max_tokens"),
    case(Req(chat(max_tokens=True)), 400, "max-tokens-bool", "invalid_value", "max_tokens"),
    case(Req(chat(max_tokens="4")), 400, "max-tokens-string", "invalid_value", "max_tokens"),
    case(Req(chat(max_tokens=..., max_completion_tokens=0)), 400, "max-completion-tokens-zero",
         "invalid_value", "max_completion_tokens"),
    case(Req(chat(temperature=-1)), 400, "temperature-negative", "invalid_value", "temperature"),
    case(Req(chat(temperature=3)), 400, "temperature-3", "invalid_value", "temperature"),
    case(Req(chat(temperature="NaN")), 400, "temperature-nan-string", "invalid_value", "temperature"),
    case(Req(raw_chat(b'"temperature": NaN')), 400, "temperature-nan-literal", None, "temperature"),
    case(Req(raw_chat(b'"top_p": Infinity')), 400, "top-p-infinity-literal", None, "top_p"),
    case(Req(chat(temperature=True)), 400, "temperature-bool", "invalid_value", "temperature"),
    case(Req(chat(top_p=0)), 400, "top-p-zero", "invalid_value", "top_p"),
    case(Req(chat(top_p=1.5)), 400, "top-p-1.5", "invalid_value", "top_p"),
    case(Req(chat(presence_penalty=2.5)), 400, "presence-penalty-2.5", "invalid_value", "presence_penalty"),
    case(Req(chat(frequency_penalty=-3)), 400, "frequency-penalty-minus-3", "invalid_value", "frequency_penalty"),
    case(Req(chat(n=0)), 400, "n-zero", "invalid_value", "n"),
    case(Req(chat(n=129)), 400, "n-129", "invalid_value", "n"),
    case(Req(chat(n=9)), 400, "n-over-max-n", "invalid_value", "n"),
    case(Req(chat(n=-1)), 400, "n-negative", "invalid_value", "n"),
    # -- stop -----------------------------------------------------------------------------
    case(Req(chat(stop=["a", "b", "c", "d", "e"])), 400, "stop-five-entries", "invalid_value"),
    case(Req(chat(stop=[1, 2])), 400, "stop-non-strings", "invalid_value"),
    case(Req(chat(stop="")), 400, "stop-empty-string", "invalid_value"),
    case(Req(chat(stop=[""])), 400, "stop-list-with-empty-string", "invalid_value"),
    case(Req(chat(stop={"a": 1})), 400, "stop-object", "invalid_value"),
    # -- messages ---------------------------------------------------------------------------
    case(Req(with_message(role="tool")), 400, "role-tool-without-call-id", "invalid_value", "messages.0"),
    case(Req(chat(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x",
                                                                "content": "42"}])), 400,
         "tool-message-answering-no-call", None, "messages.1.tool_call_id"),
    case(Req(with_message(role="root")), 400, "role-unknown", "invalid_value", "messages.0.role"),
    case(Req(with_message(role=None)), 400, "role-null", "invalid_value", "messages.0.role"),
    case(Req(with_message(content=...)), 400, "content-missing", "invalid_value", "messages.0"),
    case(Req(with_message(content=None)), 400, "content-null", "invalid_value", "messages.0"),
    case(Req(with_message(content=42)), 400, "content-number", "invalid_value"),
    case(Req(with_message(content={"text": "hi"})), 400, "content-object", "invalid_value"),
    case(Req(with_message(content=[])), 400, "content-empty-list", "invalid_value"),
    case(Req(with_message(content=[{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}])), 400,
         "content-image-part", "unsupported_content", "messages.0.content"),
    case(Req(with_message(content=[{"type": "text"}])), 400, "content-text-part-without-text", "invalid_value"),
    case(Req(with_message(content=["hi"])), 400, "content-list-of-strings", "invalid_value"),
    case(Req(with_message(tool_calls=[])), 400, "tool-calls-on-a-user-message", "invalid_value", "messages.0"),
    case(Req(with_message(colour="red")), 400, "unknown-field-in-message", "invalid_value", "messages.0.colour"),
    case(Req(with_message(name="x" * 300)), 400, "message-name-too-long", "invalid_value", "messages.0.name"),
    case(Req(chat(messages=...)), 400, "messages-missing", "invalid_value", "messages"),
    case(Req(chat(messages=[])), 400, "messages-empty", "invalid_value", "messages"),
    case(Req(chat(messages="hi")), 400, "messages-string", "invalid_value", "messages"),
    case(Req(chat(messages={"role": "user", "content": "hi"})), 400, "messages-object", "invalid_value", "messages"),
    case(Req(chat(messages=[None])), 400, "messages-null-entry", "invalid_value", "messages.0"),
    # 10,000 messages are ~300 KB of JSON: refused for size before anything is parsed.
    case(Req(chat(messages=[{"role": "user", "content": "a"}] * 10_000)), 413, "messages-10000",
         "request_too_large"),
    case(Req(chat(messages=[{"role": "user", "content": "word " * 2000}])), 400, "prompt-longer-than-context",
         "context_length_exceeded", "messages"),
    case(Req(chat(max_tokens=CONTEXT - 4)), 400, "prompt-plus-max-tokens-over-context",
         "context_length_exceeded", "messages"),
    # -- model ----------------------------------------------------------------------------
    *[case(Req(chat(model=name)), 404, f"model-{label}", "model_not_found", "model")
      for label, name in [("etc-passwd", "/etc/passwd"), ("dot-dot", "../../x"), ("home-ssh", "~/.ssh/id_rsa"),
                          ("embedded", "embedded"), ("windows-path", "C:\\x"), ("other", "gpt-4o"),
                          ("file-url", "file:///etc/passwd"), ("tiny-with-slash", "tiny/../tiny")]],
    case(Req(chat(model=None)), 400, "model-null", "invalid_value", "model"),
    case(Req(chat(model="")), 400, "model-empty", "invalid_value", "model"),
    case(Req(chat(model="m" * 300)), 400, "model-very-long", "invalid_value", "model"),
    case(Req(chat(model=...)), 400, "model-missing", "invalid_value", "model"),
    case(Req(chat(model=["tiny"])), 400, "model-list", "invalid_value", "model"),
    # -- streaming flags --------------------------------------------------------------------
    case(Req(chat(stream="true")), 400, "stream-string", "invalid_value", "stream"),
    case(Req(chat(stream=1)), 400, "stream-number", "invalid_value", "stream"),
    case(Req(chat(stream_options={"include_usage": True})), 400, "stream-options-without-stream",
         "invalid_value", "stream_options"),
    case(Req(chat(stream=True, stream_options={"include_usage": "yes"})), 400, "stream-options-bad-value",
         "invalid_value"),
    # -- features this server does not offer: refused, never silently ignored --------------
    case(Req(chat(chat_template="{{ 'pwned' }}")), 400, "chat-template-field", "invalid_value", "chat_template"),
    case(Req(chat(chat_template_kwargs={"enable_thinking": True})), 400, "chat-template-kwargs-field",
         "invalid_value", "chat_template_kwargs"),
    # -- tools, structured output, logprobs: wrong values keep their 400 with `param` -----------
    case(Req(chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}])),
         400, "tool-schema-invalid", "invalid_schema", "tools.0.function.parameters"),
    case(Req(chat(tools=[{"type": "function", "function": {"name": "f b"}}])), 400, "tool-name-with-space",
         "invalid_value"),
    case(Req(chat(tools=[{"type": "code_interpreter"}])), 400, "tool-type-unknown", "invalid_value"),
    case(Req(chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})), 400,
         "tool-choice-unknown-name", None, "tool_choice"),
    case(Req(chat(tool_choice="required")), 400, "tool-choice-required-without-tools", "invalid_value"),
    case(Req(chat(tools=[TOOL], tool_choice="sometimes")), 400, "tool-choice-unknown", "invalid_value",
         "tool_choice"),
    case(Req(chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 60} for i in range(900)}}}}])),
         413, "tool-schema-over-64kb-in-a-small-body", "request_too_large"),
    case(Req(chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"type": "string", "description": "d" * (1 << 20)}}}}}])),
         413, "tool-schema-of-1mb", "request_too_large"),
    case(Req(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}})),
         400, "response-format-schema-invalid", "invalid_schema", "response_format.json_schema.schema"),
    case(Req(chat(response_format={"type": "json_schema"})), 400, "response-format-schema-missing",
         "invalid_value", "response_format"),
    case(Req(chat(response_format={"type": "yaml"})), 400, "response-format-unknown", "invalid_value"),
    case(Req(chat(logprobs=True, top_logprobs=21)), 400, "top-logprobs-21", "invalid_value", "top_logprobs"),
    case(Req(chat(top_logprobs=5)), 400, "top-logprobs-without-logprobs", "invalid_value", "top_logprobs"),
    case(Req(chat(logit_bias={"abc": 1})), 400, "logit-bias-key-not-an-id", "invalid_value", "logit_bias.abc"),
    case(Req(chat(logit_bias={"100000": 1})), 400, "logit-bias-id-outside-vocabulary", "invalid_value",
         "logit_bias"),
    case(Req(chat(logit_bias={"5": 101})), 400, "logit-bias-over-100", "invalid_value", "logit_bias.5"),
    case(Req(chat(top_k=-1)), 400, "top-k-negative", "invalid_value", "top_k"),
    case(Req(chat(min_p=1.5)), 400, "min-p-1.5", "invalid_value", "min_p"),
    case(Req(chat(repetition_penalty=0)), 400, "repetition-penalty-zero", "invalid_value", "repetition_penalty"),
    case(Req(chat(modalities=["audio"])), 400, "modalities-audio", "invalid_value", "modalities.0"),
    case(Req(chat(unknown_field=1)), 400, "unknown-top-level-field", "invalid_value", "unknown_field"),
    case(Req(chat(user="u" * 300)), 400, "user-too-long", "invalid_value", "user"),
    # -- size -----------------------------------------------------------------------------
    case(Req(OVERSIZED), 413, "body-100kb-over-64kb", "request_too_large"),
    case(Req(CHUNKED_HUGE, chunked=True), 413, "chunked-body-256kb-over-64kb", "request_too_large"),
    case(Req(b" " * (MAX_BODY + 10) + VALID, chunked=True), 413, "chunked-padded-valid-json-over-64kb",
         "request_too_large"),
    # -- content types ----------------------------------------------------------------------
    case(Req(VALID, content_type="text/plain"), 415, "content-type-text-plain", "unsupported_media_type"),
    case(Req(b"model=tiny&messages=hi", content_type="application/x-www-form-urlencoded"), 415,
         "content-type-form", "unsupported_media_type"),
    case(Req(b"--zz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ntiny\r\n--zz--\r\n",
             content_type="multipart/form-data; boundary=zz"), 415, "content-type-multipart", "unsupported_media_type"),
    case(Req(VALID, content_type=None), 415, "content-type-missing", "unsupported_media_type"),
    case(Req(VALID, content_type="application/xml"), 415, "content-type-xml", "unsupported_media_type"),
    # -- methods and routes ---------------------------------------------------------------
    *[case(Req(b"", method=method, path=path), 405, f"{method}-{path.strip('/').replace('/', '-') or 'root'}",
           "method_not_allowed")
      for method, path in [("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"),
                           ("DELETE", "/v1/chat/completions"), ("PATCH", "/v1/chat/completions"),
                           ("POST", "/v1/models"), ("DELETE", "/v1/models/tiny"), ("POST", "/v1/system/status"),
                           ("POST", "/health"), ("POST", "/openapi.json"), ("PUT", "/metrics"),
                           ("TRACE", "/v1/models"), ("GET", "/debug/fault"), ("GET", "/v1/completions")]],
    *[case(Req(b"", method=method, path=path), 404, f"unknown-{method}-{path.strip('/').replace('/', '-')}",
           code)
      for method, path, code in [("GET", "/v2/nothing", "not_found_error"),
                                 ("POST", "/v1/edits", "not_found_error"),
                                 ("GET", "/admin", "not_found_error"),
                                 ("GET", "/v1/models/embedded", "model_not_found"),
                                 ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", "model_not_found"),
                                 ("POST", "/debug/fault", "not_found_error")]],
    # -- authentication ---------------------------------------------------------------------
    case(Req(b"", method="GET", path="/v2/nothing", auth=None), 401, "unknown-route-without-key",
         "invalid_api_key"),
    case(Req(VALID, auth=None), 401, "chat-without-key", "invalid_api_key"),
    case(Req(VALID, auth="Bearer wrong"), 401, "chat-wrong-key", "invalid_api_key"),
    case(Req(VALID, auth="Bearer "), 401, "chat-empty-bearer", "invalid_api_key"),
    case(Req(VALID, auth=f"Basic {KEY}"), 401, "chat-basic-scheme", "invalid_api_key"),
    case(Req(b"", method="GET", path="/v1/models", auth=f"Bearer {KEY}x"), 401, "models-key-with-suffix",
         "invalid_api_key"),
    case(Req(b"", method="GET", path="/v1/system/status", auth="Bearer " + "k" * 4000), 401,
         "status-4kb-key", "invalid_api_key"),
    # -- headers --------------------------------------------------------------------------
    case(Req(VALID, host="h" * 1024), 400, "host-header-1kb"),
    case(Req(chat(model="nope"), extra=[b"X-Request-Id: abc\r\nX-Injected: evil"]), 404,
         "request-id-crlf-split", "model_not_found"),
    case(Req(chat(model="nope"), extra=[b"X-Request-Id: <script>alert(1)</script>"]), 404,
         "request-id-markup", "model_not_found"),
    case(Req(chat(model="nope"), extra=[b"X-Request-Id: a%0d%0aX-Injected:%20evil"]), 404,
         "request-id-percent-encoded-crlf", "model_not_found"),
    case(Req(chat(model="nope"), extra=[b"X-Request-Id: " + b"r" * 4000]), 404, "request-id-4kb",
         "model_not_found"),
]


def api(path: str, body, **kwargs) -> Req:
    return Req(body, path=path, **kwargs)


def completion(**changes) -> dict:
    return {k: v for k, v in {"model": "tiny", "prompt": "hi", "max_tokens": 4, **changes}.items() if v is not ...}


def response_req(**changes) -> dict:
    return {k: v for k, v in {"model": "tiny", "input": "hi", "max_output_tokens": 4, **changes}.items()
            if v is not ...}


def message(**changes) -> dict:
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **changes}
    return {k: v for k, v in body.items() if v is not ...}


ANTHROPIC = "anthropic"
# The other APIs: each answers in its own envelope (OpenAI's, or Anthropic's under /v1/messages).
# (request, status, envelope, OpenAI code or Anthropic error type, OpenAI param)
API_CASES = [
    pytest.param(api("/v1/completions", completion(prompt=...)), 400, "openai", "invalid_value", "prompt",
                 id="completions-prompt-missing"),
    pytest.param(api("/v1/completions", completion(prompt=[[]])), 400, "openai", "invalid_value", None,
                 id="completions-empty-token-list"),
    pytest.param(api("/v1/completions", completion(prompt=[70000])), 400, "openai", "invalid_value", "prompt",
                 id="completions-token-outside-vocabulary"),
    pytest.param(api("/v1/completions", completion(logprobs=6)), 400, "openai", "invalid_value", "logprobs",
                 id="completions-logprobs-6"),
    pytest.param(api("/v1/completions", completion(suffix="x")), 400, "openai", "invalid_value", "suffix",
                 id="completions-suffix"),
    pytest.param(api("/v1/completions", completion(best_of=2)), 400, "openai", "invalid_value", None,
                 id="completions-best-of-over-n"),
    pytest.param(api("/v1/completions", completion(model="nope")), 404, "openai", "model_not_found", "model",
                 id="completions-unknown-model"),
    pytest.param(api("/v1/completions", completion(prompt=["x"] * 65)), 400, "openai", "invalid_value", "prompt",
                 id="completions-65-prompts"),
    pytest.param(api("/v1/responses", response_req(input=...)), 400, "openai", "invalid_value", "input",
                 id="responses-input-missing"),
    pytest.param(api("/v1/responses", response_req(input=[{"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "file:///etc/passwd"}]}])), 400, "openai", "unsupported_content",
                 None, id="responses-image-part"),
    pytest.param(api("/v1/responses", response_req(previous_response_id="resp_nope")), 404, "openai", None,
                 "previous_response_id", id="responses-unknown-previous-id"),
    pytest.param(api("/v1/responses/resp_nope", b"", method="GET"), 404, "openai", None, None,
                 id="responses-get-unknown"),
    pytest.param(api("/v1/responses", response_req(temperature=5)), 400, "openai", "invalid_value", "temperature",
                 id="responses-temperature-5"),
    pytest.param(api("/v1/messages", message(max_tokens=...)), 400, ANTHROPIC, "invalid_request_error", None,
                 id="messages-max-tokens-missing"),
    pytest.param(api("/v1/messages", message(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}}]}])), 400, ANTHROPIC,
                 "invalid_request_error", None, id="messages-image-block"),
    pytest.param(api("/v1/messages", message(model="nope")), 404, ANTHROPIC, "not_found_error", None,
                 id="messages-unknown-model"),
    pytest.param(api("/v1/messages", message(), auth=None, extra=[b"x-api-key: wrong"]), 401, ANTHROPIC,
                 "authentication_error", None, id="messages-wrong-x-api-key"),
    pytest.param(api("/v1/messages", b"{not json"), 400, ANTHROPIC, "invalid_request_error", None,
                 id="messages-invalid-json"),
    pytest.param(api("/v1/messages", OVERSIZED), 413, ANTHROPIC, "request_too_large", None,
                 id="messages-body-over-64kb"),
    pytest.param(api("/v1/messages/count_tokens", message(messages=[])), 400, ANTHROPIC,
                 "invalid_request_error", None, id="count-tokens-no-messages"),
    pytest.param(api("/v1/messages", message(tool_choice={"type": "tool", "name": "nope"}, tools=[
        {"name": "f", "input_schema": {"type": "object"}}])), 400, ANTHROPIC, "invalid_request_error", None,
                 id="messages-unknown-named-tool"),
]


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory(API_KEYS=KEY, MAX_BODY_BYTES=str(MAX_BODY))


def assert_envelope(reply: Reply, status: int, code: str | None, param: str | None) -> dict:
    text = reply.body[:500]
    assert reply.status == status, (reply.status, text)
    assert reply.headers.get("content-type", "").split(";")[0] == "application/json", (reply.headers, text)
    assert b"<html" not in reply.body.lower() and b"<!doctype" not in reply.body.lower(), text
    payload = reply.json()
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("req, status, code, param", CASES)
def test_hostile_request_gets_a_4xx_envelope(server, req, status, code, param):
    reply = exchange(server.port, req.to_bytes())
    error = assert_envelope(reply, status, code, param)
    if status == 401:
        assert reply.headers.get("www-authenticate", "").startswith("Bearer")
    if status == 405:
        assert reply.headers.get("allow"), reply.headers
    # No header smuggled in by the client comes back, and the request id is always sane.
    assert "x-injected" not in reply.header_names
    request_id = reply.headers["x-request-id"]
    assert request_id.replace("-", "").replace(".", "").replace(":", "").replace("_", "").isalnum()
    assert len(request_id) <= 128 and "<" not in request_id and "%" not in request_id
    assert "evil" not in json.dumps(error)


@pytest.mark.parametrize("req, status, envelope, kind, param", API_CASES)
def test_hostile_request_to_another_api_gets_its_own_envelope(server, req, status, envelope, kind, param):
    reply = exchange(server.port, req.to_bytes())
    if envelope == "openai":
        assert_envelope(reply, status, kind, param)
        return
    assert reply.status == status, (reply.status, reply.body[:500])
    assert reply.headers.get("content-type", "").split(";")[0] == "application/json"
    payload = reply.json()
    assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}, payload
    assert payload["error"]["type"] == kind and payload["error"]["message"].strip(), payload


def test_a_valid_key_in_x_api_key_is_accepted(server):
    reply = exchange(server.port, api("/v1/messages", message(), auth=None,
                                      extra=[b"x-api-key: " + KEY.encode(), b"anthropic-version: 2023-06-01"]).to_bytes())
    assert reply.status == 200, reply.body[:500]
    assert reply.json()["type"] == "message"


def test_crlf_in_a_request_id_never_comes_back_raw(server):
    forged = exchange(server.port, Req(chat(model="nope"), extra=[b"X-Request-Id: abc\r\nX-Injected: evil"]).to_bytes())
    assert forged.headers["x-request-id"] == "abc" and "x-injected" not in forged.header_names
    escaped = exchange(server.port, Req(chat(model="nope"), extra=[b"X-Request-Id: a%0d%0aSet-Cookie:x"]).to_bytes())
    assert len(escaped.headers["x-request-id"]) == 32 and "set-cookie" not in escaped.header_names


@pytest.mark.parametrize("line", [b"X-Request-Id: abc\rX-Injected: evil", b"X-Request-Id: abc\nX-Injected: evil",
                                  b"X-Request-Id: abc\x00evil", b"Content-Length: -1"],
                         ids=["bare-cr", "bare-lf", "nul-byte", "negative-content-length"])
def test_malformed_header_lines_are_refused_by_the_http_parser(server, line):
    """These never reach the app: Gunicorn's parser answers itself, in the envelope too
    (gunicorn.conf.py swaps its HTML error page). A 4xx, nothing echoed, the server serves on."""
    reply = exchange(server.port, Req(VALID, extra=[line]).to_bytes())
    assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert "x-injected" not in reply.header_names and b"evil" not in reply.body


def test_the_server_still_serves_after_the_whole_table(server):
    health = exchange(server.port, Req(b"", method="GET", path="/health", auth=None).to_bytes())
    assert health.status == 200 and health.json() == {"status": "ok"}
    reply = exchange(server.port, Req(VALID).to_bytes())
    assert reply.status == 200, reply.body[:500]
    data = reply.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["finish_reason"] in ("stop", "length")
    chunked = exchange(server.port, Req(VALID, chunked=True).to_bytes())
    assert chunked.status == 200 and chunked.json()["object"] == "chat.completion"
    streamed = exchange(server.port, Req(chat(stream=True)).to_bytes())
    assert streamed.status == 200 and streamed.body.rstrip().endswith(b"data: [DONE]")
    status = exchange(server.port, Req(b"", method="GET", path="/v1/system/status").to_bytes()).json()
    assert status["requests"]["running"] == 0 and status["requests"]["waiting"] == 0
