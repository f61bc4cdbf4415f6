"""What every API's serving edge holds: the generation context, settings, admission and
constraints (one shared set per served model), and the prefix-cache scope of a client."""
from __future__ import annotations

from app.generation.admission import Admission
from app.generation.constraints import Constraints
from app.generation.generation import GenerationContext
from config import Settings


class Serving:
    def __init__(self, ctx: GenerationContext, settings: Settings, admission: Admission, constraints: Constraints):
        self.ctx = ctx
        self.settings = settings
        self.admission = admission
        self.constraints = constraints
        self._keys_on = bool(settings.keys())  # then a client is a key id, and scopes the prefix cache

    def cache_scope(self, client: str) -> str:
        """Tenants never share cached prompts: with keys on, the prefix cache is per key."""
        return client if self._keys_on else ""
