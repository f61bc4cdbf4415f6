"""OpenAI chat completions: request models and the serving edge over the generation core."""
