"""POST /v1/completions: parse, call the serving object, JSON or SSE."""
from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request

from app.api.completions.protocol import CompletionRequest
from app.http import json_body, sse_response

blueprint = Blueprint("completions", __name__)


@blueprint.post("/v1/completions")
def completions():
    orchard = current_app.extensions["orchard"]
    orchard.refuse_if_draining()
    raw = json_body() or b"null"
    body = CompletionRequest.model_validate_json(raw)

    def local(serving):
        prepared = serving.prepare(body, g.client_id, g.request_id)
        if not body.stream:
            return jsonify(serving.complete(prepared, body, request.environ))
        return sse_response(serving.stream(prepared, body, request.environ))

    return orchard.answer("completions", body.model, local, raw, body.stream)
