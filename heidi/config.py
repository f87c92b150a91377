"""Settings of a run: environment variables over an optional heidi.toml over defaults.

Every value is checked at start-up; a bad one raises ConfigError with one line naming the
variable, the value and what is allowed (the CLI turns it into exit code 2).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
# the table and its parsers live in settings; named here too, so `config.SETTINGS` still works
from .settings import (EXECUTORS, MODES, PROVIDERS, RUN_ID_RE, SETTINGS, STAGES,  # noqa: F401
                       TOKEN_MIN_LEN, float_in, one_of)

SECRET_SETTINGS = ("TEACHER_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")

# Default stage timeouts fit ML work: training runs for hours, not minutes.
DEFAULT_TIMEOUTS_S = {"generate": 4 * 3600.0, "validate": 3600.0, "test": 2 * 3600.0,
                      "train": 48 * 3600.0, "eval": 4 * 3600.0}

DEFAULT_COMMANDS = {
    "generate": ["{python}", "{scripts_dir}/01_teacher_generate.py", "--samples", "{samples}",
                 "--output", "{data_dir}/raw_round_{round}.jsonl", "--round", "{round}"],
    "validate": ["{python}", "{scripts_dir}/02_validate_clean.py",
                 "--input", "{data_dir}/raw_round_{round}.jsonl",
                 "--output", "{data_dir}/clean_round_{round}.jsonl"],
    "test": ["{python}", "{scripts_dir}/03_unit_test_gate.py",
             "--input", "{data_dir}/clean_round_{round}.jsonl",
             "--output", "{data_dir}/tested_round_{round}.jsonl"],
    "train": ["{python}", "{scripts_dir}/04_train_qlora.py",
              "--data", "{data_dir}/train_round_{round}.jsonl",
              "--val-data", "{data_dir}/val_round_{round}.jsonl",
              "--output", "{out_dir}/out_lora_round_{round}"],
    "eval": ["{python}", "{scripts_dir}/05_eval.py",
             "--adapter", "{out_dir}/out_lora_round_{round}/final",
             "--data", "{data_dir}/val_round_{round}.jsonl",
             "--output", "{eval_dir}/report_round_{round}.json"],
}
# A placeholder is {lower_case_name}; shell syntax such as ${HOME} or ${X:-y} is left alone.
PLACEHOLDER_RE = re.compile(r"(?<!\$)\{([a-z_][a-z0-9_]*)\}")
PLACEHOLDERS = ("python", "heidi", "scripts_dir", "repo_root", "out_dir", "data_dir", "eval_dir", "logs_dir",
                "round", "samples", "run_id", "seed", "base_model", "teacher_model")


@dataclass
class StageConfig:
    """How one stage runs: an argv template, a timeout and extra environment."""

    name: str
    command: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    executor: str = "local"          # "slurm": the stage runs as a Slurm job (heidi.slurm_stage)
    slurm_args: list[str] = field(default_factory=list)  # more sbatch options


@dataclass
class Config:
    """All settings of a run, validated. Build it with Config.load()."""

    run_id: str | None = None
    out_dir: str = ""
    repo_root: str = ""
    mode: str = "full"
    rounds: int = 3
    samples_per_round: int = 50
    val_ratio: float = 0.1
    run_unit_tests: bool = False
    mock_subprocesses: bool = False
    max_wall_time_minutes: float = 60.0
    max_cpu_pct: float = 95.0
    max_mem_pct: float = 90.0
    base_model: str = "microsoft/phi-2"
    teacher_model: str = "gpt-4o-mini"
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 8
    train_steps: int = 500
    lora_r: int = 64
    lora_alpha: int = 128
    lr: float = 2e-4
    seed: int = 42
    python: str = "python3"
    fsync: bool = True
    stage_timeout_s: float | None = None
    kill_grace_s: float = 5.0
    executor: str = "local"
    slurm_poll_s: float = 1.0
    max_fds: int | None = None
    max_cpu_s: int | None = None
    max_memory_mb: int | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_token: str | None = None
    api_request_timeout_s: float = 10.0
    teacher_provider: str = "mock"
    teacher_base_url: str | None = None
    teacher_allow_http: bool = False
    teacher_concurrency: int = 16
    teacher_timeout_s: float = 120.0
    teacher_max_retries: int = 6
    teacher_max_requests: int | None = None
    teacher_max_tokens: int | None = None
    teacher_rpm: float | None = None
    teacher_tpm: float | None = None
    teacher_temperature: float | None = None
    teacher_max_output_tokens: int | None = None
    teacher_mock_delay_ms: float = 100.0
    config_path: str | None = None
    stages: dict[str, StageConfig] = field(default_factory=dict)
    explicit: frozenset = frozenset()

    @classmethod
    def load(cls, config_path: str | None = None, environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> "Config":
        """Defaults, then heidi.toml (config_path, HEIDI_CONFIG or ./heidi.toml), then the
        environment, then overrides (CLI flags, keyed by variable name)."""
        env = os.environ if environ is None else environ
        path = config_path or env.get("HEIDI_CONFIG") or None
        if path is None and os.path.isfile("heidi.toml"):
            path = "heidi.toml"
        file_values: dict[str, Any] = {}
        stage_tables: dict[str, Any] = {}
        if path is not None:
            file_values, stage_tables = _read_toml(path)
            # Relative paths in heidi.toml are relative to the file, not to the caller's cwd.
            base = os.path.dirname(os.path.abspath(path))
            for name in ("OUT_DIR", "HEIDI_REPO_ROOT"):
                value = file_values.get(name)
                if isinstance(value, str) and value.strip() and not os.path.isabs(
                        os.path.expanduser(value.strip())):
                    file_values[name] = os.path.join(base, value.strip())
        values: dict[str, Any] = {}
        explicit = set()
        for name, (attr, parse, default) in SETTINGS.items():
            raw, source = default, None
            if name in file_values:
                raw, source = file_values[name], "file"
            if name in env:
                raw, source = env[name], "env"
            if overrides and overrides.get(name) is not None:
                raw, source = overrides[name], "flag"
            if source is not None:
                explicit.add(name)
            try:
                values[attr] = parse(name, raw) if raw is not None else None
            except ConfigError as exc:
                if source == "file":  # say where to fix it
                    raise ConfigError(f"{exc} (set in {path})") from None
                raise
        if values["repo_root"] is None:
            base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
            values["repo_root"] = base
        cfg = cls(**values, config_path=os.path.abspath(path) if path else None,
                  explicit=frozenset(explicit))
        cfg.stages = _stage_configs(stage_tables, cfg.stage_timeout_s, cfg.executor)
        if not cfg.mock_subprocesses and any(s.executor == "slurm" for s in cfg.stages.values()):
            from .slurm import available
            problem = available()
            if problem is not None:
                raise ConfigError(problem)
        if cfg.teacher_base_url is not None:
            from .providers import check_base_url
            problem = check_base_url(cfg.teacher_base_url, cfg.teacher_allow_http)
            if problem is not None:
                raise ConfigError(f"TEACHER_BASE_URL={cfg.teacher_base_url!r}: {problem}")
        return cfg

    # Paths of the run, all under OUT_DIR (design.md §3).
    @property
    def journal_path(self) -> str:
        return os.path.join(self.out_dir, "events.jsonl")

    @property
    def state_path(self) -> str:
        return os.path.join(self.out_dir, "state.json")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.out_dir, "heidi.lock")

    @property
    def control_dir(self) -> str:
        return os.path.join(self.out_dir, "control")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.out_dir, "logs")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out_dir, "data")

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.out_dir, "eval")

    @property
    def scripts_dir(self) -> str:
        return os.path.join(self.repo_root, "scripts")

    def stage_env(self) -> dict[str, str]:
        """The run's settings as environment variables for stage scripts."""
        names = ("ROUNDS", "SAMPLES_PER_ROUND", "VAL_RATIO", "BASE_MODEL", "TEACHER_MODEL",
                 "SEQ_LEN", "BATCH_SIZE", "GRAD_ACCUM", "TRAIN_STEPS", "LORA_R", "LORA_ALPHA",
                 "LR", "SEED", "OUT_DIR", "HEIDI_REPO_ROOT")
        result = {}
        for name in names:
            value = getattr(self, SETTINGS[name][0])
            result[name] = str(int(value) if isinstance(value, bool) else value)
        result["RUN_UNIT_TESTS"] = "1" if self.run_unit_tests else "0"
        # heidi.toml's teacher settings reach a `heidi generate` stage, which runs in OUT_DIR.
        for name, (attr, _, _) in SETTINGS.items():
            value = getattr(self, attr)
            if name.startswith("TEACHER_") and value is not None:
                result[name] = str(int(value) if isinstance(value, bool) else value)
        return result


