"""Running one real stage: governor, argv from the template, clean child environment, the
FINALIZING split, supervision with a redacted log, and the usage sampled from /proc around it.
"""
from __future__ import annotations

import itertools
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from ._fast import procstat
from ._fast.redact import Redactor, env_name_is_secret
from ._fast.redact import redact as default_redact
from ._fast.supervise import run_supervised
from .config import PLACEHOLDER_RE
from .counters import ENV_NAME as COUNTERS_ENV
from .counters import counters_path, read_counters
from .counters import prepare as prepare_counters
from .errors import one_line
from .loop import StageContext, StageOutcome
from .split import split_file
from .stagelog import StageLog, makedirs_private
from .waiting import is_disk_full

if TYPE_CHECKING:
    from .config import Config

THROTTLE_EVENT_EVERY_S = 300.0   # one pipeline_throttled event per 5 minutes of waiting
GOVERNOR_SAMPLE_S = 0.25
OUTPUT_TAIL_CHARS = 2000


def heidi_argv() -> list[str]:
    """The argv prefix that runs this heidi: the frozen binary itself, or `python -m heidi`."""
    return [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "heidi"]


def placeholders(cfg: "Config", round_: int) -> dict[str, str]:
    return {"python": cfg.python, "heidi": shlex.join(heidi_argv()),
            "scripts_dir": cfg.scripts_dir, "repo_root": cfg.repo_root, "out_dir": cfg.out_dir,
            "data_dir": cfg.data_dir, "eval_dir": cfg.eval_dir,
            "logs_dir": cfg.logs_dir, "round": str(round_), "samples": str(cfg.samples_per_round),
            "run_id": "", "seed": str(cfg.seed), "base_model": cfg.base_model,
            "teacher_model": cfg.teacher_model}


def build_argv(template: list[str], values: dict[str, str]) -> list[str]:
    """Fill an argv template; an argument that is exactly {python} may expand to several words
    (HEIDI_PYTHON="uv run python"), and so does {heidi}."""
    argv: list[str] = []
    for arg in template:
        if arg in ("{python}", "{heidi}"):
            argv.extend(shlex.split(values[arg[1:-1]]))
            continue
        argv.append(PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], arg))
    return argv


def heidi_secret(name: str) -> bool:
    """True for heidi's own secrets (HEIDI_API_TOKEN, ...): HEIDI_* names that look secret.
    The teacher's keys (TEACHER_API_KEY, OPENAI_API_KEY, ...) are a stage's: `heidi generate`."""
    return name.upper().startswith("HEIDI_") and env_name_is_secret(name)


def child_env(cfg: "Config", stage: str, round_: int, run_id: str,
              extra: dict[str, str]) -> dict[str, str]:
    """The user's environment (stages need their keys) but heidi's own secrets, plus the run's
    settings and identity, plus the stage's `env`.

    heidi's secrets (HEIDI_API_TOKEN) reach a stage only when its `env` names them: with a value,
    or as "${NAME}" (its own name) to pass heidi's value on. A frozen heidi runs with
    PyInstaller's LD_LIBRARY_PATH; the child gets the original back so a training job never loads
    heidi's bundled libraries.
    """
    env = {name: value for name, value in os.environ.items() if not heidi_secret(name)}
    if getattr(sys, "frozen", False):
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is not None:
            env["LD_LIBRARY_PATH"] = original
        else:
            env.pop("LD_LIBRARY_PATH", None)
    env.update(cfg.stage_env())
    env.update({"HEIDI_RUN_ID": run_id, "HEIDI_ROUND": str(round_), "HEIDI_STAGE": stage,
                "HEIDI_OUT_DIR": cfg.out_dir})
    for name, value in extra.items():
        if value == "${" + name + "}" and heidi_secret(name):
            inherited = os.environ.get(name)
            if inherited is None and name == "HEIDI_API_TOKEN":
                inherited = cfg.api_token  # set in heidi.toml rather than the environment
            if inherited is not None:
                env[name] = inherited
        else:
            env[name] = value
    env[COUNTERS_ENV] = counters_path(cfg.logs_dir, round_, stage)  # heidi's, whatever `extra` says
    return env


def _topmost_missing(path: str, root: str) -> str | None:
    """The highest directory on the way from root to path that does not exist yet (None: path
    exists). Only below root."""
    top = None
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path or os.path.commonpath([parent, root]) != root:
            break
        top, path = path, parent
    return top


