"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens): request models and the
serving edge over the shared generation core."""