def _read_toml(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import tomllib  # here: most runs have no heidi.toml, and the CLI's start-up counts
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r}: not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path!r}: invalid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r}: cannot read ({exc.strerror})") from None
    values: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    for key, value in data.items():
        if key == "stages":
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path!r}: [stages] must be a table")
            stages = value
            continue
        name = key.upper()
        if name in SECRET_SETTINGS:
            raise ConfigError(f"config file {path!r}: {key!r}: keys and tokens are read from the "
                              f"environment only (set {name} there)")
        if name not in SETTINGS:
            raise ConfigError(f"config file {path!r}: unknown setting {key!r}")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}={value!r}: must be a single value")
        values[name] = value
    return values, stages


_STAGE_KEYS = ("command", "timeout_s", "env", "executor", "slurm_args")


def _slurm_args(stage: str, args: Any) -> list[str]:
    """[stages.X] slurm_args: more sbatch options, a list of strings; not those heidi sets."""
    from .slurm import RESERVED_OPTIONS
    where = f"[stages.{stage}] slurm_args"
    if not isinstance(args, list) or not all(isinstance(a, str) and a and "\0" not in a
                                             and "\n" not in a for a in args):
        raise ConfigError(f"{where}={args!r}: must be a list of non-empty strings "
                          "(sbatch options, e.g. [\"--partition=gpu\", \"--gres=gpu:1\"])")
    for arg in args:
        option = arg.split("=", 1)[0]
        if option in RESERVED_OPTIONS or any(arg.startswith(o) and len(o) == 2 and len(arg) > 2
                                             for o in RESERVED_OPTIONS):
            raise ConfigError(f"{where}: {arg!r}: heidi sets {option} itself (job name, output, "
                              "working directory, environment); remove it")
    return list(args)


