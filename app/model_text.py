"""The served model's text side: chat template, tokenizer, detokenizer table.

Used on request greenlets; built once when the engine reports the model loaded (the
engine thread has already built the detokenizer table then).
Chat templates come only from the model's own files and render in the sandboxed
Jinja environment that transformers uses; no request can supply one.
"""
from __future__ import annotations

from functools import cached_property
from typing import Optional

from app.errors import bad_request
from engine.detokenizer import TokenTable
from engine.model import LoadedModel

_PROBE_TOOL = {"type": "function", "function": {"name": "orchard_probe_tool_7f3a", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}


class ModelText:
    def __init__(self, model: LoadedModel):
        self.wrapper = model.tokenizer
        self.hf_tokenizer = getattr(model.tokenizer, "_tokenizer", model.tokenizer)
        self.table = model.token_table if model.token_table_ready else TokenTable.build(self.hf_tokenizer)
        self.grammar_tokenizer = model.grammar_tokenizer

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.hf_tokenizer, "chat_template", None))

    @cached_property
    def template_renders_tools(self) -> bool:
        """Whether the model's own template has a tools section (Qwen2.5's, Llama 3.1's): found
        by rendering a probe tool once, not by guessing from the template's source."""
        if not self.has_template:
            return False
        try:
            text = self.hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL],
                                                         add_generation_prompt=True, tokenize=False)
        except Exception:
            return False
        return _PROBE_TOOL["function"]["name"] in text

    @cached_property
    def template_source(self) -> str:
        template = getattr(self.hf_tokenizer, "chat_template", None)
        return template if isinstance(template, str) else ""

    def encode_chat(self, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        try:
            if self.has_template:
                extra = {"tools": tools} if tools else {}
                prompt = self.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                               **extra)
            else:
                prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        except Exception as exc:  # the template rejected these messages (e.g. role order)
            raise bad_request(f"The messages cannot be rendered by this model's chat template: {exc}",
                              param="messages") from None
        return self.encode(prompt, param="messages")

    def encode(self, text: str, param: str) -> list[int]:
        ids = self.hf_tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise bad_request(f"The {param} render to an empty prompt", param=param)
        return ids

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes as logprobs report them: its text, or a special token's name (which
        the answer's text leaves out)."""
        if self.table is not None:
            pieces = self.table.pieces
            piece = pieces[token] if token < len(pieces) else b""
            if piece:
                return piece
        name = self.hf_tokenizer.convert_ids_to_tokens(token)
        return (name or "").encode("utf-8") if self.table is not None else self.hf_tokenizer.decode([token]).encode()
