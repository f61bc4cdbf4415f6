"""OpenAI legacy completions (/v1/completions): prompts as text or token ids, echo, prompt logprobs."""
