"""Orchard: an OpenAI-compatible LLM server for Apple silicon, built on MLX."""
__version__ = "0.1.0"
