"""OpenAI embeddings (/v1/embeddings): text or token-id inputs, float or base64 vectors, Matryoshka dimensions."""
