"""POST /v1/embeddings: parse, pick the model (local or remote), answer JSON."""
from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify

from app.api.embeddings.protocol import EmbeddingRequest
from app.http import json_body

blueprint = Blueprint("embeddings", __name__)


@blueprint.post("/v1/embeddings")
def embeddings():
    orchard = current_app.extensions["orchard"]
    orchard.refuse_if_draining()
    raw = json_body() or b"null"
    body = EmbeddingRequest.model_validate_json(raw)
    return orchard.answer("embeddings", body.model, lambda serving: jsonify(serving.create(body, g.client_id)), raw)
