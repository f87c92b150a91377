"""GET /metrics: the status view in Prometheus text exposition format 0.0.4."""
from __future__ import annotations

import re
from typing import Any

from .._version import __version__
from ..loop import STATES, usage_rule

# Units in the names, base units in the values (Prometheus' naming rules): a usage key's suffix
# says what it counts, and so how it converts.
_SCALE = (("_ms", "_seconds", 0.001), ("_s", "_seconds", 1.0), ("_kb", "_bytes", 1024.0),
          ("_mb", "_bytes", 1048576.0), ("_bytes", "_bytes", 1.0), ("_pct", "_percent", 1.0))
# The two CPU amounts are one metric with a mode label, as node_exporter has it.
_CPU_MODES = {"cpu_user_s": "user", "cpu_sys_s": "system"}


def _metric_name(key: str) -> tuple[str, float]:
    """(name part with its unit, factor to the base unit) of a usage key: peak_rss_kb ->
    ("peak_rss_bytes", 1024.0), system_mem_available_kb_delta ->
    ("system_mem_available_delta_bytes", 1024.0)."""
    base, delta = (key[:-6], "_delta") if key.endswith("_delta") else (key, "")
    for suffix, unit, factor in _SCALE:
        if base.endswith(suffix):
            return re.sub(r"[^a-zA-Z0-9_]", "_", base[:-len(suffix)]) + delta + unit, factor
    return re.sub(r"[^a-zA-Z0-9_]", "_", key), 1.0


def _usage_metrics(view: dict[str, Any]) -> list[tuple[str, str, str, list[tuple[str, Any]]]]:
    """The run's usage as (name, type, help, samples): sums as `_total` counters, peaks and
    per-stage values (percentages, deltas) as gauges."""
    found: dict[str, tuple[str, str, list[tuple[str, Any]]]] = {}

    def add(name: str, kind: str, help_: str, labels: str, value: Any) -> None:
        found.setdefault(name, (kind, help_, []))[2].append((labels, value))

    for key, value in sorted((view.get("usage") or {}).items()):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        rule = usage_rule(key)
        if key in _CPU_MODES:
            add("heidi_stage_cpu_seconds_total", "counter", "CPU seconds the run's stages used, "
                "summed over stages.", f'{{mode="{_CPU_MODES[key]}"}}', value)
            continue
        name, factor = _metric_name(key)
        if rule == "sum":
            add(f"heidi_stage_{name}_total", "counter", f"{key} of the run's stages, summed "
                "over stages (in base units).", "", value * factor)
        elif rule == "max":
            add(f"heidi_{name}", "gauge", f"{key}: the largest of the run's stages (in base "
                "units).", "", value * factor)
    for stage, delta in sorted((view.get("usage_by_stage") or {}).items()):
        for key, value in sorted((delta or {}).items()):
            if usage_rule(key) != "last" or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            name, factor = _metric_name(key)
            add(f"heidi_stage_{name}", "gauge", f"{key} of the last run of each stage (not "
                "summed: only meaningful per stage).", f'{{stage="{_label(stage)}"}}', value * factor)
    return [(name, kind, help_, samples) for name, (kind, help_, samples) in found.items()]


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return None


def render_metrics(view: dict[str, Any]) -> str:
    """The status view in Prometheus text exposition format 0.0.4."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, Any]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = _number(value)
            if text is not None:
                out.append(f"{name}{labels} {text}")

    has_run = view.get("run_id") is not None
    metric("heidi_info", "gauge", "The run this daemon drives (labels), always 1.",
           [(f'{{run_id="{_label(view.get("run_id") or "")}",mode="{_label(view.get("mode") or "")}",'
             f'status="{_label(view.get("status") or "none")}",version="{_label(__version__)}"}}', 1)])
    metric("heidi_round", "gauge", "Current round (0 before the first).",
           [("", int(view.get("round") or 0))])
    metric("heidi_rounds", "gauge", "Rounds the run is configured for.",
           [("", int(view.get("rounds") or 0))])
    metric("heidi_state", "gauge", "1 for the machine state the run is in, 0 for the others.",
           [(f'{{state="{s}"}}', 1 if has_run and view.get("state") == s else 0) for s in STATES])
    metric("heidi_paused", "gauge", "1 while the run is paused.", [("", bool(view.get("paused")))])
    metric("heidi_events_total", "counter", "Events in the run's journal.",
           [("", int((view.get("journal") or {}).get("events", 0) or 0))])
    metric("heidi_pending_requests", "gauge", "Control requests waiting to be applied.",
           [("", len(view.get("pending_requests") or ()))])
    metric("heidi_counter", "gauge", "The run's counters (sum of counters_delta).",
           [(f'{{name="{_label(k)}"}}', v) for k, v in sorted((view.get("counters") or {}).items())])
    for name, kind, help_, samples in _usage_metrics(view):
        metric(name, kind, help_, samples)
    slurm = view.get("slurm")
    metric("heidi_slurm_job", "gauge", "1 while the running stage is a Slurm job (its id and state).",
           [(f'{{job_id="{_label(slurm.get("job_id"))}",state="{_label(slurm.get("state"))}"}}', 1)]
           if slurm else [])
    return "\n".join(out) + "\n"
