"""Models served by another OpenAI- or Anthropic-compatible server (a `remote:` entry of MODELS_FILE)."""
from app.remote.failures import UpstreamAtCapacity
from app.remote.model import API_PATHS, RemoteModel, RemoteStats

__all__ = ["API_PATHS", "RemoteModel", "RemoteStats", "UpstreamAtCapacity"]