def stage_paths(cfg: "Config", stage: str, round_: int, run_id: str = "") -> tuple[list[str], list[str]]:
    """(directories to make before the stage, what the run owns by running it, relative to
    OUT_DIR). Owned: the topmost directory heidi is about to create for the round (data/,
    eval/, logs/round_R; "logs" itself when there is no logs/ yet), and the files heidi and the
    stage write -- its log, the train/val split, every --output of its command -- unless inside
    one of those new directories. Only paths inside OUT_DIR; the archive moves exactly these."""
    out = cfg.out_dir
    make = [cfg.data_dir, cfg.eval_dir, os.path.join(cfg.logs_dir, f"round_{round_}")]
    new_dirs = [top for top in (_topmost_missing(p, out) for p in make) if top is not None]
    files = [os.path.join(cfg.logs_dir, f"round_{round_}", f"{stage}.log")]
    if stage == "train":
        files += [os.path.join(cfg.data_dir, f"{kind}_round_{round_}.jsonl") for kind in ("train", "val")]
    values = placeholders(cfg, round_)
    values["run_id"] = run_id
    try:
        files += _outputs(build_argv(cfg.stages[stage].command, values), out)
    except (KeyError, ValueError):
        pass  # a command that cannot be built fails in the stage itself, with its own message
    owned: list[str] = []
    for path in dict.fromkeys(new_dirs + files):
        rel = os.path.relpath(os.path.abspath(path), out)
        if rel == "." or rel.split(os.sep, 1)[0] == "..":
            continue  # outside OUT_DIR: not the run's to move
        if any(rel.startswith(os.path.relpath(d, out) + os.sep) for d in new_dirs):
            continue  # inside a directory the run owns whole
        owned.append(rel)
    return make, owned


def split_round(cfg: "Config", round_: int) -> tuple[str, str, int, int]:
    """FINALIZING's split of the round's data into train/val files, deterministic for SEED.

    VAL_RATIO of the lines go to val (at least one when there are two or more); the two files are
    disjoint and together the whole input. Returns (train path, val path, n_train, n_val).
    """
    name = "tested" if cfg.run_unit_tests else "clean"
    source = os.path.join(cfg.data_dir, f"{name}_round_{round_}.jsonl")
    train_path = os.path.join(cfg.data_dir, f"train_round_{round_}.jsonl")
    val_path = os.path.join(cfg.data_dir, f"val_round_{round_}.jsonl")
    try:
        n_train, n_val = split_file(source, train_path, val_path, cfg.val_ratio,
                                    cfg.seed * 1_000_003 + round_, fsync=cfg.fsync)
    except FileNotFoundError:
        raise ValueError(f"no data to train on: {source} is missing") from None
    return train_path, val_path, n_train, n_val


def _system_busy(cfg: "Config", sampler: Any) -> str | None:
    """Why the system is too busy to start a stage, or None."""
    reasons = []
    if cfg.max_mem_pct < 100.0:
        snap = sampler.sample()
        used = sampler.mem_used_pct(snap)
        if used > cfg.max_mem_pct:
            reasons.append(f"memory {used:.0f}% > MAX_MEM_PCT {cfg.max_mem_pct:g}%")
    if cfg.max_cpu_pct < 100.0:
        before = sampler.sample()
        time.sleep(GOVERNOR_SAMPLE_S)
        cpu = sampler.system_cpu_pct(before, sampler.sample())
        if cpu > cfg.max_cpu_pct:
            reasons.append(f"CPU {cpu:.0f}% > MAX_CPU_PCT {cfg.max_cpu_pct:g}%")
    return "; ".join(reasons) or None


def govern(ctx: StageContext, stage: str, sampler: Any) -> StageOutcome | None:
    """Hold the stage while the system is over its CPU/memory limits (design.md §6).

    Returns None when the stage may start, or the outcome that ends it (stopped, or failed after
    MAX_WALL_TIME_MINUTES of waiting).
    """
    cfg = ctx.config
    if cfg.max_cpu_pct >= 100.0 and cfg.max_mem_pct >= 100.0:
        return None
    started = time.monotonic()
    last_event = None
    limit_s = cfg.max_wall_time_minutes * 60.0
    while True:
        reason = _system_busy(cfg, sampler)
        if reason is None:
            return None
        # The hold is journaled first: a stage held at all says so before it can fail, however
        # small MAX_WALL_TIME_MINUTES is (one CPU sample may already outlast it).
        if last_event is None or time.monotonic() - last_event >= THROTTLE_EVENT_EVERY_S:
            ctx.warn("pipeline_throttled", f"holding {stage}: {reason}")
            last_event = time.monotonic()
        waited = time.monotonic() - started
        if waited >= limit_s:
            return StageOutcome(ok=False, error=f"system stayed busy for {cfg.max_wall_time_minutes:g} "
                                f"min (MAX_WALL_TIME_MINUTES): {reason}",
                                output_tail=f"governor gave up waiting: {reason}")
        if ctx.stop_requested():
            return StageOutcome(ok=False, stopped=True, error="stopped")
        time.sleep(min(1.0, max(0.05, limit_s - waited)))


