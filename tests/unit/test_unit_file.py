"""The shipped systemd unit (finding H1): what it must say so that restarting, stopping or losing the
agent never stops the data path behind systemd's back, and so that a stalled loop is restarted. systemd
does not run on the test machines; the behaviour each directive gives is exercised without it in the
Consul tier (SIGUSR2 to the agent alone, the guard and tgtd outliving a killed agent, sd_notify)."""
from __future__ import annotations

import configparser
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "etc" / "pathagent.service"


def service() -> configparser.SectionProxy:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read_string(UNIT.read_text())
    return p["Service"]


def test_restarting_the_agent_never_signals_the_data_path() -> None:
    s = service()
    assert s.get("KillMode") == "process", "only the agent is signalled: tgtd and the guard outlive it"
    assert s.get("RestartKillSignal") == "SIGUSR2", "systemctl restart = detach + adopt, no outage"
    assert s.get("KillSignal") == "SIGTERM"


def test_readiness_and_a_watchdog_on_the_main_loop() -> None:
    s = service()
    assert s.get("Type") == "notify" and s.get("NotifyAccess") == "main", "tgtd cannot send READY=1 for us"
    sec = float(s.get("WatchdogSec", "0"))
    assert 0 < sec <= 60
    # the main loop pings at least every HEARTBEAT seconds, and at least twice per WatchdogSec
    from agent.runtime.loop import HEARTBEAT
    assert HEARTBEAT < sec / 2
    assert s.get("ExecStartPre", "").endswith("pathagent check-config")
    assert s.get("Restart") == "always", "an agent that exits by itself (a manual SIGUSR2) is started again"
    assert s.get("TasksMax") == "infinity", "tgtd's threads (about 17 per LUN) live in this cgroup"
