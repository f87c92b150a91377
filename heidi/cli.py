"""The `heidi` command line: parse, call heidi.core / heidi.machine, print, exit.

Exit codes (design.md §9): 0 ok, 1 run failed / verification failed / action refused,
2 bad usage or configuration, 75 another process holds the run, 128+N a signal N ended the
process (the run stays interrupted: the next run, tick or daemon continues it).
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import argparse

    from .config import Config

from ._version import __version__
from .cli_parser import MODES, build_parser  # noqa: F401 (MODES: the tests compare it with config's)
from .cli_parser import UsageExit as _UsageExit
from .errors import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, HeidiError, RunLocked


class _LazyCore:
    """heidi.core (and with it the config and the machine) loads only for commands that use it."""

    def __getattr__(self, name: str) -> Any:
        from . import core as module
        return getattr(module, name)


core = _LazyCore()


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


def _config(args: argparse.Namespace, **extra: Any) -> "Config":
    from .config import Config
    overrides = {"OUT_DIR": getattr(args, "out_dir", None), **extra}
    return Config.load(getattr(args, "config", None), overrides=overrides)


def _print_json(obj: Any) -> None:
    import json  # not orjson: `heidi status --json` starts faster without it
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _status_line(view: dict[str, Any]) -> str:
    from .show import status_line
    return status_line(view)


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


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from .show import Progress
    from .status import live_view, read_state, status_view
    progress = Progress(lambda: live_view(status_view(read_state(cfg.state_path), cfg), cfg))
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
    cfg = _config(args)
    _pure_twins_notice()
    from .show import status_text, terminal_width, watch
    interval = getattr(args, "watch", None)
    if interval is not None:
        if not 0.1 <= interval <= 86400:
            raise _UsageExit(f"heidi status: --watch {interval:g}: seconds from 0.1 to 86400")
        def read() -> dict:
            return core.status(cfg)
        try:
            if args.json:
                import json
                import time
                while True:  # one JSON object per line, for a pipe
                    sys.stdout.write(json.dumps(read(), ensure_ascii=False) + "\n")
                    sys.stdout.flush()
                    time.sleep(interval)
            watch(read, interval)
        except KeyboardInterrupt:
            return EXIT_OK  # Ctrl-C is how a watch ends
    from .waiting import daemon_waiting
    view = core.status(cfg)
    # a daemon waiting out a full disk says so over its API (no file of the run can)
    view["waiting"] = daemon_waiting(cfg.out_dir, view.get("holder_pid"), cfg.api_token)
    if args.json:
        _print_json(view)
    else:
        # The first line as always (scripts read it, containment at its end); while a stage runs,
        # lines under it tell since when, who holds the run and the stage's last log line.
        lines = status_text(view, terminal_width())
        if view["waiting"]:
            lines.insert(1, f"waiting: {view['waiting']}")
        if view.get("state_note"):
            lines.insert(1, f"note: {view['state_note']}")
        print("\n".join(lines))
    return _exit_for(view)


def _pure_twins_notice() -> None:
    """One line on stderr when heidi runs its pure-Python twins because the compiled modules are
    missing (a build without a C compiler), not when HEIDI_NO_EXTENSIONS asked for them."""
    from ._fast import atomic, no_extensions  # the module status and every run load anyway
    if no_extensions() or atomic.COMPILED:
        return
    print("heidi: running the pure-Python modules (the compiled ones were not built: no C "
          "compiler?); slower, same results. `heidi doctor` tells more", file=sys.stderr)


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
    from .recovery import check_state_file
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
    _pure_twins_notice()
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
    import shlex

    from .example import write_example
    written = write_example(args.dir, force=args.force)
    here = os.path.realpath(args.dir) == os.path.realpath(os.getcwd())
    print(f"wrote {len(written)} files into {os.path.abspath(args.dir)}; run it with: "
          + ("heidi run" if here else f"cd {shlex.quote(args.dir)} && heidi run"))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import check
    report, problems = check(_config(args))
    for line in report:
        print(line)
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


COMMANDS = {"start": cmd_start, "tick": cmd_tick, "run": cmd_run, "status": cmd_status,
            "stop": cmd_action, "pause": cmd_action, "resume": cmd_action, "train-now": cmd_action,
            "continue": cmd_action,
            "verify": cmd_verify, "redact": cmd_redact, "version": cmd_version, "init": cmd_init,
            "daemon": cmd_daemon, "generate": cmd_generate, "doctor": cmd_doctor}


def main(argv: Sequence[str] | None = None) -> int:
    if getattr(sys, "frozen", False):
        from .bootloader import die_with_bootloader, tidy_unpacked
        die_with_bootloader()
        tidy_unpacked()
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
        from .errors import os_error_line  # one line: the path and what went wrong
        print(f"heidi: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
