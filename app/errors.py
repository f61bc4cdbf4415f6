"""The one place errors become OpenAI's envelope: {"error": {message, type, param, code}}."""
from __future__ import annotations

from typing import Optional

from flask import Flask, Response, json, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException


class APIError(Exception):
    """An error a client should see, with its HTTP status and OpenAI type."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, type="server_is_overloaded", code="server_is_overloaded",
                    headers={"Retry-After": str(retry_after)})


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _union_tag(part) -> bool:
    """pydantic names the member of a union it tried (`literal['a','b']`, `str`, `NamedToolChoice`,
    `[key]`); a client's `param` is the field's path without them."""
    if not isinstance(part, str):
        return False
    return "[" in part or part in _TYPE_TAGS or (part[:1].isupper() and part.isidentifier())


def from_validation(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ()) if not _union_tag(part)]
    if first.get("type", "").startswith("json"):
        return bad_request(f"The request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {loc[-1]}"
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return bad_request(message, param=param, code="invalid_value")


_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error"}

_HTTP_CODES = {405: "method_not_allowed", 413: "request_too_large"}


# Anthropic's error types by HTTP status; its clients read {"type": "error", "error": {type, message}}.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "api_error"}
ANTHROPIC_PREFIX = "/v1/messages"


def anthropic_body(error: APIError) -> dict:
    kind = _ANTHROPIC_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def response(error: APIError) -> Response:
    """The envelope of the API the client speaks: Anthropic's under /v1/messages, else OpenAI's."""
    anthropic = request.path.startswith(ANTHROPIC_PREFIX) if _has_request() else False
    body = anthropic_body(error) if anthropic else error.body()
    resp = Response(json.dumps(body), status=error.status, mimetype="application/json")
    for key, value in error.headers.items():
        resp.headers[key] = value
    return resp


def _has_request() -> bool:
    from flask import has_request_context

    return has_request_context()


def install(app: Flask) -> None:
    """Every error, including Flask's own 404/405 and unexpected ones, leaves as an envelope."""

    @app.errorhandler(APIError)
    def _api(error: APIError):
        return response(error)

    @app.errorhandler(ValidationError)
    def _validation(error: ValidationError):
        return response(from_validation(error))

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException):
        status = error.code or 500
        kind = _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        message = {404: "Unknown route", 405: "Method not allowed for this route",
                   413: f"The request body is larger than this server's limit of {request.max_content_length} "
                        f"bytes"}.get(status, error.description)
        allow = dict(error.get_headers()).get("Allow")
        headers = {"Allow": allow} if allow else None
        return response(APIError(status, f"{message}", type=kind, code=_HTTP_CODES.get(status, kind),
                                 headers=headers))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        app.logger.exception("unhandled error")
        return response(APIError(500, "Internal server error", type="server_error", code="internal_error"))


def write_raw_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Gunicorn's own answer to a request it cannot parse (bad request line or headers),
    in the envelope too: replaces gunicorn.util.write_error, which sends an HTML page."""
    kind = "invalid_request_error" if status_int < 500 else "server_error"
    # Gunicorn's detail can quote the offending header: never echo client bytes back.
    message = f"{reason}: the HTTP request could not be parsed" if status_int < 500 else reason
    body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": reason.lower().replace(" ", "_")}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    from gunicorn.util import write_nonblock

    write_nonblock(sock, head + body)
