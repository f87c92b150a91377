"""Child programs for tests/test_supervise.py, run as `python helpers_children.py MODE ARGS...`.

Modes:
  tree PIDFILE [exit] [noenv]   a stage that ignores SIGTERM and leaves grandchildren: A (same
                         process group), and C (setsid'd, double-forked so it is reparented, stdio
                         on /dev/null like a real daemon; with "noenv", C execs `sleep` with an
                         empty environment). Writes "main A C" to PIDFILE, prints "ready", then
                         sleeps (or, with "exit", exits 0 at once).
  supervisor IMPL PIDFILE WDFILE [GRACE [noenv]]   a heidi stand-in: writes its watchdog's pid to
                         WDFILE, then runs `tree PIDFILE [noenv]` under run_supervised from
                         heidi._fast._supervise_IMPL; ^C prints "interrupted", exits 130.
  oneshot IMPL           runs /bin/true under run_supervised, prints its watchdog's pid, exits.
  escape MARKER [BUSY_S [MAIN_S]]   a stage whose grandchild escapes at once: fork, setsid, fork
                         again (reparented), exec Python with an empty environment and MARKER
                         in its argv, ignoring SIGTERM; it burns BUSY_S s of CPU and exits, or
                         (BUSY_S 0) sleeps forever. The main process prints "escaped", sleeps
                         MAIN_S (default 60) and exits 0.
  escsupervisor IMPL MARKER   a heidi stand-in for a SIGKILL: runs `sh -c 'echo started
                         $HEIDI_STAGE_TOKEN; exec ... escape MARKER'` under run_supervised,
                         its output passed through to stdout as it comes.
  flood MB               writes MB MiB of 4 KiB lines to stdout.
  memcheck IMPL LOGPATH MB   runs `flood MB` through StageLog(LOGPATH).write and prints the
                         peak-RSS growth of this process in kB and the log size.
"""
from __future__ import annotations

import importlib
import os
import resource
import signal
import sys
import time

HERE = os.path.abspath(__file__)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def tree(pidfile: str, exit_now: bool = False, noenv: bool = False) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by A and C
    pids = [os.getpid()]
    a = os.fork()
    if a == 0:
        time.sleep(60)
        os._exit(0)
    pids.append(a)
    r, w = os.pipe()
    b = os.fork()
    if b == 0:
        os.setsid()
        c = os.fork()
        if c == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            if noenv:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.execve("/bin/sh", ["sh", "-c", "trap '' TERM; exec sleep 60"], {})
            time.sleep(60)
            os._exit(0)
        os._exit(0)  # C is orphaned: reparented to the nearest subreaper
    os.close(w)
    os.waitpid(b, 0)
    pids.append(int(os.read(r, 32)))
    _write_atomic(pidfile, " ".join(map(str, pids)))
    print("ready", flush=True)
    if exit_now:
        os._exit(0)
    time.sleep(60)


def supervisor(impl: str, pidfile: str, wdfile: str, grace_s: str = "30",
               *tree_args: str) -> None:
    mod = importlib.import_module(f"heidi._fast._supervise_{impl}")
    from heidi._fast import _supervise_watchdog
    _write_atomic(wdfile, str(_supervise_watchdog.ensure_started()))
    try:
        mod.run_supervised([sys.executable, HERE, "tree", pidfile, *tree_args], timeout_s=60,
                           grace_s=float(grace_s))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)


def escape(marker: str, busy_s: str = "0", main_s: str = "60") -> None:
    b = os.fork()
    if b == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            end = ("raise SystemExit(0)" if float(busy_s) > 0
                   else "while True: time.sleep(1)")
            code = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    f"t = time.process_time() + {float(busy_s)}\n"
                    "while time.process_time() < t: pass\n" + end)
            os.execve(sys.executable, [sys.executable, "-S", "-c", code, marker], {})
        os._exit(0)
    os.waitpid(b, 0)
    print("escaped", flush=True)
    time.sleep(float(main_s))


def escsupervisor(impl: str, marker: str) -> None:
    mod = importlib.import_module(f"heidi._fast._supervise_{impl}")
    out = sys.stdout.buffer

    def passthrough(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    script = f'echo "started $HEIDI_STAGE_TOKEN"; exec "$0" "$1" escape {marker}'
    mod.run_supervised(["/bin/sh", "-c", script, sys.executable, HERE], timeout_s=60,
                       grace_s=30, on_output=passthrough)


def oneshot(impl: str) -> None:
    mod = importlib.import_module(f"heidi._fast._supervise_{impl}")
    from heidi._fast import _supervise_watchdog
    assert mod.run_supervised(["/bin/true"]).ok
    print(_supervise_watchdog.watchdog_pid(), flush=True)


def flood(mb: int) -> None:
    line = b"x" * 4000 + b" token=SECRET " + b"y" * 81 + b"\n"  # 4096 bytes
    block = line * 256  # 1 MiB
    out = sys.stdout.buffer
    for _ in range(mb):
        out.write(block)
    out.flush()


def memcheck(impl: str, logpath: str, mb: int) -> None:
    mod = importlib.import_module(f"heidi._fast._supervise_{impl}")
    from heidi.stagelog import StageLog
    redact = lambda text: text.replace("SECRET", "[X]")  # noqa: E731
    warm = StageLog(None, redact)
    mod.run_supervised([sys.executable, HERE, "flood", "2"], on_output=warm.write)
    warm.close()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    log = StageLog(logpath, redact)
    result = mod.run_supervised([sys.executable, HERE, "flood", str(mb)], on_output=log.write)
    log.close()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(after - before, os.path.getsize(logpath), result.output_bytes, result.exit_code,
          "SECRET" in log.tail(10000))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "tree":
        tree(args[0], exit_now="exit" in args[1:], noenv="noenv" in args[1:])
    elif mode == "supervisor":
        supervisor(*args)
    elif mode == "escape":
        escape(*args)
    elif mode == "escsupervisor":
        escsupervisor(*args)
    elif mode == "oneshot":
        oneshot(*args)
    elif mode == "flood":
        flood(int(args[0]))
    elif mode == "memcheck":
        memcheck(args[0], args[1], int(args[2]))
    else:
        sys.exit(f"unknown mode {mode!r}")