def _stage_configs(tables: Mapping[str, Any], timeout_override: float | None,
                   executor: str = "local") -> dict[str, StageConfig]:
    for name in tables:
        if name not in STAGES:
            raise ConfigError(f"[stages.{name}]: unknown stage; allowed: {', '.join(STAGES)}")
    result = {}
    for name in STAGES:
        table = tables.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[stages.{name}]: must be a table")
        for key in table:
            if key not in _STAGE_KEYS:
                raise ConfigError(f"[stages.{name}] {key!r}: unknown key; allowed: {', '.join(_STAGE_KEYS)}")
        command = table.get("command", DEFAULT_COMMANDS[name])
        if isinstance(command, str):
            command = command.split()
        if (not isinstance(command, list) or not command
                or not all(isinstance(arg, str) for arg in command)):
            raise ConfigError(f"[stages.{name}] command={command!r}: must be a non-empty list of strings")
        for arg in command:
            for ph in PLACEHOLDER_RE.findall(arg):
                if ph not in PLACEHOLDERS:
                    raise ConfigError(f"[stages.{name}] command placeholder {{{ph}}}: unknown; "
                                      f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        timeout = table.get("timeout_s", DEFAULT_TIMEOUTS_S[name])
        timeout = float_in(0.0, 31_536_000.0, lo_open=True)(f"[stages.{name}] timeout_s", timeout)
        if timeout_override is not None:
            timeout = timeout_override
        env = table.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                               for v in env.values()):
            raise ConfigError(f"[stages.{name}] env: must be a table of strings")
        result[name] = StageConfig(name, list(command), timeout, {k: str(v) for k, v in env.items()},
                                   one_of(*EXECUTORS)(f"[stages.{name}] executor",
                                                       table.get("executor", executor)),
                                   _slurm_args(name, table.get("slurm_args", [])))
    return result
