"""The `orchard` command: serve, bench, model prepare/import, config check."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (Gunicorn, one gevent worker)")
    serve.add_argument("--model", help="overrides MODEL")
    serve.add_argument("--host", help="overrides HOST")
    serve.add_argument("--port", help="overrides PORT")
    serve.add_argument("--ranks", type=int, default=1,
                       help="serve one model across this many local processes (a loopback group; rank 0 on PORT)")
    sub.add_parser("bench", help="benchmark an OpenAI-compatible server (see `orchard bench --help`)",
                   add_help=False)
    model = sub.add_parser("model", help="prepare or import models")
    model_sub = model.add_subparsers(dest="action", required=True)
    model_sub.add_parser("prepare", help="fetch and import the configured MODEL ahead of serving")
    rnd = model_sub.add_parser("random", help="write a Qwen2-shaped folder (config + tokenizer) for LOAD_FORMAT=dummy")
    rnd.add_argument("out", type=Path)
    rnd.add_argument("--shape", default="qwen2.5-0.5b", choices=("tiny", "qwen2.5-0.5b", "qwen2.5-7b"))
    rnd.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    rnd.add_argument("--with-weights", action="store_true", help="also write random safetensors")
    rnd.add_argument("--tokenizer", type=Path, help="copy this folder's tokenizer (vocabulary sized to it)")
    imp = model_sub.add_parser("import", help="convert a GGUF file into a cached MLX model folder")
    imp.add_argument("gguf", type=Path)
    imp.add_argument("--dtype", default="auto", choices=("auto", "keep", "float32", "float16", "bfloat16"))
    config = sub.add_parser("config", help="settings")
    config.add_subparsers(dest="action", required=True).add_parser("check", help="validate and print settings")

    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from bench.cli import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"serve": _serve, "model": _model, "config": _config}[args.command](args)


def _settings():
    from config import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError as exc:
        sys.exit(f"orchard: invalid setting: {exc}")


def _serve(args) -> int:
    for name in ("model", "host", "port"):
        if getattr(args, name):
            os.environ[name.upper()] = str(getattr(args, name))
    settings = _settings()  # fail here, with a readable message, before Gunicorn starts
    if settings.distributed_rank > 0:  # a follower rank of a distributed group: no web side
        from engine import blas
        from orchard.group import run_follower

        blas.activate(settings.blas)  # this process loads the model: before anything imports mlx
        _prepare(settings)
        return run_follower(settings)
    _prepare(settings)  # fetch/convert now, with progress, so the worker starts fast
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")]
    if args.ranks > 1:
        from orchard.group import loopback_hostfile, supervise

        return supervise(args.ranks, loopback_hostfile(args.ranks, settings.cache_dir / "groups"), gunicorn,
                         settings.distributed_backend)
    os.execv(sys.executable, gunicorn)
    return 0


def _progress(stage: str, fraction: float) -> None:
    end = "\n" if fraction >= 1.0 else ""
    print(f"\r  {stage:<40} {fraction * 100:5.1f}%", end=end, file=sys.stderr, flush=True)


def _prepare(settings) -> None:
    """Fetch and import MODEL, or every local model of MODELS_FILE (invalid file: exit 1)."""
    from engine.model_source import resolve

    wanted = [("MODEL", settings.model, settings.model_id)]
    if settings.models_file:
        from config.models_file import ModelsFileError, load_models_file

        try:
            entries = load_models_file(settings.models_file).entries
        except ModelsFileError as exc:
            sys.exit(f"orchard: invalid {exc}")
        wanted = [(f"model {e.id}", e.source, e.id) for e in entries if not e.is_remote]
    for what, source_setting, model_id in wanted:
        try:
            source = resolve(source_setting, settings.cache_dir, dtype_setting=settings.model_dtype,
                             model_id=model_id, progress=_progress)
        except (OSError, ValueError, RuntimeError) as exc:
            sys.exit(f"orchard: cannot prepare {what} ({source_setting!r}): {exc}")
        where = source.location if source.is_local else "the Hugging Face hub (downloaded on first load)"
        print(f"model '{source.model_id}' ready: {where}", file=sys.stderr)


def _model(args) -> int:
    from engine.model_source import import_dtype

    settings = _settings()
    if args.action == "prepare":
        _prepare(settings)
        return 0
    if args.action == "random":
        from engine.random_model import write_random_model

        out = write_random_model(args.out, args.shape, weights=args.with_weights, dtype=args.dtype,
                                 tokenizer_from=args.tokenizer)
        print(f"wrote {out}\nserve it with: MODEL={out} LOAD_FORMAT={'weights' if args.with_weights else 'dummy'} orchard serve")
        return 0
    from engine.gguf import import_gguf

    out = import_gguf(args.gguf, settings.cache_dir / "imported", dtype=import_dtype(args.dtype), progress=_progress)
    print(f"imported to {out}\nserve it with: MODEL={out} orchard serve")
    return 0


def _config(args) -> int:
    settings = _settings()
    width = max(len(env) for env, _, _ in settings.describe())
    for env, value, help_text in settings.describe():
        print(f"{env:<{width}}  {value:<28}  {help_text}")
    print("settings OK")
    return _check_models_file(settings.models_file, settings.max_concurrent_requests) if settings.models_file else 0


def _check_models_file(path: str, default_concurrency: int) -> int:
    """Validate MODELS_FILE; print its models, alias routes and warnings, or every problem."""
    from config.models_file import ModelsFileError, load_models_file

    try:
        models = load_models_file(path)
    except ModelsFileError as exc:
        print(f"orchard: invalid {exc}", file=sys.stderr)
        return 1
    rows = [("ID", "KIND", "SOURCE", "ALIASES", "PINNED", "MAX_CONCURRENT")]
    rows += [(e.id, e.kind + (f" ({e.pooling})" if e.pooling else ""), ("remote " if e.is_remote else "") + e.where(),
              ", ".join(e.aliases) or "-", "yes" if e.pinned else "no",
              str(e.max_concurrent or f"{default_concurrency} (server)")) for e in models.entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\nmodels ({path}):")
    for row in rows:
        print("  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip())
    for name, targets in models.aliases.items():
        print(f"  alias {name} -> {' | '.join(targets)}  (tries {', '.join(e.id for e in models.resolve(name))})")
    for warning in models.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("models file OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
