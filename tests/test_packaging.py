"""The shipped systemd units and crontab: what they promise (restart semantics, limits, stage
containment, sandboxing that keeps GPU access), and `systemd-analyze verify` clean where present."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess

import pytest

PACKAGING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "packaging")
UNITS = ("heidi-daemon.service", "heidi-tick.service")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    with open(os.path.join(PACKAGING, name)) as fh:
        parser.read_file(fh)
    return parser


def _seconds(value: str) -> float:
    return float(value.rstrip("s"))


@pytest.mark.parametrize("name", UNITS)
def test_units_keep_runs_and_stages_in_hand(name):
    unit = _unit(name)
    service = unit["Service"]
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert service["StateDirectory"] == "heidi" and service["StateDirectoryMode"] == "0700"
    assert "75" in service["SuccessExitStatus"].split()  # another holder: not a failure
    assert service["Delegate"] == "yes"  # stages get cgroups of their own
    assert int(service["LimitNOFILE"]) >= 65536
    assert _seconds(service["TimeoutStopSec"]) > 5 + 10  # above the kill grace, with margin
    assert service["KillMode"] == "mixed"  # heidi gets SIGTERM first and ends its stage itself
    # sandboxing that keeps GPUs and cgroups usable
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["ProtectSystem"] == "strict" and "/var/lib/heidi" in service["ReadWritePaths"]
    for forbidden in ("PrivateDevices", "DevicePolicy", "ProtectControlGroups"):
        assert forbidden not in service, f"{forbidden} would cut stages off the GPU or cgroups"


def test_daemon_unit_does_not_restart_on_a_bad_configuration_or_another_holder():
    service = _unit("heidi-daemon.service")["Service"]
    assert service["Restart"] == "on-failure"
    assert {"2", "75"} <= set(service["RestartPreventExitStatus"].split())


def test_tick_unit_lets_a_long_stage_run():
    service = _unit("heidi-tick.service")["Service"]
    assert service["Type"] == "oneshot" and service["TimeoutStartSec"] == "infinity"


def test_crontab_uses_absolute_paths_and_says_what_stages_need():
    with open(os.path.join(PACKAGING, "crontab.example")) as fh:
        text = fh.read()
    job = [line for line in text.splitlines() if line and not line.startswith("#") and "=" not in line]
    assert len(job) == 1 and job[0].split()[5].startswith("/")
    assert "PATH=" in text and "HEIDI_PYTHON=" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_clean(tmp_path):
    fake = tmp_path / "heidi"  # verify insists that ExecStart's binary exists
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    for name in (*UNITS, "heidi-tick.timer"):
        with open(os.path.join(PACKAGING, name)) as fh:
            text = fh.read().replace("/usr/local/bin/heidi", str(fake))
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in
                                                          (*UNITS, "heidi-tick.timer"))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
