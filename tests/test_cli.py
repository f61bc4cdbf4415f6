"""The `orchard` command line, run as a user would (subprocess of the installed entry point)."""
import json
import os
import subprocess
import sys



def orchard(*args, env=None):
    return subprocess.run([sys.executable, "-m", "orchard.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_config_check_prints_every_setting_and_hides_keys():
    result = orchard("config", "check", env={"API_KEYS": "very-secret"})
    assert result.returncode == 0 and "settings OK" in result.stdout
    assert "MAX_CONCURRENT_REQUESTS" in result.stdout and "very-secret" not in result.stdout


def test_an_invalid_setting_stops_with_its_name():
    result = orchard("config", "check", env={"PORT": "eighty"})
    assert result.returncode != 0 and "PORT='eighty' is not an integer" in result.stderr


def test_serve_refuses_a_model_that_does_not_exist(tmp_path):
    result = orchard("serve", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode != 0 and "no such GGUF file" in result.stderr


def test_model_random_writes_a_servable_folder(tmp_path):
    result = orchard("model", "random", str(tmp_path / "m"), "--shape", "qwen2.5-0.5b")
    assert result.returncode == 0 and "LOAD_FORMAT=dummy" in result.stdout
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["hidden_size"] == 896 and config["num_hidden_layers"] == 24
    assert (tmp_path / "m" / "tokenizer.json").is_file() and not (tmp_path / "m" / "model.safetensors").exists()


def test_bench_is_reachable_through_orchard():
    result = orchard("bench", "--help")
    assert result.returncode == 0 and "--concurrency" in result.stdout


def test_model_prepare_prepares_every_local_model_of_a_models_file(tmp_path, orchard_home, tiny_model_dir):
    models = tmp_path / "models.yaml"
    models.write_text(f"""models:
  - {{id: smol, source: embedded}}
  - {{id: tiny, source: "{tiny_model_dir}"}}
  - {{id: big, remote: {{base_url: "http://127.0.0.1:9/v1", model: m}}}}
""")
    done = orchard("model", "prepare", env={"MODELS_FILE": str(models), "ORCHARD_HOME": orchard_home})
    assert done.returncode == 0, done.stderr
    assert "model 'smol' ready" in done.stderr and "model 'tiny' ready" in done.stderr
    assert "big" not in done.stderr  # a remote model has nothing to prepare
    models.write_text("models:\n  - {id: bad, source: /nowhere/model.gguf}\n")
    refused = orchard("model", "prepare", env={"MODELS_FILE": str(models), "ORCHARD_HOME": orchard_home})
    assert refused.returncode != 0 and "/nowhere/model.gguf" in refused.stderr
