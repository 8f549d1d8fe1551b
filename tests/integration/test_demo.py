"""`crm-pulse demo` (what `make demo` runs) serves live, non-zero KPIs and emits stall alerts within 60 s; a
second demo beside it takes a free port and says so; a demo killed with SIGKILL takes its broker and worker
along."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crm_pulse.broker import free_port

pytestmark = pytest.mark.integration

REQUIRED = (
    "crm_stage_dwell_mean_seconds",
    "crm_win_rate_ratio",
    "crm_churn_ratio",
    "crm_leads_stalled",
    "crm_alerts_emitted_total",
)


def nonzero_sums(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=2) as response:
        families = text_string_to_metric_families(response.read().decode())
    sums: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return {name: value for name, value in sums.items() if value}


def test_demo_serves_live_kpis_and_stops_everything(tmp_path):
    port = free_port()
    env = {**os.environ, "CRM_PULSE_METRICS_PORT": str(port)}
    demo = subprocess.Popen(
        [sys.executable, "-m", "crm_pulse.cli", "demo", "--seconds", "600"],  # stopped by Ctrl-C below
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "demo.err", "wb"),
    )  # fmt: skip
    started = time.monotonic()
    seen: dict[str, float] = {}
    try:
        while time.monotonic() - started < 60 and not all(name in seen for name in REQUIRED):
            try:
                seen = nonzero_sums(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                pass
            time.sleep(1)
        missing = [name for name in REQUIRED if name not in seen]
        assert not missing, f"zero or absent after 60 s: {missing}; {(tmp_path / 'demo.err').read_text()[-2000:]}"
        assert seen["crm_events_processed_total"] > 100
        assert 0 < seen["crm_win_rate_ratio"] <= 9  # up to nine windows (rolling and calendar), each a ratio
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops the worker and the broker it started
        assert demo.wait(60) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def children_of(pid: int) -> set[int]:
    """The processes whose parent is `pid` (read from /proc: once it dies, they are re-parented)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_second_demo_takes_a_free_port_and_a_killed_demo_leaves_no_process(tmp_path):
    port = free_port()
    env = {**os.environ, "CRM_PULSE_METRICS_PORT": str(port)}
    first = subprocess.Popen([sys.executable, "-m", "crm_pulse.cli", "demo", "--seconds", "600"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not nonzero_sums_or_none(f"http://127.0.0.1:{port}/metrics"):
            time.sleep(1)
        out = tmp_path / "second.out"
        second = subprocess.Popen([sys.executable, "-m", "crm_pulse.cli", "demo", "--seconds", "600"], env=env,
                                  stdout=open(out, "wb"), stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "alerts tail" not in out.read_text():
                time.sleep(1)
            printed = out.read_text()
            moved = re.search(rf"port {port} is taken: the worker serves on (\d+) instead", printed)
            assert moved, printed
            other = int(moved.group(1))
            assert f"http://127.0.0.1:{other}/kpis" in printed
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "crm_events_processed_total" not in (
                    nonzero_sums_or_none(f"http://127.0.0.1:{other}/metrics") or {}):  # fmt: skip
                time.sleep(1)
            with urllib.request.urlopen(f"http://127.0.0.1:{other}/kpis", timeout=5) as response:
                assert orjson.loads(response.read())["time_basis"].startswith("event time")
            # The alerts command it printed works as printed (here up to the end of the topic).
            command = re.search(r"^\s*(CRM_PULSE_BROKER=\S+ .*alerts tail --from-beginning)$", printed, re.M).group(1)
            tail = subprocess.run(command + " --no-follow", shell=True, capture_output=True, text=True, timeout=60)
            assert tail.returncode == 0, tail.stderr
            started = children_of(second.pid)  # its broker and its worker
            assert len(started) == 2, started
        finally:
            second.kill()  # SIGKILL: no clean-up of its own
            second.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in started):
            time.sleep(0.5)
        assert not [pid for pid in started if alive(pid)]
        assert first.poll() is None  # the first demo is untouched
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 0


def nonzero_sums_or_none(url: str) -> dict[str, float] | None:
    try:
        return nonzero_sums(url)
    except OSError:
        return None
