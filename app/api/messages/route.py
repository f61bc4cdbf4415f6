"""Anthropic's Messages routes: parse, call MessagesServing, shape the response. Errors under
/v1/messages leave in Anthropic's envelope (app/errors.py); `anthropic-version` and
`anthropic-beta` headers are tolerated and change nothing."""
from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request

from app.api.messages.protocol import CountTokensRequest, MessagesRequest
from app.http import json_body, sse_response

blueprint = Blueprint("messages", __name__)


@blueprint.post("/v1/messages")
def create_message():
    orchard = current_app.extensions["orchard"]
    orchard.refuse_if_draining()
    body = MessagesRequest.model_validate_json(json_body() or b"null")
    messages = orchard.serving("messages")
    prepared = messages.prepare(body, g.client_id, g.request_id)
    if not body.stream:
        return jsonify(messages.complete(prepared, body.model, request.environ))
    return sse_response(messages.stream(prepared, body.model, request.environ))


@blueprint.post("/v1/messages/count_tokens")
def count_tokens():
    orchard = current_app.extensions["orchard"]
    orchard.refuse_if_draining()
    body = CountTokensRequest.model_validate_json(json_body() or b"null")
    return jsonify(orchard.serving("messages").count_tokens(body))
