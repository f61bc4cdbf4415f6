"""HTTP routes: parse, call a service, shape the response. Nothing else lives here."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, g, jsonify, request

from app.errors import APIError
from app.http import json_body, sse_response
from app.metrics import CONTENT_TYPE
from app.api.chat.protocol import ChatCompletionRequest

api = Blueprint("api", __name__)


def _orchard():
    return current_app.extensions["orchard"]


@api.get("/health")
def health():
    ok, why = _orchard().health()
    if not ok:
        raise APIError(503, why, type="server_error", code="engine_unavailable", headers={"Retry-After": "5"})
    return jsonify(status="ok")


@api.get("/v1/models")
def models():
    """Every configured model (local and remote) with its state: loaded, loading, unloaded..."""
    return jsonify(object="list", data=_orchard().catalog.listing())


@api.get("/v1/models/<path:model_id>")
def model_detail(model_id: str):
    row = next((m for m in _orchard().catalog.listing() if m["id"] == model_id), None)
    if row is None:
        raise APIError(404, f"The model '{model_id[:200]}' does not exist", type="not_found_error",
                       param="model", code="model_not_found")
    return jsonify(row)


@api.post("/v1/chat/completions")
def chat_completions():
    orchard = _orchard()
    orchard.refuse_if_draining()
    raw = json_body() or b"null"
    body = ChatCompletionRequest.model_validate_json(raw)

    def local(chat):
        prepared = chat.prepare(body, g.client_id, g.request_id)
        if not body.stream:
            return jsonify(chat.complete(prepared, request.environ))
        return sse_response(chat.stream(prepared, body.include_usage, request.environ))

    return orchard.answer("chat", body.model, local, raw, body.stream)


@api.get("/v1/system/status")
def system_status():
    return jsonify(_orchard().status.report())


@api.get("/openapi.json")
def openapi():
    from app.openapi import document

    return jsonify(document())


@api.post("/debug/fault")
def inject_fault():
    orchard = _orchard()
    if not orchard.settings.fault_injection:
        raise APIError(404, "Unknown route", type="not_found_error", code="not_found_error")
    kind = (request.get_json(silent=True) or {}).get("kind")
    if kind not in ("step", "loop", "stall"):
        raise APIError(400, "kind must be 'step', 'loop' or 'stall'", param="kind")
    orchard.engine.inject_fault(kind)
    return jsonify(injected=kind)


@api.get("/metrics")
def metrics():
    return Response(_orchard().metrics.exposition(), mimetype=None, content_type=CONTENT_TYPE)
