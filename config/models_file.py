"""The operator's model registry: MODELS_FILE, a YAML list of the models Orchard serves.

A request names an id or an alias; resolve() turns that name into the entries to try,
in order. A name is never a path: only the operator's file says what can be loaded.
Parsing and validation live in config/models_parse.py; this module holds the result.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

KINDS = ("chat", "embedding")
POOLINGS = ("last", "mean", "cls")
GLOB_CHARS = frozenset("*?[")


class ModelsFileError(ValueError):
    """Every problem found in a models file, each naming the entry and key."""

    def __init__(self, problems: list[str], path: str | Path | None = None):
        self.problems = list(problems)
        self.path = str(path) if path is not None else None
        head = f"MODELS_FILE {self.path}: " if self.path else ""
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{head}{count}:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class RemoteSpec:
    """An OpenAI- or Anthropic-compatible upstream. The key itself never lives here: only
    the name of the environment variable that holds it."""
    base_url: str  # http(s)://host[:port]/path, without a trailing slash
    model: str  # the upstream's model name
    api_key_env: str | None = None
    timeout_s: float = 600.0  # read timeout, per chunk
    connect_timeout_s: float = 5.0

    def api_key(self, env: Mapping[str, str]) -> str | None:
        return (env.get(self.api_key_env) or None) if self.api_key_env else None


@dataclass(frozen=True)
class ModelEntry:
    """One model the operator serves: local (`source`) or forwarded (`remote`)."""
    id: str
    source: str | None = None  # 'embedded', an absolute .gguf or folder path, or a repo id; None iff remote
    aliases: tuple[str, ...] = ()  # fnmatch globs allowed (e.g. "claude-*")
    kind: str = "chat"
    pooling: str | None = None  # embedding only
    normalize: bool = True  # embedding only: L2-normalize vectors
    max_concurrent: int | None = None  # None: the server's MAX_CONCURRENT_REQUESTS
    pinned: bool = False
    idle_unload_s: float | None = None
    remote: RemoteSpec | None = None

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def where(self) -> str:
        """What `orchard config check` shows for the source; never a key."""
        return f"{self.remote.base_url} ({self.remote.model})" if self.remote else str(self.source)


@dataclass(frozen=True)
class ModelsConfig:
    entries: tuple[ModelEntry, ...]
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> ordered targets
    warnings: tuple[str, ...] = ()  # not fatal (e.g. a remote key variable that is not set)

    def __post_init__(self):
        object.__setattr__(self, "aliases", MappingProxyType(dict(self.aliases)))

    def entry(self, model_id: str) -> ModelEntry:
        for entry in self.entries:
            if entry.id == model_id:
                return entry
        raise KeyError(model_id)

    def resolve(self, name: str) -> tuple[ModelEntry, ...]:
        """The entries to try, in order, for a requested model name: an id, an entry's exact
        alias, a top-level alias (expanded recursively, duplicates dropped), then an entry's
        glob alias (first matching entry in file order). KeyError for anything else."""
        found = self._exact(name)
        if found is not None:
            return (found,)
        if name in self.aliases:
            return self._expand(name, ())
        for entry in self.entries:
            if any(_is_glob(a) and fnmatchcase(name, a) for a in entry.aliases):
                return (entry,)
        raise KeyError(name)

    def names(self) -> list[str]:
        """Every name a client may send (ids, exact aliases, alias routes), for /v1/models."""
        names = [e.id for e in self.entries] + [a for e in self.entries for a in e.aliases if not _is_glob(a)]
        return names + list(self.aliases)

    def _exact(self, name: str) -> ModelEntry | None:
        for entry in self.entries:
            if entry.id == name or name in entry.aliases:
                return entry
        return None

    def _expand(self, name: str, seen: tuple[str, ...]) -> tuple[ModelEntry, ...]:
        if name in seen:  # validated files have no cycles; never recurse forever anyway
            return ()
        out: list[ModelEntry] = []
        for target in self.aliases[name]:
            found = self._exact(target)
            more = (found,) if found is not None else self._expand(target, seen + (name,)) if target in self.aliases else ()
            out += [e for e in more if e not in out]
        return tuple(out)


def _is_glob(name: str) -> bool:
    return bool(GLOB_CHARS & set(name))


def load_models_file(path: str | Path, env: Mapping[str, str] | None = None) -> ModelsConfig:
    """Read and validate a models file; ModelsFileError lists every problem found.
    Relative paths in `source` are taken from the file's own folder."""
    from config.models_parse import parse_models

    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelsFileError([f"cannot be read: {exc.strerror or exc}"], path) from None
    config, problems = parse_models(text, base_dir=path.resolve().parent, env=os.environ if env is None else env)
    if problems:
        raise ModelsFileError(problems, path)
    return config


def single_model_config(model_id: str, source: str, aliases: tuple[str, ...] = ()) -> ModelsConfig:
    """MODEL alone (no MODELS_FILE): one pinned chat model."""
    return ModelsConfig(entries=(ModelEntry(id=model_id, source=source, aliases=tuple(aliases), pinned=True),))
