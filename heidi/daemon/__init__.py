"""`heidi daemon`: the loop on one thread, a small local HTTP API on another (design.md §8).

One thread owns the Machine and drives the run (apply control requests, tick while a stage state
waits, idle otherwise). The API (one asyncio thread, a few worker threads, a bounded number of
connections) never touches the Machine: it reads state.json and the journal from disk, and
queues control requests in OUT_DIR/control/ exactly as `heidi stop` from another process would;
the loop thread applies them at its next boundary, and a stop also ends a running stage (the
stage runner polls for it). Nothing the API does can block or end the loop. Standard library only.

Rooms: api (routing), server (the bounded HTTP/1.1 transport), http1 (request parsing, response
rendering), auth (token, Host, Origin, bind check), metrics (Prometheus text), pidfile (pid file,
daemon.json), service (loop thread, signals, the whole life), detach (double fork). The status
page is package data, heidi/page.html.

Endpoints (JSON unless noted; with HEIDI_API_TOKEN set, all but /healthz need
`Authorization: Bearer <token>`):
  GET  /healthz                      200 {"ok": true}
  GET  /api/v1/status                200 the status view (with live stage fields, "actions", and
                                         "waiting": a full disk, or null)
  POST /api/v1/action/<action>       202 {"action", "result": "queued"} | 409 {"error"}
                                     | 507 {"error"} (the request file: disk full)
                                     (action: train_now, pause, resume, stop, continue)
  GET  /api/v1/events?since=N&limit=M  200 {"events": [...], "next": K}
  GET  /metrics                      200 Prometheus text exposition 0.0.4
  GET  /                             200 HTML status page; /?token=... (accepted here only)
                                     303 to / with an HttpOnly SameSite=Strict cookie that
                                     the page's requests and a reload then carry
"""
from __future__ import annotations

import os

from ..config import Config
from ..journal import read_events_page
from .api import PAGE
from .auth import check_bind, is_loopback
from .detach import daemonize
from .metrics import render_metrics
from .service import Daemon

# the names heidi/daemon.py had, before it became this package
__all__ = ["PAGE", "Daemon", "check_bind", "is_loopback", "read_events_page", "render_metrics",
           "run_daemon"]


def run_daemon(config: Config, mode: str | None = None, detach: bool = False,
               pid_file: str | None = None, log_file: str | None = None) -> int:
    """`heidi daemon`: foreground (returns the exit code) or --detach (the parent returns once the
    daemon listens; HeidiError with the daemon's exit code and one line when it could not start)."""
    check_bind(config)
    if not detach:
        return Daemon(config, mode, pid_file=pid_file).serve()
    pid_file = os.path.abspath(pid_file or os.path.join(config.out_dir, "heidi.pid"))
    log_file = os.path.abspath(log_file or os.path.join(config.out_dir, "daemon.log"))
    return daemonize(config, mode, pid_file, log_file)
