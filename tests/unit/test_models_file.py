"""MODELS_FILE: validation that names the entry and key, resolve() order, and `orchard config check`."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from config import load_settings
from config.models_file import (ModelEntry, ModelsConfig, ModelsFileError, RemoteSpec, load_models_file,
                                single_model_config)

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
models:
  - {id: qwen-0.5b, source: mlx-community/Qwen2.5-0.5B-Instruct-4bit, aliases: [default], max_concurrent: 5, pinned: true}
  - {id: local, source: ./local-model, max_concurrent: 2, idle_unload_s: 900, aliases: ["claude-*", claude-3]}
  - {id: embed, source: ./weights.gguf, kind: embedding, pooling: mean, normalize: false}
  - {id: big, remote: {base_url: "https://example.invalid/v1/", api_key_env: BIG_API_KEY, model: big-model}}
  - {id: haiku, source: embedded, aliases: [claude-3-haiku]}
aliases:
  smart: [local, big]
  smarter: [smart, qwen-0.5b, big, local]
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "local-model").mkdir(exist_ok=True)
    (tmp_path / "local-model" / "config.json").write_text("{}")
    (tmp_path / "bare-folder").mkdir(exist_ok=True)
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model")
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, env=None) -> list[str]:
    with pytest.raises(ModelsFileError) as info:
        load_models_file(write(tmp_path, text), env or {})
    assert str(info.value).count("\n  - ") == len(info.value.problems)
    return info.value.problems


def one(entry: str, aliases: str = "") -> str:
    return f"models:\n  - {{id: ok, source: embedded}}\n  - {entry}\n" + (f"aliases:\n{aliases}" if aliases else "")


def test_a_good_file_loads_with_its_values(tmp_path):
    config = load_models_file(write(tmp_path, GOOD), {"BIG_API_KEY": "sk-secret"})
    local, embed, big = config.entry("local"), config.entry("embed"), config.entry("big")
    assert config.entry("qwen-0.5b").pinned and config.entry("qwen-0.5b").max_concurrent == 5
    assert local.source == str(tmp_path / "local-model") and local.idle_unload_s == 900.0 and not local.pinned
    assert (embed.kind, embed.pooling, embed.normalize, embed.source) == ("embedding", "mean", False,
                                                                           str(tmp_path / "weights.gguf"))
    assert big.is_remote and big.source is None and big.remote == RemoteSpec(
        base_url="https://example.invalid/v1", model="big-model", api_key_env="BIG_API_KEY")
    assert big.remote.api_key({"BIG_API_KEY": "sk-secret"}) == "sk-secret" and big.remote.api_key({}) is None
    assert config.warnings == () and dict(config.aliases)["smart"] == ("local", "big")


def test_embedding_pooling_defaults_to_last_and_chat_has_none(tmp_path):
    config = load_models_file(write(tmp_path, one("{id: e, source: embedded, kind: embedding}")), {})
    assert config.entry("e").pooling == "last" and config.entry("ok").pooling is None


@pytest.mark.parametrize("text, expected", [
    ("- a\n", "the top level must be a mapping with 'models:'"),
    ("models: []\n", "a non-empty list of models"),
    ("aliases: {}\n", "the top level must be a mapping with 'models:'"),
    ("models:\n  - {id: a, source: embedded}\nmodel_list: []\n", "the top level: unknown key 'model_list'"),
    (one("{id: embed, source: embedded, kind: embedding, poolin: last}"),
     "models[1] (id 'embed'): unknown key 'poolin'; did you mean 'pooling'?"),
    (one("{id: x, source: embedded, colour: red}"), "unknown key 'colour'; allowed: id, source"),
    (one("{source: embedded}"), "models[1]: 'id' is missing or empty"),
    (one("{id: '', source: embedded}"), "models[1]: 'id' is missing or empty"),
    (one("{id: 7, source: embedded}"), "models[1]: 'id' must be a string without surrounding spaces (quote numbers), not 7"),
    (one("not-a-mapping"), "models[1]: must be a mapping"),
    (one("{id: ok, source: embedded}"), "models[1] (id 'ok'): id 'ok' is already the id of models[0]"),
    (one("{id: x, source: embedded, aliases: [ok]}"), "models[1] (id 'x'): alias 'ok' is already the id of models[0]"),
    ("models:\n  - {id: a, source: embedded, aliases: [d]}\n  - {id: b, source: embedded, aliases: [d]}\n",
     "models[1] (id 'b'): alias 'd' is already an alias of models[0] (id 'a')"),
    (one("{id: x, source: embedded}", "  ok: [x]\n"), "aliases.ok: alias 'ok' is already the id of models[0]"),
    (one("{id: x, source: embedded, aliases: [r]}", "  r: [x]\n"), "aliases.r: alias 'r' is already an alias of models[1]"),
    (one("{id: x, source: embedded, aliases: [1, 2]}"), "'aliases' must be a list of non-empty names"),
    (one("{id: x}"), "models[1] (id 'x'): give exactly one of 'source' (a local model) or 'remote'"),
    (one("{id: x, source: embedded, remote: {base_url: 'http://h', model: m}}"), "give exactly one of 'source'"),
    (one("{id: x, source: embedded, kind: rerank}"), "'kind' must be one of chat, embedding, not 'rerank'"),
    (one("{id: x, source: embedded, kind: embedding, pooling: max}"), "'pooling' must be one of last, mean, cls"),
    (one("{id: x, source: embedded, pooling: mean}"), "'pooling' is only for 'kind: embedding' models"),
    (one("{id: x, source: embedded, normalize: false}"), "'normalize' is only for 'kind: embedding' models"),
    (one("{id: x, source: embedded, max_concurrent: 0}"), "'max_concurrent' must be a whole number >= 1, not 0"),
    (one("{id: x, source: embedded, max_concurrent: '2'}"), "'max_concurrent' must be a whole number >= 1"),
    (one("{id: x, source: embedded, max_concurrent: true}"), "'max_concurrent' must be a whole number >= 1"),
    (one("{id: x, source: embedded, idle_unload_s: 0}"), "'idle_unload_s' must be a number of seconds > 0, not 0"),
    (one("{id: x, source: embedded, idle_unload_s: -5}"), "'idle_unload_s' must be a number of seconds > 0"),
    (one("{id: x, source: embedded, idle_unload_s: soon}"), "'idle_unload_s' must be a number of seconds > 0"),
    (one("{id: x, source: embedded, pinned: 'true'}"), "'pinned' must be true or false, not 'true'"),
    (one("{id: x, source: embedded, pinned: true, idle_unload_s: 60}"), "a pinned model is never unloaded"),
    (one("{id: x, source: ./missing.gguf}"), "source './missing.gguf': no such .gguf file"),
    (one("{id: x, source: /nowhere/model.gguf}"), "source '/nowhere/model.gguf': no such .gguf file"),
    (one("{id: x, source: ./bare-folder}"), "source './bare-folder': the folder has no config.json"),
    (one("{id: x, source: ../no-such-folder}"), "source '../no-such-folder': no such file or folder"),
    (one("{id: x, source: ~/no-such-orchard-folder}"), "no such file or folder"),
    (one("{id: x, source: ./notes.txt}"), "is not a .gguf file or a model folder"),
    (one("{id: x, source: qwen}"), "source 'qwen' is neither 'embedded', a .gguf file, an MLX model folder nor a "
                                   "Hugging Face repo id like 'org/name'"),
    (one("{id: x, source: a/b/c}"), "is neither 'embedded'"),
    (one("{id: x, remote: {base_url: 'ftp://h/v1', model: m}}"), "'remote.base_url' must be an http:// or https://"),
    (one("{id: x, remote: {base_url: 'h/v1', model: m}}"), "'remote.base_url' must be an http:// or https://"),
    (one("{id: x, remote: {base_url: 'https://h/v1?x=1', model: m}}"), "must not have a ?query"),
    (one("{id: x, remote: {base_url: 'https://h/v1'}}"), "'remote.model' must be the upstream's model name"),
    (one("{id: x, remote: {base_url: 'https://h/v1', model: m, api_key_env: BIG-KEY}}"),
     "'remote.api_key_env' must name an environment variable"),
    (one("{id: x, remote: {base_url: 'https://h/v1', model: m, timeout_s: 0}}"), "remote: 'timeout_s' must be a number"),
    (one("{id: x, remote: {base_url: 'https://h/v1', model: m, connect_timout_s: 1}}"),
     "models[1] (id 'x') remote: unknown key 'connect_timout_s'; did you mean 'connect_timeout_s'?"),
    (one("{id: x, remote: {base_url: 'https://h/v1', model: m}, pinned: true}"), "'pinned' applies to local models only"),
    (one("{id: x, remote: https://h/v1}"), "'remote' must be a mapping"),
    (one("{id: x, source: embedded}", "  r: [y]\n"), "aliases.r: target 'y' is not a model id or alias"),
    (one("{id: x, source: embedded}", "  r: [xx]\n"), "target 'xx' is not a model id or alias; did you mean 'x'?"),
    (one("{id: x, source: embedded}", "  r: []\n"), "aliases.r: lists no targets"),
    (one("{id: x, source: embedded}", "  r: [x, x]\n"), "aliases.r: lists 'x' more than once"),
    (one("{id: x, source: embedded}", "  'r*': [x]\n"), "aliases.r*: an alias route's name must be a plain string"),
    (one("{id: x, source: embedded}", "  a: [b]\n  b: [c]\n  c: [a]\n"), "aliases: cycle a -> b -> c -> a"),
    (one("{id: x, source: embedded}", "  a: [a]\n"), "aliases: cycle a -> a"),
    (one("{id: e, source: embedded, kind: embedding}", "  r: [ok, e]\n"),
     "aliases.r: mixes chat and embedding models (ok: chat, e: embedding)"),
    ("models:\n  - {id: x, source: embedded}\naliases: [x]\n", "aliases: must be a mapping"),
    ("models:\n  - {id: x, source: embedded\n", "not valid YAML at line"),
    ("models:\n  - id: x\n    id: y\n    source: embedded\n", "key 'id' appears twice in one mapping"),
])
def test_each_problem_names_the_entry_and_key(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found


def test_every_problem_is_reported_at_once(tmp_path):
    text = one("{id: x, source: qwen, kind: rerank, max_concurrent: 0, pinnd: true}", "  r: [nope]\n")
    assert len(problems(tmp_path, text)) == 5


def test_an_unreadable_file_is_a_problem(tmp_path):
    with pytest.raises(ModelsFileError) as info:
        load_models_file(tmp_path / "absent.yaml", {})
    assert "absent.yaml" in str(info.value) and "cannot be read" in info.value.problems[0]


def test_a_key_written_into_the_file_is_refused_without_echoing_it(tmp_path):
    text = one("{id: x, remote: {base_url: 'https://user:sk-inline@h/v1', model: m, api_key: sk-literal}}")
    found = "\n".join(problems(tmp_path, text))
    assert "never write a key in this file" in found and "must not carry a user or password" in found
    assert "sk-literal" not in found and "sk-inline" not in found


def test_an_unset_key_variable_is_a_warning_not_an_error(tmp_path):
    config = load_models_file(write(tmp_path, GOOD), {})
    assert config.warnings == ("models[3] (id 'big'): remote.api_key_env BIG_API_KEY is not set; requests to "
                               "this model will be sent without a key",)


@pytest.mark.parametrize("name, expected", [
    ("qwen-0.5b", ["qwen-0.5b"]),
    ("default", ["qwen-0.5b"]),
    ("claude-3", ["local"]),              # exact alias
    ("claude-3-haiku", ["haiku"]),        # exact before another entry's glob
    ("claude-3-opus", ["local"]),         # glob
    ("smart", ["local", "big"]),
    ("smarter", ["local", "big", "qwen-0.5b"]),  # nested, deduplicated, order kept
])
def test_resolve_gives_the_targets_in_order(tmp_path, name, expected):
    config = load_models_file(write(tmp_path, GOOD), {})
    assert [e.id for e in config.resolve(name)] == expected


@pytest.mark.parametrize("name", ["unknown", "embedded", "mlx-community/Qwen2.5-0.5B-Instruct-4bit", "./local-model",
                                  "/etc/passwd", "", "claude"])
def test_resolve_never_treats_a_name_as_a_source(tmp_path, name):
    config = load_models_file(write(tmp_path, GOOD), {})
    with pytest.raises(KeyError):
        config.resolve(name)
    with pytest.raises(KeyError):
        config.entry(name)


def test_resolve_stops_on_a_cycle_it_is_handed():
    config = ModelsConfig(entries=(ModelEntry(id="m", source="embedded"),), aliases={"a": ("b", "m"), "b": ("a",)})
    assert [e.id for e in config.resolve("a")] == ["m"]


def test_model_alone_is_one_pinned_chat_entry():
    config = single_model_config("smollm2-135m-instruct", "embedded", ("gpt-4o", "claude-*"))
    (entry,) = config.entries
    assert (entry.id, entry.source, entry.kind, entry.pinned, entry.is_remote) == (
        "smollm2-135m-instruct", "embedded", "chat", True, False)
    assert config.resolve("claude-sonnet") == (entry,) and config.resolve("gpt-4o") == (entry,)


def test_models_file_setting_defaults_to_empty_and_must_exist(tmp_path):
    from config import SettingsError

    assert load_settings({}, dotenv=False).models_file == ""
    with pytest.raises(SettingsError, match="MODELS_FILE='/nowhere.yaml': no such file"):
        load_settings({"MODELS_FILE": "/nowhere.yaml"}, dotenv=False)


def orchard(*args, env):
    return subprocess.run([sys.executable, "-m", "orchard.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=60)


def test_config_check_prints_models_and_routes_never_the_key(tmp_path):
    result = orchard("config", "check", env={"MODELS_FILE": str(write(tmp_path, GOOD)), "BIG_API_KEY": "sk-secret-9"})
    assert result.returncode == 0 and "models file OK" in result.stdout, result.stderr
    assert "remote https://example.invalid/v1 (big-model)" in result.stdout
    assert "alias smarter -> smart | qwen-0.5b | big | local  (tries local, big, qwen-0.5b)" in result.stdout
    assert "sk-secret-9" not in result.stdout + result.stderr and "warning" not in result.stderr


def test_config_check_prints_warnings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BIG_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "orchard.cli", "config", "check"], capture_output=True, text=True,
                            cwd=ROOT, env={**env, "MODELS_FILE": str(write(tmp_path, GOOD))}, timeout=60)
    assert result.returncode == 0 and "warning: models[3] (id 'big'): remote.api_key_env BIG_API_KEY" in result.stderr


def test_config_check_exits_1_with_every_problem(tmp_path):
    text = one("{id: embed, source: embedded, kind: embedding, poolin: last}", "  a: [b]\n  b: [a]\n")
    result = orchard("config", "check", env={"MODELS_FILE": str(write(tmp_path, text))})
    assert result.returncode == 1 and "models file OK" not in result.stdout
    assert "2 problems" in result.stderr and "unknown key 'poolin'; did you mean 'pooling'?" in result.stderr
    assert "cycle a -> b -> a" in result.stderr


def test_a_file_of_remote_models_only_is_refused(tmp_path):
    found = problems(tmp_path, """
        models:
          - {id: big, remote: {base_url: "https://example.invalid/v1", model: big-model}}
        """)
    assert any("every model is remote" in p for p in found), found
