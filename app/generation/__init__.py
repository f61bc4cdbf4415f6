"""Generation shared by every API edge: the request, its output constraints (grammars), the events it yields."""
