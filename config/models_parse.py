"""Parse and validate a models file, collecting every problem rather than stopping at the first.

Each problem names where it is (`models[2] (id 'embed')`, `aliases.smart`) and the key, and
says what would fix it. Nothing here loads a model; paths are only checked to exist.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from config.models_file import GLOB_CHARS, KINDS, POOLINGS, ModelEntry, ModelsConfig, RemoteSpec

TOP_KEYS = ("models", "aliases")
ENTRY_KEYS = ("id", "source", "remote", "aliases", "kind", "pooling", "normalize", "max_concurrent",
              "pinned", "idle_unload_s")
REMOTE_KEYS = ("base_url", "model", "api_key_env", "timeout_s", "connect_timeout_s")
SECRET_KEYS = ("api_key", "key", "token", "apikey", "password", "secret", "authorization")
LOCAL_ONLY = ("pinned", "idle_unload_s")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_models(text: str, *, base_dir: Path, env: Mapping[str, str]) -> tuple[ModelsConfig | None, list[str]]:
    """(config, []) for a valid file, else (None, every problem found)."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return None, [f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}"]
    return _Parser(base_dir, env).parse(doc)


class _Parser:
    def __init__(self, base_dir: Path, env: Mapping[str, str]):
        self.base_dir, self.env = base_dir, env
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def parse(self, doc: Any) -> tuple[ModelsConfig | None, list[str]]:
        if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
            return None, ["the top level must be a mapping with 'models:' (a non-empty list of models) "
                          "and optionally 'aliases:'"]
        self.unknown_keys("the top level", doc, TOP_KEYS)
        raws = doc["models"]
        entries = [self.entry(i, raw) for i, raw in enumerate(raws)]
        routes = self.routes(doc.get("aliases"))
        self.unique_names(entries, routes)
        if entries and all(e is not None and e.is_remote for e in entries):
            self.problem("models", "every model is remote: list at least one local model (the engine serves "
                                   "it, and /health reports on it)")
        config = ModelsConfig(entries=tuple(e for e in entries if e), aliases=routes, warnings=tuple(self.warnings))
        self.check_routes(config)
        return (None, self.problems) if self.problems else (config, [])

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def unknown_keys(self, where: str, raw: dict, allowed: tuple[str, ...]) -> None:
        for key in raw:
            if str(key).lower() in SECRET_KEYS:
                self.problem(where, f"'{key}': never write a key in this file; put it in an environment "
                                    f"variable and name that variable in remote.api_key_env")
            elif key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
                self.problem(where, f"unknown key '{key}'; {hint}")

    # -- one entry -------------------------------------------------------------------------------

    def entry(self, i: int, raw: Any) -> ModelEntry | None:
        if not isinstance(raw, dict):
            self.problem(f"models[{i}]", "must be a mapping such as {id: my-model, source: embedded}")
            return None
        ident = raw.get("id")
        where = f"models[{i}] (id {ident!r})" if _name(ident) else f"models[{i}]"
        if ident is None or ident == "":
            self.problem(where, "'id' is missing or empty: give the name clients send as `model`")
        elif not _name(ident):
            self.problem(where, f"'id' must be a string without surrounding spaces (quote numbers), not {ident!r}")
        self.unknown_keys(where, raw, ENTRY_KEYS)
        kind = self.choice(where, raw, "kind", KINDS, "chat")
        remote, source = None, None
        if ("source" in raw) == ("remote" in raw):
            self.problem(where, "give exactly one of 'source' (a local model) or 'remote' (an upstream server)")
        elif "remote" in raw:
            remote = self.remote(where, raw["remote"])
            for key in LOCAL_ONLY:
                if key in raw:
                    self.problem(where, f"'{key}' applies to local models only; remove it from a remote entry")
        else:
            source = self.source(where, raw["source"])
        pooling = self.choice(where, raw, "pooling", POOLINGS, "last" if kind == "embedding" else None)
        for key in ("pooling", "normalize"):
            if key in raw and kind != "embedding":
                self.problem(where, f"'{key}' is only for 'kind: embedding' models")
        pinned = self.boolean(where, raw, "pinned", False)
        idle = self.number(where, raw, "idle_unload_s", None)
        if pinned and idle is not None:
            self.problem(where, "a pinned model is never unloaded: remove 'idle_unload_s' or 'pinned'")
        max_concurrent = raw.get("max_concurrent")
        if max_concurrent is not None and (type(max_concurrent) is not int or max_concurrent < 1):
            self.problem(where, f"'max_concurrent' must be a whole number >= 1, not {max_concurrent!r}")
            max_concurrent = None
        return ModelEntry(id=ident if _name(ident) else f"models[{i}]", source=source, remote=remote,
                          aliases=self.names_list(where, raw.get("aliases"), "aliases"), kind=kind,
                          pooling=pooling, normalize=self.boolean(where, raw, "normalize", True),
                          max_concurrent=max_concurrent, pinned=pinned, idle_unload_s=idle)

    def choice(self, where: str, raw: dict, key: str, allowed: tuple[str, ...], default):
        value = raw.get(key, default)
        if value is not default and value not in allowed:
            self.problem(where, f"'{key}' must be one of {', '.join(allowed)}, not {value!r}")
            return default
        return value

    def boolean(self, where: str, raw: dict, key: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.problem(where, f"'{key}' must be true or false, not {value!r}")
            return default
        return value

    def number(self, where: str, raw: dict, key: str, default: float | None) -> float | None:
        value = raw.get(key, default)
        if value is default:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            self.problem(where, f"'{key}' must be a number of seconds > 0, not {value!r}")
            return default
        return float(value)

    def names_list(self, where: str, value: Any, key: str) -> tuple[str, ...]:
        """A list of names (a single string is a list of one)."""
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(_name(v) for v in items):
            self.problem(where, f"'{key}' must be a list of non-empty names, e.g. [default, gpt-4o]; got {value!r}")
            return ()
        return tuple(items)

    def source(self, where: str, source: Any) -> str | None:
        if not _name(source):
            self.problem(where, f"'source' must be 'embedded', a .gguf file, an MLX model folder or a "
                                f"Hugging Face repo id; got {source!r}")
            return None
        if source == "embedded":
            return source
        path = Path(source).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        path_like = source.startswith(("/", "./", "../", "~")) or source.lower().endswith(".gguf")
        if source.lower().endswith(".gguf"):
            if not path.is_file():
                self.problem(where, f"source {source!r}: no such .gguf file ({path})")
            return str(path)
        if path.is_dir():
            if not (path / "config.json").is_file():
                self.problem(where, f"source {source!r}: the folder has no config.json; give an MLX model "
                                    f"folder, a .gguf file or a Hugging Face repo id")
            return str(path)
        if path_like:
            what = "is not a .gguf file or a model folder" if path.exists() else "no such file or folder"
            self.problem(where, f"source {source!r}: {what} ({path})")
            return str(path)
        if _REPO_ID.fullmatch(source):
            return source
        self.problem(where, f"source {source!r} is neither 'embedded', a .gguf file, an MLX model folder "
                            f"nor a Hugging Face repo id like 'org/name'")
        return None

    def remote(self, where: str, raw: Any) -> RemoteSpec | None:
        if not isinstance(raw, dict):
            self.problem(where, "'remote' must be a mapping: {base_url: https://host/v1, model: name, "
                                "api_key_env: VARIABLE}")
            return None
        self.unknown_keys(f"{where} remote", raw, REMOTE_KEYS)
        base_url = self.base_url(where, raw.get("base_url"))
        model = raw.get("model")
        if not _name(model):
            self.problem(where, "'remote.model' must be the upstream's model name (a non-empty string)")
        key_env = raw.get("api_key_env")
        if key_env is not None and not (isinstance(key_env, str) and _ENV_NAME.fullmatch(key_env)):
            self.problem(where, f"'remote.api_key_env' must name an environment variable (letters, digits, _), "
                                f"not {key_env!r}")
            key_env = None
        elif key_env is not None and not self.env.get(key_env):
            self.warnings.append(f"{where}: remote.api_key_env {key_env} is not set; requests to this model "
                                 f"will be sent without a key")
        timeout = self.number(f"{where} remote", raw, "timeout_s", 600.0)
        connect = self.number(f"{where} remote", raw, "connect_timeout_s", 5.0)
        return RemoteSpec(base_url=base_url or "", model=model if _name(model) else "", api_key_env=key_env,
                          timeout_s=timeout, connect_timeout_s=connect)

    def base_url(self, where: str, value: Any) -> str | None:
        parts = urlsplit(value) if isinstance(value, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(where, "'remote.base_url' must be an http:// or https:// URL such as "
                                "https://api.example.com/v1")
            return None
        if parts.username or parts.password:  # never echo it: it holds a credential
            self.problem(where, "'remote.base_url' must not carry a user or password; name the key's "
                                "environment variable in remote.api_key_env")
            return None
        if parts.query or parts.fragment:
            self.problem(where, "'remote.base_url' must not have a ?query or #fragment")
        return value.rstrip("/")

    # -- names across the file ---------------------------------------------------------------------

    def routes(self, raw: Any) -> dict[str, tuple[str, ...]]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem("aliases", "must be a mapping: name -> [model ids or aliases, tried in order]")
            return {}
        routes = {}
        for name, targets in raw.items():
            where = f"aliases.{name}"
            if not _name(name) or GLOB_CHARS & set(name):
                self.problem(where, "an alias route's name must be a plain string (globs belong in a "
                                    "model's own 'aliases')")
                continue
            routes[name] = self.names_list(where, targets, "targets")
            if targets in (None, [], ""):
                self.problem(where, "lists no targets: give model ids or aliases, tried in order")
            for dup in sorted({t for t in routes[name] if routes[name].count(t) > 1}):
                self.problem(where, f"lists '{dup}' more than once")
        return routes

    def unique_names(self, entries: list[ModelEntry | None], routes: dict) -> None:
        """Ids, model aliases and alias routes share one namespace."""
        owner: dict[str, str] = {}

        def claim(where: str, role: str, name: str, what: str) -> None:
            if name in owner:
                self.problem(where, f"{role} '{name}' is already {owner[name]}; ids and aliases must all differ")
            else:
                owner[name] = what

        named = [(f"models[{i}] (id {e.id!r})", i, e) for i, e in enumerate(entries) if e and e.id != f"models[{i}]"]
        for where, i, entry in named:
            claim(where, "id", entry.id, f"the id of models[{i}]")
        for where, i, entry in named:
            for alias in entry.aliases:
                claim(where, "alias", alias, f"an alias of models[{i}] (id {entry.id!r})")
        for name in routes:
            claim(f"aliases.{name}", "alias", name, f"the alias route aliases.{name}")

    def check_routes(self, config: ModelsConfig) -> None:
        exact = {e.id for e in config.entries} | {a for e in config.entries for a in e.aliases} | set(config.aliases)
        for name, targets in config.aliases.items():
            for target in targets:
                if target not in exact:
                    close = difflib.get_close_matches(target, sorted(exact), n=1, cutoff=0.6)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    self.problem(f"aliases.{name}", f"target '{target}' is not a model id or alias{hint}")
        for cycle in _cycles(config.aliases):
            self.problem("aliases", f"cycle {' -> '.join(cycle)}: an alias route must end at models")
        for name in config.aliases:
            kinds = {e.id: e.kind for e in config.resolve(name)}
            if len(set(kinds.values())) > 1:
                listed = ", ".join(f"{k}: {v}" for k, v in kinds.items())
                self.problem(f"aliases.{name}", f"mixes chat and embedding models ({listed}); "
                                                f"a route must serve one kind")


def _name(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and value == value.strip()


def _cycles(routes: Mapping[str, tuple[str, ...]]) -> list[list[str]]:
    """Each cycle among alias routes once, as the path that closes it (a -> b -> a)."""
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            if set(cycle) not in [set(c) for c in found]:
                found.append(cycle)
            return
        if name in done:
            return
        for target in routes.get(name, ()):
            if target in routes:
                visit(target, path + [name])
        done.add(name)

    for name in routes:
        visit(name, [])
    return found


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; a models file must not."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key) if isinstance(key, str) else None
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
