"""The OpenAPI description of Orchard's API, generated from the pydantic request models."""
from __future__ import annotations

from functools import lru_cache

from pydantic.json_schema import models_json_schema

from app.api.chat.protocol import ChatCompletionRequest
from app.api.completions.protocol import CompletionRequest
from app.api.messages.protocol import CountTokensRequest, MessagesRequest
from app.api.responses.protocol import ResponsesRequest
from orchard import __version__

_ERROR = {"description": "OpenAI error envelope", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}
_JSON = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}


def _errors(*codes: int) -> dict:
    return {str(code): _ERROR for code in codes}


def _post(summary: str, schema: str, security: list) -> dict:
    return {"summary": summary, "security": security,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": {"200": {"description": "completion", "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}}}},
                **_errors(400, 401, 404, 413, 415, 429, 503)}}


def _by_id(summary: str, security: list) -> dict:
    return {"summary": summary, "security": security,
            "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _JSON, **_errors(401, 404, 503)}}


@lru_cache(maxsize=1)
def document() -> dict:
    # One pass over every request model: pydantic gives same-named classes of different APIs
    # (chat's Tool, Anthropic's Tool) distinct component names.
    models = (ChatCompletionRequest, CompletionRequest, ResponsesRequest, MessagesRequest, CountTokensRequest)
    refs, combined = models_json_schema([(m, "validation") for m in models],
                                        ref_template="#/components/schemas/{model}")
    defs = combined.get("$defs", {})
    names = {m.__name__: refs[(m, "validation")]["$ref"].rsplit("/", 1)[-1] for m in models}
    security = [{"bearer": []}]
    anthropic = [{"bearer": []}, {"x-api-key": []}]
    get_json = lambda summary: {"summary": summary, "security": security,  # noqa: E731
                                "responses": {"200": _JSON, **_errors(401, 503)}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Orchard", "version": __version__,
                 "description": "OpenAI-compatible LLM inference server for Apple silicon"},
        "components": {"schemas": defs,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
        "paths": {
            "/health": {"get": {"summary": "Liveness and readiness", "responses": {"200": _JSON, **_errors(503)}}},
            "/v1/models": {"get": get_json("Served models")},
            "/v1/models/{model_id}": {"get": {
                "summary": "One served model", "security": security,
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _JSON, **_errors(401, 404, 503)}}},
            "/v1/system/status": {"get": get_json("Operator status")},
            "/v1/chat/completions": {"post": {
                "summary": "Chat completion (JSON, or SSE when stream is true)", "security": security,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{names['ChatCompletionRequest']}"}}}},
                "responses": {"200": {"description": "completion", "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(400, 401, 404, 413, 415, 429, 503)}}},
            "/v1/completions": {"post": _post("Text completion (JSON, or SSE when stream is true)",
                                              names["CompletionRequest"], security)},
            "/v1/responses": {"post": _post("Responses API (JSON, or SSE events when stream is true)",
                                            names["ResponsesRequest"], security)},
            "/v1/responses/{response_id}": {
                "get": _by_id("A stored response", security), "delete": _by_id("Delete a stored response", security)},
            "/v1/messages": {"post": _post("Anthropic Messages (JSON, or SSE events when stream is true); errors in "
                                           "Anthropic's envelope", names["MessagesRequest"], anthropic)},
            "/v1/messages/count_tokens": {"post": _post("Anthropic token count", names["CountTokensRequest"], anthropic)},
        },
    }
