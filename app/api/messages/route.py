"""Anthropic's Messages routes: parse, call MessagesServing, shape the response. Errors under
/v1/messages leave in Anthropic's envelope (app/errors.py); `anthropic-version` and
`anthropic-beta` headers are tolerated and change nothing."""
from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request

from app.api.messages.protocol import CountTokensRequest, MessagesRequest
from app.errors import APIError
from app.http import json_body, sse_response

blueprint = Blueprint("messages", __name__)


@blueprint.post("/v1/messages")
def create_message():
    orchard = current_app.extensions["orchard"]
    orchard.refuse_if_draining()
    raw = json_body() or b"null"
    body = MessagesRequest.model_validate_json(raw)

    def local(messages):
        prepared = messages.prepare(body, g.client_id, g.request_id)
        if not body.stream:
            return jsonify(messages.complete(prepared, body.model, request.environ))
        return sse_response(messages.stream(prepared, body.model, request.environ))

    return orchard.answer("messages", body.model, local, raw, bool(body.stream))


@blueprint.post("/v1/messages/count_tokens")
def count_tokens():
    orchard = current_app.extensions["orchard"]
    orchard.refuse_if_draining()
    body = CountTokensRequest.model_validate_json(json_body() or b"null")
    entry = orchard.catalog.targets(body.model)[0]
    if entry.is_remote:
        raise APIError(400, f"count_tokens is not available for the remote model '{body.model}'",
                       param="model", code="unsupported_for_remote")
    return jsonify(orchard.serving("messages", entry.id).count_tokens(body))
