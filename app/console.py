"""The web console: a status panel and a chat playground, served as plain static files.

GET /                  the page (app/static/console/index.html)
GET /console/<file>    its CSS and JS

Both are public (no API key): the page itself holds no data; every call it makes to the
API carries the key the user types into it. Register with `app.register_blueprint(console)`.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

STATIC_DIR = Path(__file__).resolve().parent / "static" / "console"

console = Blueprint("console", __name__)


def _send(name: str):
    # send_from_directory refuses paths outside STATIC_DIR (raises NotFound -> the 404 envelope).
    resp = send_from_directory(STATIC_DIR, name, max_age=0)
    resp.headers["Cache-Control"] = "no-cache"  # revalidate: an upgraded server serves fresh JS
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


@console.get("/")
def page():
    return _send("index.html")


@console.get("/console/<path:filename>")
def asset(filename: str):
    return _send(filename)
