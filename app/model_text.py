"""The served model's text side: chat template, tokenizer, detokenizer table.

Used on request greenlets; built once when the engine reports the model loaded (the
engine thread has already built the detokenizer table then).
Chat templates come only from the model's own files and render in the sandboxed
Jinja environment that transformers uses; no request can supply one.
"""
from __future__ import annotations

from app.errors import bad_request
from engine.detokenizer import TokenTable
from engine.model import LoadedModel


class ModelText:
    def __init__(self, model: LoadedModel):
        self.wrapper = model.tokenizer
        self.hf_tokenizer = getattr(model.tokenizer, "_tokenizer", model.tokenizer)
        self.table = model.token_table if model.token_table_ready else TokenTable.build(self.hf_tokenizer)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            if getattr(self.hf_tokenizer, "chat_template", None):
                prompt = self.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            else:
                prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        except Exception as exc:  # the template rejected these messages (e.g. role order)
            raise bad_request(f"The messages cannot be rendered by this model's chat template: {exc}",
                              param="messages") from None
        ids = self.hf_tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise bad_request("The messages render to an empty prompt", param="messages")
        return ids
