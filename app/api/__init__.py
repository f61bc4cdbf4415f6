"""One package per API: a thin route, its protocol (request models) and its serving (shapes)."""
