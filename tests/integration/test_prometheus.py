"""A real Prometheus (and Alertmanager) against a running `crm-pulse demo`: the worker's /metrics passes
`promtool check metrics`, every dashboard query uses exported metrics and returns data, every recording rule
produces its series, and every alerting rule evaluates.

Needs Debian's `prometheus` package (prometheus, promtool); Alertmanager (`prometheus-alertmanager`) is used
when installed. The module takes about 1-2 minutes: the demo needs ~60 s of simulated traffic before every
KPI (for example the 7-day lead velocity, which needs a previous week) has a value."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from crm_pulse.broker import free_port
from tests.test_stack import (
    ALERTMANAGER_CONFIG,
    RULE_FILES,
    SCRAPE_SERIES,
    alert_rules,
    dashboard_queries,
    interpolations,
    metric_names,
    recording_rules,
    variable_queries,
)

pytestmark = pytest.mark.integration

DEADLINE_SECONDS = 150  # from the demo's start, for every query to have data
# Series of a finished calendar month with deals won in it, by team and rep: the demo's simulated time starts
# now and runs ~3 h a second, so within the deadline it ends a month only when started near one's end. Their
# values are checked by promtool's unit tests (tests/test_stack.py); here only that they parse and evaluate.
NEED_A_FINISHED_MONTH = ("crm:forecast_accuracy_ratio:month_previous_by_team",
                         "crm:forecast_accuracy_ratio:month_previous_by_rep")  # fmt: skip


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install -y --no-install-recommends {package})")
    return path


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _wait(what: str, check, timeout: float, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what}: process exited: {log.read_text()[-3000:]}"
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> int | None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            return None
    return process.returncode


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.started = time.monotonic()
        self.metrics_port = free_port()
        self.prometheus_port = free_port()
        self.alertmanager_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.api = f"http://127.0.0.1:{self.prometheus_port}/api/v1"
        self.processes: list[tuple[subprocess.Popen, Path]] = []
        self.alertmanager: subprocess.Popen | None = None

    def spawn(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append((process, log))
        return process

    def start(self) -> "Stack":
        prometheus = _binary("prometheus", "prometheus")
        # The demo: embedded broker, worker and synthetic traffic (its own CRM_PULSE_METRICS_PORT).
        env = {**os.environ, "CRM_PULSE_METRICS_PORT": str(self.metrics_port)}
        self.demo = self.spawn("demo", [sys.executable, "-m", "crm_pulse.cli", "demo", "--seconds", "400"], env)
        alerting = []
        # Debian installs Alertmanager as prometheus-alertmanager; the upstream binary is alertmanager.
        if alertmanager := shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"):
            self.alertmanager = self.spawn("alertmanager", [
                alertmanager, f"--config.file={ALERTMANAGER_CONFIG}", f"--storage.path={self.tmp / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.alertmanager_port}", "--cluster.listen-address=",
            ])  # fmt: skip
            alerting = [{"static_configs": [{"targets": [f"127.0.0.1:{self.alertmanager_port}"]}]}]
        # A test-only copy of deploy/prometheus/prometheus.yml: the same rules and job, scraping the demo every
        # second and evaluating the rules every second.
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULE_FILES],
            "alerting": {"alertmanagers": alerting},
            "scrape_configs": [{"job_name": "crm-pulse", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{self.metrics_port}"]}]}],
        }  # fmt: skip
        config_path = self.tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.prometheus = self.spawn("prometheus", [
            prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}", "--log.level=warn",
        ])  # fmt: skip
        _wait("Prometheus to be ready", lambda: _get(f"http://127.0.0.1:{self.prometheus_port}/-/ready"), 60,
              self.prometheus, self.tmp / "prometheus.log")  # fmt: skip
        _wait("the demo to serve /metrics", lambda: _get(self.metrics_url), 60, self.demo, self.tmp / "demo.log")
        return self

    def stop(self) -> None:
        demo_exit = _stop(self.demo, signal.SIGINT)  # the demo stops its worker and broker on Ctrl-C
        for process, _ in self.processes:
            _stop(process)
        assert demo_exit == 0, (self.tmp / "demo.log").read_text()[-3000:]

    def alive(self) -> None:
        for process, log in self.processes:
            assert process.poll() is None, f"{log.name}: exited: {log.read_text()[-3000:]}"

    def query(self, expr: str) -> dict:
        url = f"{self.api}/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return json.loads(_get(url))
        except urllib.error.HTTPError as error:  # 400/422: a bad expression; the body says why
            return json.loads(error.read())

    def scrape(self) -> str:
        return _get(self.metrics_url).decode()

    def remaining(self) -> float:
        return DEADLINE_SECONDS - (time.monotonic() - self.started)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("prometheus-stack"))
    try:
        yield stack.start()
    finally:
        stack.stop()


def _empty(stack: Stack, exprs: list[tuple[str, str]]) -> list[str]:
    """The (where, expr) pairs whose query fails or returns no series."""
    missing = []
    for where, expr in exprs:
        answer = stack.query(expr)
        assert answer["status"] == "success", f"{where}: {expr!r}: {answer}"
        if not answer["data"]["result"]:
            missing.append(f"{where}: {expr}")
    return missing


def _until_all_have_data(stack: Stack, exprs: list[tuple[str, str]]) -> None:
    """Until every expression has data (those over a finished month need only evaluate: see above)."""
    monthly = [(where, expr) for where, expr in exprs if any(name in expr for name in NEED_A_FINISHED_MONTH)]
    _empty(stack, monthly)
    exprs = [pair for pair in exprs if pair not in monthly]
    missing = _empty(stack, exprs)
    while missing and stack.remaining() > 0:
        stack.alive()
        time.sleep(2)
        missing = _empty(stack, exprs)
    assert not missing, f"no data {DEADLINE_SECONDS} s after the demo started:\n" + "\n".join(missing)


def test_dashboard_queries_return_data(stack):
    exprs = [(where, expr) for where, raw in dashboard_queries() for expr in interpolations(raw)]
    assert len(exprs) > 100
    _until_all_have_data(stack, exprs)
    # Spot checks of real values behind the panels.
    win_rate = float(stack.query('max(crm_win_rate_ratio{window="30d"})')["data"]["result"][0]["value"][1])
    assert 0 < win_rate < 1
    workers = stack.query('sum(up{job="crm-pulse"})')["data"]["result"]
    assert float(workers[0]["value"][1]) == 1
    processed = float(stack.query("crm:events_processed:rate5m")["data"]["result"][0]["value"][1])
    assert processed > 1, "the demo publishes dozens of events per second"


def test_dashboards_use_only_exported_metrics(stack):
    _until_all_have_data(stack, [(w, e) for w, raw in dashboard_queries() for e in interpolations(raw)])
    exported = {sample.name for family in text_string_to_metric_families(stack.scrape()) for sample in family.samples}
    known = exported | set(recording_rules()) | SCRAPE_SERIES
    unknown = [f"{where}: {sorted(metric_names(expr) - known)}" for where, expr in dashboard_queries()
               if metric_names(expr) - known]  # fmt: skip
    assert not unknown, "\n".join(unknown)
    for where, metric, label in variable_queries():
        values = stack.query(f"group by ({label}) ({metric})")["data"]["result"]
        assert metric in exported and len(values) >= 2, f"{where}: {metric} has values {values}"
    # The rules too: every metric they read is exported (or recorded by another rule).
    for name, expr in {**recording_rules(), **alert_rules()}.items():
        assert metric_names(expr) <= known, f"{name}: {sorted(metric_names(expr) - known)}"


def test_every_recording_rule_produces_its_series(stack):
    records = recording_rules()
    _until_all_have_data(stack, [(name, name) for name in records])
    groups = json.loads(_get(f"{stack.api}/rules"))["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == set(records) | set(alert_rules())
    unhealthy = {name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"}
    assert not unhealthy, unhealthy
    # Real values: stalled leads per rep are whole, positive, for the reps the worker reports stalls for.
    result = stack.query("crm:leads_stalled:by_rep")["data"]["result"]
    by_rep = {r["metric"]["rep"]: float(r["value"][1]) for r in result}
    reps = {r["metric"]["rep"] for r in stack.query("crm_leads_stalled")["data"]["result"]}
    assert by_rep and set(by_rep) <= reps | {"unassigned"}
    assert all(n >= 1 and n == int(n) for n in by_rep.values()), by_rep
    p90 = {r["metric"]["stage"]: float(r["value"][1])
           for r in stack.query("crm:stage_dwell_p90_seconds:30d")["data"]["result"]}  # fmt: skip
    assert {"new", "qualified", "proposal", "negotiation"} <= set(p90), p90
    # Synthetic leads spend 0.3-1.8 days per stage (crm_pulse/generator.py); p90 is interpolated within the
    # histogram buckets around those, (6 h, 12 h] and (1 d, 2 d].
    assert all(0.25 * 86400 <= seconds <= 2 * 86400 for stage, seconds in p90.items() if stage != "won"), p90


def test_alert_rules_evaluate_and_the_worker_alerts_are_quiet(stack):
    for name, expr in alert_rules().items():
        answer = stack.query(expr)
        assert answer["status"] == "success", f"{name}: {answer}"
    _until_all_have_data(stack, [("crm:events_received:rate5m", "crm:events_received:rate5m")])
    time.sleep(2)  # at least one evaluation of every rule with data
    groups = json.loads(_get(f"{stack.api}/rules?type=alert"))["data"]["groups"]
    states = {rule["name"]: rule["state"] for group in groups for rule in group["rules"]}
    assert set(states) == set(alert_rules())
    # The demo's worker is up and exporting, and dead-letters one garbage message a minute only.
    for name in ("CrmPulseWorkerDown", "CrmPulseMetricsAbsent", "CrmPulseDeadLettersGrowing"):
        assert states[name] == "inactive", (name, states[name])


def test_prometheus_finds_alertmanager(stack):
    if stack.alertmanager is None:
        pytest.skip("Alertmanager is not installed: apt-get install -y --no-install-recommends prometheus-alertmanager")
    expected = f"http://127.0.0.1:{stack.alertmanager_port}/api/v2/alerts"

    def discovered():
        active = json.loads(_get(f"{stack.api}/alertmanagers"))["data"]["activeAlertmanagers"]
        return [am["url"] for am in active]

    assert _wait("Prometheus to discover Alertmanager", lambda: expected in discovered(), 30, stack.prometheus,
                 stack.tmp / "prometheus.log")  # fmt: skip
    status = json.loads(_get(f"http://127.0.0.1:{stack.alertmanager_port}/api/v2/status"))
    assert "name: webhook" in status["config"]["original"] and status["cluster"]["status"] == "disabled"


def test_worker_metrics_pass_promtool_check_metrics(stack):
    promtool = _binary("promtool", "prometheus")
    _until_all_have_data(stack, [("crm_leads_stalled", "crm_leads_stalled"),
                                 ("crm_stage_dwell_p90_seconds", "crm_stage_dwell_p90_seconds")])  # fmt: skip
    text = stack.scrape()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = sorted(line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip())
    assert not problems, "promtool check metrics on the worker's /metrics:\n" + "\n".join(problems)
    assert result.returncode == 0, result


def test_consumer_offsets_show_the_partitions_the_worker_reads(stack):
    _until_all_have_data(stack, [("crm:consumer_lag_messages:by_topic", "crm:consumer_lag_messages:by_topic")])
    offsets: dict[tuple[str, str], dict[str, float]] = {}
    rebalances = None
    for family in text_string_to_metric_families(stack.scrape()):
        for sample in family.samples:
            if sample.name == "crm_consumer_rebalances_total":
                rebalances = sample.value
            elif sample.name.startswith("crm_consumer_"):
                partition = offsets.setdefault((sample.labels["topic"], sample.labels["partition"]), {})
                partition[sample.name.removeprefix("crm_consumer_")] = sample.value
    topics = {topic for topic, _ in offsets}
    # The demo's one worker reads every partition of the input and of the family topics, and shows no changelog.
    assert {"crm-events", "crm-pulse-lead-events", "crm-pulse-kpi-sum-deltas"} <= topics, topics
    assert not any(topic.endswith("-changelog") for topic in topics), topics
    assert rebalances is not None and rebalances >= 1
    for where, partition in offsets.items():
        if "end_offset" in partition:
            assert partition["lag_messages"] == max(partition["end_offset"] - partition["committed_offset"], 0), where
    # Dozens of events a second for over a minute: the input is read and committed far past its start.
    assert sum(p["committed_offset"] for (topic, _), p in offsets.items() if topic == "crm-events") > 100