def run_stage(ctx: StageContext, stage: str, round_: int) -> StageOutcome:
    """Run one stage for real and describe how it went; never raises for a stage's own failure."""
    with procstat.Sampler() as sampler:
        return _run_stage(ctx, stage, round_, sampler)


def _run_stage(ctx: StageContext, stage: str, round_: int, sampler: Any) -> StageOutcome:
    cfg = ctx.config
    held = govern(ctx, stage, sampler)
    if held is not None:
        return held
    for path in (cfg.data_dir, cfg.eval_dir, os.path.join(cfg.logs_dir, f"round_{round_}")):
        makedirs_private(path)
    counters: dict[str, int] = {}
    if stage == "train":
        try:
            _, _, n_train, n_val = split_round(cfg, round_)
        except OSError as exc:
            if is_disk_full(exc):
                raise  # a wait (the daemon runs the split again once there is space), not a failure
            # Redacted before it is cut: a cut secret would no longer match its pattern.
            line = default_redact(one_line(exc))
            return StageOutcome(ok=False, error=line[:200], output_tail=line)
        except ValueError as exc:
            message = default_redact(str(exc))
            return StageOutcome(ok=False, error=message[:200], output_tail=message)
        counters = {"train_samples": n_train, "val_samples": n_val}
    stage_cfg = cfg.stages[stage]
    values = placeholders(cfg, round_)
    values["run_id"] = ctx.run_id
    argv = build_argv(stage_cfg.command, values)
    env = child_env(cfg, stage, round_, values["run_id"], stage_cfg.env)
    # heidi's environment and the stage's own (heidi.toml's [stages.X] env included) decide which
    # values are secrets: a key handed only to this stage, and heidi's own token that the stage
    # does not get, are both kept out of its log.
    secrets_env = {**os.environ, **env}
    if cfg.api_token:
        secrets_env.setdefault("HEIDI_API_TOKEN", cfg.api_token)
    redactor = Redactor(env=secrets_env)
    log = StageLog(os.path.join(cfg.logs_dir, f"round_{round_}", f"{stage}.log"), redactor.redact)
    prepare_counters(env[COUNTERS_ENV])
    before = sampler.sample()
    try:
        result = run_supervised(argv, cwd=cfg.out_dir, env=env, timeout_s=stage_cfg.timeout_s,
                                grace_s=cfg.kill_grace_s, on_output=log.write,
                                should_stop=ctx.stop_requested)
    finally:
        log.close()
    if log.error is not None:
        # The stage's own log could not be written (a full disk): the stage went on, its tail is
        # kept in memory; say so in the journal (the outcome follows, once there is space).
        ctx.warn("stage_log_failed", f"{log.error}; the rest of {stage}'s output was not logged")
    after = sampler.sample()
    wall_s = max(result.wall_ms / 1000.0, 1e-6)
    usage = {
        "memory_mb_delta": round(
            (sampler.mem_available_kb(before) - sampler.mem_available_kb(after)) / 1024.0, 3),
        "cpu_pct": round(100.0 * (result.cpu_user_s + result.cpu_sys_s) / wall_s, 2),
        "system_mem_available_kb_delta": sampler.mem_available_kb(after) - sampler.mem_available_kb(before),
        "system_cpu_pct": round(sampler.system_cpu_pct(before, after), 2),
        "wall_ms": round(result.wall_ms, 3),
        "peak_rss_kb": int(result.peak_rss_kb),
        "cpu_user_s": round(result.cpu_user_s, 3),
        "cpu_sys_s": round(result.cpu_sys_s, 3),
        "output_bytes": int(result.output_bytes),
    }
    tail = log.tail(OUTPUT_TAIL_CHARS)
    if result.spawn_error:
        tail = redactor.redact(result.spawn_error)
    artifacts = [os.path.relpath(p, cfg.out_dir) for p in _outputs(argv, cfg.out_dir)
                 if os.path.exists(p)] if result.ok else []
    if result.ok:
        reported, problem = read_counters(env[COUNTERS_ENV])
        if problem is not None:
            ctx.warn("counters_invalid", problem)
        counters = {**reported, **counters}
    return StageOutcome(ok=result.ok, usage_delta=usage, counters_delta=counters,
                        artifact_paths=artifacts, error=None if result.ok else result.describe(),
                        output_tail=tail, stopped=result.stopped)


def _outputs(argv: list[str], out_dir: str) -> list[str]:
    """The paths a stage was asked to write (the argument after --output)."""
    paths = []
    for flag, value in itertools.pairwise(argv):
        if flag == "--output":
            paths.append(value if os.path.isabs(value) else os.path.join(out_dir, value))
    return paths
