"""The `heidi` command line: parse, call heidi.core / heidi.machine, print, exit.

Exit codes (design.md §9): 0 ok, 1 run failed / verification failed / action refused,
2 bad usage or configuration, 75 another process holds the run, 128+N a signal N ended the
process (the run stays interrupted: the next run, tick or daemon continues it).
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

if TYPE_CHECKING:
    import argparse

    from .config import Config

from ._version import __version__
from .errors import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, HeidiError, RunLocked

MODES = ("full", "collect")  # heidi.config.MODES; the CLI parses before loading the config


class _LazyCore:
    """heidi.core (and with it the config and the machine) loads only for commands that use it."""

    def __getattr__(self, name: str) -> Any:
        from . import core as module
        return getattr(module, name)


core = _LazyCore()


def _parser_class() -> type:
    import argparse  # ~10 ms of start-up: only for what the fast path below does not parse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # one line, exit 2
            raise _UsageExit(f"{self.prog}: {message}")

    return _Parser


class _UsageExit(Exception):
    pass


# The commands cron and scripts run most, with the flags they take: parsed by hand, so that
# `heidi status` and `heidi tick` start without argparse. Anything else (help, an abbreviated or
# unknown flag, a bad value) goes to argparse, which parses or refuses it as it always has.
_FAST: dict[str, dict[str, Any]] = {"status": {"--out-dir": None, "--config": None, "--json": False},
         "tick": {"--out-dir": None, "--config": None, "--steps": 1}}


def _fast_parse(argv: Sequence[str]) -> SimpleNamespace | None:
    if not argv or argv[0] not in _FAST:
        return None
    flags = _FAST[argv[0]]
    values = dict(flags)
    i = 1
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name not in flags:
            return None
        if flags[name] is False:  # a switch
            if eq:
                return None
            values[name] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "--steps":
            if not value.lstrip("-").isdigit():
                return None
            values[name] = int(value)
        else:
            values[name] = value
    return SimpleNamespace(command=argv[0], **{k[2:].replace("-", "_"): v for k, v in values.items()})


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", metavar="DIR", help="the run's directory (default: $OUT_DIR or "
                   "~/.local/heidi_engine)")
    p.add_argument("--config", metavar="FILE",
                   help="heidi.toml to read (default: $HEIDI_CONFIG or ./heidi.toml)")


def build_parser() -> "argparse.ArgumentParser":
    _Parser = _parser_class()
    parser = _Parser(prog="heidi", description="Drive teacher -> validate -> test gate -> train -> "
                     "eval loops, one journaled transition at a time.")
    parser.add_argument("-V", "--version", action="version", version=f"heidi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        return p

    p = cmd("start", "start a new run (pipeline_start, round 1)")
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--json", action="store_true")
    p = cmd("tick", "perform one transition (cron-safe: silent on success, 75 if the run is held)")
    p.add_argument("--steps", type=int, default=1, metavar="N", help="up to N transitions (default 1)")
    p = cmd("run", "start a run if none (or continue the interrupted one), then tick until IDLE or ERROR")
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--json", action="store_true", help="print the final status as JSON")
    p = cmd("status", "show the run's state (read without the lock)")
    p.add_argument("--json", action="store_true")
    for name, help_ in (("stop", "stop the run (ends a running stage)"),
                        ("pause", "pause: ticks do nothing until resumed"),
                        ("resume", "resume a paused run"),
                        ("train-now", "collect mode: train on what was collected"),
                        ("continue", "a run in ERROR or stopped goes on in its run_id, from the "
                         "stage that failed or was stopped")):
        p = cmd(name, help_)
        p.add_argument("--json", action="store_true")
    p = cmd("verify", "strictly check a journal: schema, chain and head")
    p.add_argument("path", nargs="?", metavar="PATH", help="events.jsonl or a run directory")
    p.add_argument("--json", action="store_true")
    p = cmd("daemon", "run the loop and serve the local HTTP API (foreground unless --detach)")
    p.add_argument("--host", help="address to bind (default: $HEIDI_HOST or 127.0.0.1)")
    p.add_argument("--port", help="port (default: $HEIDI_PORT or 8080; 0 picks a free one)")
    p.add_argument("--mode", choices=MODES, help="mode of the run the daemon starts, if it starts one")
    p.add_argument("--detach", action="store_true", help="double-fork into the background")
    p.add_argument("--pid-file", metavar="FILE", help="pid file (default with --detach: OUT_DIR/heidi.pid)")
    p.add_argument("--log-file", metavar="FILE", help="with --detach (default: OUT_DIR/daemon.log)")
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
    p = sub.add_parser("redact", help="copy FILE (or stdin) to stdout with secrets redacted")
    p.add_argument("file", nargs="?", metavar="FILE")
    p = sub.add_parser("version", help="print the version")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also tell, per heidi/_fast module, compiled or pure-Python")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("init", help="write a runnable example pipeline (heidi.toml + scripts/) into DIR")
    p.add_argument("dir", nargs="?", default=".", metavar="DIR")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def _config(args: argparse.Namespace, **extra: Any) -> "Config":
    from .config import Config
    overrides = {"OUT_DIR": getattr(args, "out_dir", None), **extra}
    return Config.load(getattr(args, "config", None), overrides=overrides)


def _print_json(obj: Any) -> None:
    import json  # not orjson: `heidi status --json` starts faster without it
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _status_line(view: dict[str, Any]) -> str:
    if view.get("run_id") is None:
        return f"no run in {view['out_dir']}"
    line = (f"run {view['run_id']}: {view['status']}, state {view['state']}, "
            f"round {view['round']}/{view['rounds']}, mode {view['mode']}")
    if view.get("stage") and view["state"] not in ("IDLE",):
        line += f", stage {view['stage']}"
    if view.get("pending_requests"):
        line += f", pending: {' '.join(view['pending_requests'])}"
    if view.get("last_error") and view["state"] == "ERROR":
        line += f"; error: {view['last_error']}"
    if view.get("interrupted"):
        line += (f"; no heidi process holds it: the next `heidi run`, tick or daemon runs "
                 f"{view.get('stage') or 'the stage'} again")
    return line


WAY_OUT = "`heidi continue` runs it again in the same run, `heidi start` begins a new run"


def _failed_line(view: dict[str, Any]) -> str:
    return (f"run {view['run_id']} failed in {view.get('stage') or 'pipeline'}: "
            f"{view.get('last_error')}; {WAY_OUT}")


def _exit_for(view: dict[str, Any]) -> int:
    return EXIT_FAILED if view.get("state") == "ERROR" else EXIT_OK


def cmd_start(args: argparse.Namespace) -> int:
    view = core.start(_config(args), args.mode)
    _print_json(view) if args.json else print(f"started {_status_line(view)}")
    return EXIT_OK


def cmd_tick(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise _UsageExit(f"heidi tick: --steps {args.steps}: must be 1 or more")
    view = core.tick(_config(args), args.steps)
    if view["state"] == "ERROR":
        print(f"heidi: {_failed_line(view)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


class _Progress:
    """One live line on a terminal; nothing when stdout is not a TTY."""

    def __init__(self) -> None:
        self.enabled = sys.stdout.isatty()
        self.width = 0

    def __call__(self, view: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = (f"[round {view['round']}/{view['rounds']}] {view['state']}"
                + (f" ({view['stage']})" if view.get("stage") else "")
                + (" paused" if view.get("paused") else ""))
        sys.stdout.write("\r" + text.ljust(self.width))
        sys.stdout.flush()
        self.width = len(text)

    def done(self) -> None:
        if self.enabled and self.width:
            sys.stdout.write("\n")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    progress = _Progress()
    try:
        view = core.run(cfg, args.mode, on_progress=progress)
    finally:
        progress.done()
    if args.json:
        _print_json(view)
    elif view.get("already_completed"):
        where = f" (archived in {view['archived']})" if view.get("archived") else ""
        print(f"run {view['run_id']} already completed{where}: {view['round']}/{view['rounds']} "
              "rounds; nothing to do")
    elif view["state"] == "ERROR":
        print(f"heidi: {_failed_line(view)}", file=sys.stderr)
    elif sys.stdout.isatty():
        print(_status_line(view))
    return _exit_for(view)


def cmd_status(args: argparse.Namespace) -> int:
    view = core.status(_config(args))
    if args.json:
        _print_json(view)
    else:
        # One line still (scripts read it): which containment the stages have, at its end.
        print(f"{_status_line(view)}; containment: {view['containment']}")
    return _exit_for(view)


def cmd_action(args: argparse.Namespace) -> int:
    action = args.command.replace("-", "_")
    how, view = core.control_action(_config(args), action)
    if args.json:
        _print_json({"action": action, "result": how, **view})
    elif how == "queued":
        holder = view.get("holder_pid")
        print(f"{args.command} requested; the process holding the run"
              f"{f' (pid {holder})' if holder and holder > 0 else ''} applies it at its next step")
    else:
        print(f"{core.ACTION_DONE[action]}: {_status_line(view)}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .journal import verify_run
    cfg = None
    path = args.path
    if path is None:
        cfg = _config(args)
        path = cfg.journal_path
    elif os.path.isdir(path):
        path = os.path.join(path, "events.jsonl")
    if not os.path.isfile(path):
        raise _UsageExit(f"heidi verify: {path}: no such journal")
    from .errors import StateError
    from .journal import JournalError
    from .machine import check_state_file
    try:
        from .config import Config
        count, head, run_id = verify_run(cfg or Config(), path)
    except JournalError as exc:
        if args.json:
            _print_json({"ok": False, "line": exc.line_no, "reason": exc.reason, "path": path})
        else:
            print(f"line {exc.line_no}: {exc.reason}")
        return EXIT_FAILED
    try:
        state, note = check_state_file(path)
    except StateError as exc:
        if args.json:
            _print_json({"ok": False, "events": count, "head": head, "run_id": run_id,
                         "path": path, "state": "disagrees", "reason": str(exc)})
        else:
            print(str(exc))
        return EXIT_FAILED
    if args.json:
        _print_json({"ok": True, "events": count, "head": head, "run_id": run_id, "path": path,
                     "state": state})
    else:
        print(f"OK: {count} events, head {(head or '')[:12]}")
        if state == "behind":
            print(note)
    return EXIT_OK


def cmd_redact(args: argparse.Namespace) -> int:
    from ._fast.redact import default_redactor, redact_lines
    redact = default_redactor().redact
    if args.file is None or args.file == "-":
        src = sys.stdin
    else:
        try:
            src = open(args.file, encoding="utf-8", errors="replace", newline="")
        except OSError as exc:
            raise _UsageExit(f"heidi redact: {args.file}: {exc.strerror}") from None
    out = sys.stdout
    try:
        for line in redact_lines(src, redact):
            out.write(line)
        out.flush()
    finally:
        if src is not sys.stdin:
            src.close()
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    from ._fast import implementations, no_extensions
    info: dict[str, Any] = {"version": __version__, "python": sys.version.split()[0],
            "frozen": bool(getattr(sys, "frozen", False)), "no_extensions": no_extensions()}
    if args.verbose or args.json:
        from ._fast.supervise import containment
        info["modules"] = implementations()
        info["containment"] = containment().describe()
    if args.json:
        _print_json(info)
        return EXIT_OK
    print(f"heidi {__version__}")
    if args.verbose:
        print(f"python {info['python']}{' (frozen)' if info['frozen'] else ''}")
        if info["no_extensions"]:
            print("HEIDI_NO_EXTENSIONS is set: the pure-Python twins are used")
        for name, kind in info["modules"].items():
            print(f"heidi._fast.{name}: {kind}")
        print(f"containment: {info['containment']}")
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    from .daemon import run_daemon  # http.server only when serving
    cfg = _config(args, HEIDI_HOST=args.host, HEIDI_PORT=args.port)
    return run_daemon(cfg, args.mode, detach=args.detach, pid_file=args.pid_file,
                      log_file=args.log_file)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import run_generate
    cfg = _config(args)
    samples = cfg.samples_per_round if args.samples is None else args.samples
    round_ = args.round if args.round is not None else int(os.environ.get("HEIDI_ROUND") or 1)
    for flag, value in (("--samples", samples), ("--round", round_)):
        if value < 1:
            raise _UsageExit(f"heidi generate: {flag} {value}: must be 1 or more")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise _UsageExit(f"heidi generate: --seed {args.seed}: must be from 0 to 4294967295")
    run_generate(cfg, samples, args.output, args.prompts, round_, args.seed)
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from .example import write_example
    written = write_example(args.dir, force=args.force)
    print(f"wrote {len(written)} files into {os.path.abspath(args.dir)}; "
          f"run it with: cd {args.dir} && heidi run")
    return EXIT_OK


COMMANDS = {"start": cmd_start, "tick": cmd_tick, "run": cmd_run, "status": cmd_status,
            "stop": cmd_action, "pause": cmd_action, "resume": cmd_action, "train-now": cmd_action,
            "continue": cmd_action,
            "verify": cmd_verify, "redact": cmd_redact, "version": cmd_version, "init": cmd_init,
            "daemon": cmd_daemon, "generate": cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    if getattr(sys, "frozen", False):
        from .bootloader import die_with_bootloader
        die_with_bootloader()
    args: Any = None
    try:
        args = _fast_parse(sys.argv[1:] if argv is None else list(argv))
        if args is None:
            parser = build_parser()
            args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except _UsageExit as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except RunLocked as exc:
        # cron-friendly: a tick that finds the run held is silent (design.md §9)
        if getattr(args, "command", None) != "tick":
            print(f"heidi: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except HeidiError as exc:
        print(f"heidi: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("heidi: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_FAILED
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"heidi:{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
