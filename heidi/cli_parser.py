"""The `heidi` command line's parser (argparse, loaded only when the fast path in heidi.cli does
not parse the command): every command and option with its help, and `heidi --help`'s exit codes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from ._version import __version__

if TYPE_CHECKING:
    import argparse

MODES = ("full", "collect")  # heidi.config.MODES; the CLI parses before loading the config


class UsageExit(Exception):
    """Bad usage: one line, exit 2."""


def _parser_class() -> type:
    import argparse  # ~10 ms of start-up: only for what the fast path does not parse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # one line, exit 2
            raise UsageExit(f"{self.prog}: {message}")

    return _Parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", metavar="DIR", help="the run's directory (default: $OUT_DIR or "
                   "~/.local/heidi_engine)")
    p.add_argument("--config", metavar="FILE",
                   help="heidi.toml to read (default: $HEIDI_CONFIG or ./heidi.toml)")


EPILOG = """exit codes:
  0        ok
  1        the run is in ERROR, verification failed, an action was refused, or the journal
           changed outside heidi (one line on stderr says why)
  2        bad usage or configuration (one line naming what is wrong; nothing is written)
  75       another process holds the run (`tick` says nothing: the next cron minute retries)
  128+N    `run` or `tick` ended by signal N (130 Ctrl-C, 143 SIGTERM): the run is
           interrupted, not stopped; the next `heidi run`, tick or daemon continues it

configuration: environment variables (or the same names in lower case in heidi.toml): see
the README's "Configuration" table. `heidi COMMAND --help` for each command's options."""

MODE_HELP = "full (default: $HEIDI_MODE, else full) or collect (stops after validation until train-now)"


def build_parser() -> "argparse.ArgumentParser":
    import argparse
    _Parser = _parser_class()
    parser = _Parser(prog="heidi", description="Drive teacher -> validate -> test gate -> train -> "
                     "eval loops, one journaled transition at a time.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"heidi {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def cmd(name: str, help_: str, common: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if common:
            _common(p)
        return p

    def json_flag(p: argparse.ArgumentParser, what: str = "the status after it as JSON") -> None:
        p.add_argument("--json", action="store_true", help=f"print {what}")

    p = cmd("start", "start a new run (pipeline_start, round 1); a finished run is archived first")
    p.add_argument("--mode", choices=MODES, help=MODE_HELP)
    json_flag(p)
    p = cmd("tick", "perform one transition (cron-safe: silent on success, 75 if the run is held)")
    p.add_argument("--steps", type=int, default=1, metavar="N", help="up to N transitions (default 1)")
    p = cmd("run", "start a run if none (or continue the interrupted one), then tick until IDLE or ERROR")
    p.add_argument("--mode", choices=MODES, help=MODE_HELP + "; for a run it starts")
    json_flag(p, "the final status as JSON")
    p = cmd("status", "show the run's state (read without the lock): while a stage runs, since "
            "when, the pid holding the run and the stage's last log line")
    json_flag(p, "the whole status view as JSON")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until Ctrl-C: in place on a terminal, "
                   "repeated otherwise (with --json: one JSON object per line)")
    for name, help_ in (("stop", "stop the run (ends a running stage)"),
                        ("pause", "pause: ticks do nothing until resumed"),
                        ("resume", "resume a paused run"),
                        ("train-now", "collect mode: train on what was collected"),
                        ("continue", "a run in ERROR or stopped goes on in its run_id, from the "
                         "stage that failed or was stopped")):
        p = cmd(name, help_ + " (queued for the process holding the run, if one does)")
        json_flag(p, "the result and the status as JSON")
    p = cmd("verify", "strictly check a journal: schema, chain and head, then state.json against it")
    p.add_argument("path", nargs="?", metavar="PATH", help="events.jsonl or a run directory "
                   "(default: the journal in OUT_DIR)")
    json_flag(p, "the report as JSON")
    p = cmd("daemon", "run the loop and serve the local HTTP API (foreground unless --detach)")
    p.add_argument("--host", help="address to bind (default: $HEIDI_HOST or 127.0.0.1)")
    p.add_argument("--port", help="port (default: $HEIDI_PORT or 8080; 0 picks a free one)")
    p.add_argument("--mode", choices=MODES, help="mode of the run the daemon starts, if it starts one")
    p.add_argument("--detach", action="store_true", help="double-fork into the background")
    p.add_argument("--pid-file", metavar="FILE", help="pid file (default with --detach: OUT_DIR/heidi.pid)")
    p.add_argument("--log-file", metavar="FILE", help="the detached daemon's output (default: "
                   "OUT_DIR/daemon.log)")
    p = cmd("generate", "the teacher stage: ask TEACHER_PROVIDER for N samples, appended to FILE "
            "as replies arrive (a rerun skips ids already there)")
    p.add_argument("--samples", type=int, metavar="N",
                   help="samples wanted in FILE (default: $SAMPLES_PER_ROUND)")
    p.add_argument("--output", required=True, metavar="FILE", help="JSONL file to append to")
    p.add_argument("--prompts", metavar="FILE", help="JSONL with instruction (+ input) or one prompt "
                   "per line, cycled to N (default: built-in code tasks)")
    p.add_argument("--round", type=int, metavar="R",
                   help="round, part of each sample id (default: $HEIDI_ROUND or 1)")
    p.add_argument("--seed", type=int, metavar="S",
                   help="seed of the built-in tasks and ids (default: $SEED)")
    p = cmd("doctor", "check this box for heidi: compiled modules, glibc, stage containment, free "
            "disk in OUT_DIR, the lock holder, a daemon, the open-files limit (exit 1: one line "
            "per problem)")
    p = cmd("redact", "copy FILE (or stdin) to stdout with secrets redacted", common=False)
    p.add_argument("file", nargs="?", metavar="FILE", help="the file to read (default, or -: stdin)")
    p = cmd("version", "print the version", common=False)
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also tell, per heidi/_fast module, compiled or pure-Python, and the "
                   "stages' containment")
    json_flag(p, "all of it as JSON")
    p = cmd("init", "write a runnable example pipeline (heidi.toml + scripts/) into DIR", common=False)
    p.add_argument("dir", nargs="?", default=".", metavar="DIR", help="where (default: here)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser
