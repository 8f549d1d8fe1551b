"""The example alert consumers end to end on the real embedded broker: `crm-pulse alerts tail` reading what a
worker published, and `crm-pulse alerts notify` posting it to a local webhook that fails once."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from crm_pulse.channels import deliver_with_retries, post_json
from crm_pulse.broker import free_port
from crm_pulse.streams.kpis import DAY_MS
from tests.integration.test_pipeline import T0, lead_event, m

pytestmark = pytest.mark.integration

STALLED = (
    "2026-01-03T00:00:00.000Z lead.stalled rep=rep-7 lead=L1 stage=new idle=2.0d threshold=2.0d rule=stage_threshold"
)
ESCALATED = (
    "2026-01-05T00:00:00.000Z lead.stall_escalated rep=rep-7 lead=L1 stage=new idle=4.0d threshold=2.0d "
    "rule=stage_threshold"
)


def stall(worker) -> None:
    """L1 (rep-7) is created and left alone in `new` (2-day threshold); L2 moves event time to day 3."""
    worker.send(lead_event("l1", "lead.created", "L1", T0, rep="rep-7", source="web"))
    worker.send(lead_event("l2", "lead.created", "L2", T0 + 3 * DAY_MS, rep="rep-8", source="web"))
    worker.wait_for(lambda got: got.get(m("crm_alerts_emitted_total", type="lead.stalled")) == 1, what="stall")
    worker.read("alerts", 1)


def escalate(worker) -> None:
    """Activity on L2 moves event time to day 5: L1 has been idle twice its threshold."""
    worker.send(lead_event("l3", "lead.activity", "L2", T0 + 5 * DAY_MS, rep="rep-8", kind="call", direction="inbound"))
    worker.wait_for(
        lambda got: got.get(m("crm_alerts_emitted_total", type="lead.stall_escalated")) == 1, what="escalation"
    )


def produce(worker, *values: bytes) -> None:
    for value in values:
        worker.producer.send(worker.topic("alerts"), key=b"rep-7", value=value)
    worker.producer.flush()


def crm_pulse(worker, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crm_pulse.cli", *args],
        env={**worker.env, "CRM_PULSE_LOG_LEVEL": "info"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tail_prints_each_alert_and_reports_invalid_records_on_stderr(start_worker):
    worker = start_worker(CRM_PULSE_STALL_STAGE_DAYS='{"new": 2}', CRM_PULSE_GRACE_SECONDS="3600")
    stall(worker)
    stalled = orjson.loads(worker.read("alerts", 1)[0].value)
    regressed = {"schema_version": 2, "alert_id": "a1", "type": "deal.stage_regressed", "lead_id": "L1",
                 "rep_id": "rep-7", "team_id": None, "pipeline": None, "account_id": None, "stage": "new",
                 "detected_at": "2026-01-04T00:00:00.000Z", "amount": None, "close_date": None,
                 "previous_close_date": None, "push_count": None, "previous_amount": None, "decrease_ratio": None,
                 "from_stage": "qualified", "to_stage": "new", "health": None, "health_band": None,
                 "previous_health_band": None}  # fmt: skip
    # offsets 1 to 3: not JSON, a version tail does not read, a deal alert (version 2)
    produce(worker, b"{not json", orjson.dumps({**stalled, "schema_version": 3}), orjson.dumps(regressed))
    escalate(worker)
    worker.read("alerts", 5)

    result = crm_pulse(worker, "alerts", "tail", "--from-beginning", "--no-follow")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        STALLED, "2026-01-04T00:00:00.000Z deal.stage_regressed rep=rep-7 lead=L1 stage=new from=qualified to=new",
        ESCALATED]  # fmt: skip
    topic = worker.topic("alerts")
    assert [line for line in result.stderr.splitlines() if line.startswith("invalid record")] == [
        f"invalid record {topic}/0@1: value: Invalid JSON: key must be a string at line 1 column 2",
        f"invalid record {topic}/0@2: unsupported schema_version 3; this consumer reads versions 1 and 2",
    ]


class Webhook:
    """A webhook on a free loopback port: the scripted statuses in turn (a 429 with Retry-After: 1), then 200s
    with the body `answer` gives for the request (default: none). Keeps each request's body and headers."""

    def __init__(self, *statuses: int, answer=lambda body: b""):
        self.requests: list[tuple[int, dict]] = []
        self.raw: list[tuple] = []  # (headers, body) as received
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                n = len(hook.requests)
                status = statuses[n] if n < len(statuses) else 200
                hook.requests.append((status, body))
                hook.raw.append((self.headers, raw))  # looked up case-insensitively, as HTTP names are
                reply = answer(body) if status == 200 else b""
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hooks = []

    def start(*statuses: int, **options) -> Webhook:
        hooks.append(Webhook(*statuses, **options))
        return hooks[-1]

    yield start
    for hook in hooks:
        hook.close()


def post(url: str, body: bytes, max_attempts: int, backoff_seconds: float) -> str | None:
    return deliver_with_retries("webhook", lambda: post_json(url, body, 5), max_attempts, backoff_seconds)


def test_posts_retry_5xx_and_429_with_backoff_or_retry_after_and_give_up(webhook, caplog):
    caplog.set_level(logging.WARNING, logger="crm_pulse.channels")
    flaky = webhook(429, 503)
    assert post(flaky.url, b'{"text": "hi"}', max_attempts=4, backoff_seconds=0.05) is None
    assert flaky.requests == [(429, {"text": "hi"}), (503, {"text": "hi"}), (200, {"text": "hi"})]
    assert caplog.messages == [
        "webhook attempt 1/4 failed (HTTP 429); retrying in 1.0s",  # Retry-After
        "webhook attempt 2/4 failed (HTTP 503); retrying in 0.1s",  # 0.05 s × 2
    ]

    caplog.clear()
    rejecting = webhook(404)
    assert post(rejecting.url, b"{}", max_attempts=4, backoff_seconds=0.05) == "HTTP 404"
    assert [status for status, _ in rejecting.requests] == [404]
    assert caplog.messages == ["webhook answered HTTP 404; retrying would not help"]

    caplog.clear()
    nobody = f"http://127.0.0.1:{free_port()}/hook"
    reason = post(nobody, b"{}", max_attempts=3, backoff_seconds=0.01)
    assert "Connection refused" in reason and reason.endswith(" after 3 attempts")
    attempts = [message.split(" (")[0] for message in caplog.messages]
    assert attempts == ["webhook attempt 1/3 failed", "webhook attempt 2/3 failed", "webhook attempt 3/3 failed"]
    assert "Connection refused" in caplog.messages[-1] and caplog.messages[-1].endswith("; giving up")


def slack(headline: str, facts: str, details: str) -> dict:
    return {
        "text": f"{headline}: {facts}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*\n{facts}"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": details}]},
        ],
    }


def test_notify_posts_each_alert_once_retrying_a_failed_post_and_resumes_after_it(start_worker, webhook):
    hook = webhook(500)
    worker = start_worker(CRM_PULSE_STALL_STAGE_DAYS='{"new": 2}', CRM_PULSE_GRACE_SECONDS="3600")
    stall(worker)
    escalate(worker)
    stalled, escalated = (orjson.loads(r.value) for r in worker.read("alerts", 2))
    produce(worker, orjson.dumps(stalled), b"{not json")  # a re-delivered alert, then garbage

    args = ["alerts", "notify", "--webhook-url", hook.url, "--from-beginning", "--max-idle", "3"]
    result = crm_pulse(worker, *args)

    assert result.returncode == 0, result.stderr
    first = slack(
        "Lead L1 stalled in stage new",
        "idle 2.0d, threshold 2.0d, rep rep-7, team t1",  # no directory: the team is named
        f"lead.stalled · detected 2026-01-03T00:00:00.000Z · rule stage_threshold · alert {stalled['alert_id']}",
    )
    second = slack(
        "Lead L1 still stalled in stage new (escalated)",
        "idle 4.0d, threshold 2.0d, rep rep-7, team t1",
        "lead.stall_escalated · detected 2026-01-05T00:00:00.000Z · rule stage_threshold · "
        f"alert {escalated['alert_id']}",
    )
    assert hook.requests == [(500, first), (200, first), (200, second)]
    assert "slack attempt 1/5 failed (HTTP 500); retrying in 1.0s" in result.stderr
    assert "notify stopped: posted=2 failed=0 duplicate=1 invalid=1" in result.stderr

    # Offsets were committed per record: the same group, even told to start from the beginning, resumes after
    # the last record and posts nothing again.
    result = crm_pulse(worker, *args)
    assert result.returncode == 0, result.stderr
    assert "notify stopped: posted=0 failed=0 duplicate=0 invalid=0" in result.stderr
    assert len(hook.requests) == 3
