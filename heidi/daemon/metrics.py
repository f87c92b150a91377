"""GET /metrics: the status view in Prometheus text exposition format 0.0.4."""
from __future__ import annotations

from typing import Any

from .._version import __version__
from ..loop import STATES


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
    metric("heidi_usage", "gauge", "The run's usage (sum of usage_delta).",
           [(f'{{name="{_label(k)}"}}', v) for k, v in sorted((view.get("usage") or {}).items())])
    slurm = view.get("slurm")
    metric("heidi_slurm_job", "gauge", "1 while the running stage is a Slurm job (its id and state).",
           [(f'{{job_id="{_label(slurm.get("job_id"))}",state="{_label(slurm.get("state"))}"}}', 1)]
           if slurm else [])
    return "\n".join(out) + "\n"
