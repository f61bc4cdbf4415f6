"""gunicorn.conf.py as it is, plus the per-step engine trace (bench/engine_trace.py) in the
worker when ENGINE_TRACE names a file: written when the worker exits."""
import os as _os
import sys as _sys

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_sys.path.insert(0, _root)
with open(_os.path.join(_root, "gunicorn.conf.py")) as _f:
    exec(compile(_f.read(), "gunicorn.conf.py", "exec"))

_real_post_worker_init, _real_worker_exit = globals()["post_worker_init"], globals()["worker_exit"]  # from the exec


def post_worker_init(worker):
    from bench import engine_trace

    if engine_trace.wanted():
        engine_trace.install()
    _real_post_worker_init(worker)


def worker_exit(server, worker):
    from bench import engine_trace

    if worker.pid == _os.getpid() and engine_trace.wanted():
        engine_trace.dump(_os.environ["ENGINE_TRACE"])
    _real_worker_exit(server, worker)
