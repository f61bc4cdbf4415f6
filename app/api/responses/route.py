"""HTTP routes of the Responses API: parse, call ResponsesServing, shape the HTTP response."""
from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request

from app.api.responses.protocol import ResponsesRequest
from app.http import json_body, sse_response

blueprint = Blueprint("responses", __name__)


def _orchard():
    return current_app.extensions["orchard"]


@blueprint.post("/v1/responses")
def create_response():
    orchard = _orchard()
    orchard.refuse_if_draining()
    raw = json_body() or b"null"
    body = ResponsesRequest.model_validate_json(raw)

    def local(serving):
        prepared = serving.prepare(body, g.client_id, g.request_id)
        if not body.stream:
            return jsonify(serving.complete(prepared, request.environ))
        return sse_response(serving.stream(prepared, request.environ))

    return orchard.answer("responses", body.model, local, raw, bool(body.stream))


@blueprint.get("/v1/responses/<response_id>")
def retrieve_response(response_id: str):
    return jsonify(_orchard().serving("responses").retrieve(response_id, g.client_id))


@blueprint.delete("/v1/responses/<response_id>")
def delete_response(response_id: str):
    return jsonify(_orchard().serving("responses").delete(response_id, g.client_id))
