"""`crm-pulse demo` (what `make demo` runs) serves live, non-zero KPIs and emits stall alerts within 60 s."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

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
        assert 0 < seen["crm_win_rate_ratio"] < 2  # two windows, each a ratio
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops the worker and the broker it started
        assert demo.wait(60) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
