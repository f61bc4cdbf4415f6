"""Gunicorn settings for Orchard: one gevent worker that owns the one MLX engine.

Every value comes from config.Settings (environment / .env / .env.production).
"""
from gunicorn import util as _gunicorn_util

from app.errors import write_raw_error
from config import load_settings

# Requests Gunicorn itself cannot parse get the OpenAI envelope too, never an HTML page.
_gunicorn_util.write_error = write_raw_error

_settings = load_settings()

if _settings.distributed_rank > 0:
    # A follower rank of a distributed group has no web side: the same service unit (systemd,
    # launchd) runs on every rank, and on ranks > 0 this process becomes `orchard serve`'s
    # follower instead (same PID, so the service manager keeps watching it).
    import os as _os
    import sys as _sys

    _os.execv(_sys.executable, [_sys.executable, "-m", "orchard.cli", "serve"])

bind = f"{_settings.host}:{_settings.port}"
# Exactly one worker: the engine owns the device and the model is loaded once. Several
# processes would each load the model, and on a Mac they collide in Metal (the seed's
# 4-worker test failed with "Unable to build metal library"). Concurrency comes from
# gevent connections plus continuous batching inside the worker.
workers = 1
# Gunicorn's gevent worker, whose stop follows events rather than one-second polls (app/worker.py).
worker_class = "app.worker.OrchardWorker"
worker_connections = _settings.worker_connections
timeout = _settings.timeout
graceful_timeout = _settings.graceful_timeout
keepalive = _settings.keep_alive
# Never recycle the worker: with one worker, max_requests (the seed's 2000) would kill
# it, drop every in-flight request and reload the model. 0 disables recycling.
max_requests = 0
max_requests_jitter = 0
# Load the app in the worker, after fork: MLX must never be touched in the master.
preload_app = False
wsgi_app = "app:create_app()"
accesslog = None
errorlog = "-"
loglevel = _settings.log_level
proc_name = "orchard"


def post_worker_init(worker):
    """Starts the engine watchdog (a dead engine ends the worker; the master starts a
    fresh one). SIGTERM drains: the app refuses new work at once and lets in-flight requests
    finish within DRAIN_TIMEOUT (< graceful_timeout), while Gunicorn stops accepting."""
    import signal

    import gevent

    from app.keepalive import IdleConnections

    orchard = worker.wsgi.extensions["orchard"]
    # A dead engine: the worker stops accepting (the master keeps the port; the next worker
    # takes the queued connections), answers what it has, and exits.
    orchard.start_watchdog(stop_accepting=lambda: (setattr(worker, "alive", False), worker.wake()))
    stop_worker = worker.handle_exit
    # Idle keep-alive connections close at once on stop, not KEEP_ALIVE seconds later (app/keepalive.py).
    idle = IdleConnections(worker)

    def handle_term(sig, frame):
        gevent.spawn(orchard.begin_drain)
        stop_worker(sig, frame)
        gevent.spawn(idle.close_idle)

    signal.signal(signal.SIGTERM, handle_term)


def worker_exit(server, worker):
    """Stop the engine thread, then end the process without the interpreter's teardown.

    Why not a normal exit: after Python finalizes, the C++ runtime destroys MLX's static state
    (on CUDA its streams' worker threads and event objects) while nothing of ours needs it
    any more, and on the GPU that teardown intermittently ended in std::terminate ("terminate
    called without an active exception": a worker killed by SIGABRT after a clean drain, in 4
    of the issue-14 benchmark runs of stop 18). Everything the worker owes is done by now:
    the drain answered every request, the engine thread stopped; so the logs are flushed and
    the process leaves with the exit status Gunicorn was about to give it."""
    import logging
    import os
    import sys

    if worker.pid != os.getpid():
        return  # the master calls this hook too, for a worker that is already gone
    orchard = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("orchard")
    if orchard is not None:
        orchard.finish()
    status = _exit_status(sys.exc_info()[1])
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _exit_status(exiting) -> int:
    """The status the worker's SystemExit carries (Gunicorn raises one on every path here)."""
    if isinstance(exiting, SystemExit):
        code = exiting.code
        if code is None:
            return 0
        return code & 0xFF if isinstance(code, int) else 1
    return 1
