"""Orchard's web layer. Gunicorn loads `app:create_app()` in the worker, after fork."""
from __future__ import annotations

from typing import Optional

from flask import Flask, request

from app.state import Orchard
from config import Settings, load_settings


def create_app(settings: Optional[Settings] = None, engine=None) -> Flask:
    """The only place where Orchard is wired together. Starts the engine thread."""
    settings = settings or load_settings()
    app = Flask("orchard")
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    from app import auth, errors, host_guard, request_log
    from app.console import console
    from app.routes import api

    request_log.configure_logging(settings.log_level)
    errors.install(app)
    request_log.install(app)
    host_guard.install(app, keys_on=bool(settings.keys()), extra=host_guard.accepted_names(settings))
    auth.install(app, auth.KeyRing(settings.keys()), metrics_open=not settings.metrics_require_key)
    app.register_blueprint(api)
    for blueprint in _api_blueprints():
        app.register_blueprint(blueprint)
    app.register_blueprint(console)
    orchard = Orchard.start(settings, engine)
    app.extensions["orchard"] = orchard

    @app.after_request
    def _count(response):
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        orchard.metrics.http.labels(route, str(response.status_code)).inc()
        return response

    return app


def _api_blueprints() -> list:
    """One blueprint per API package beside chat (app/api/<name>/route.py)."""
    from app.api.completions.route import blueprint as completions
    from app.api.embeddings.route import blueprint as embeddings
    from app.api.messages.route import blueprint as messages
    from app.api.responses.route import blueprint as responses

    return [completions, responses, messages, embeddings]
