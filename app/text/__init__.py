"""Text-level processing of model output and prompts (no Flask, no MLX)."""
