"""Errors raised by the GGUF importer."""


class UnsupportedGGUF(ValueError):
    """The GGUF file uses something this importer cannot translate.

    The message names the unsupported thing (architecture, tensor type,
    tokenizer model, ...) so the user knows what to change.
    """
