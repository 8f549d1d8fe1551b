"""Snooze links (docs/alerts.md#snooze-links): a URL signed with HMAC-SHA256 that names a lead, its rep and when
the link expires; opening it and confirming suppresses that lead's alerts for CRM_PULSE_NOTIFY_SNOOZE_SECONDS.
Snoozes are kept in a compacted topic, keyed by lead, so a restarted notifier still honours them."""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import threading
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlencode, urlparse

import orjson
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from crm_pulse.config import Settings

log = logging.getLogger(__name__)

PATH = "/snooze"


class LinkRefused(ValueError):
    """A snooze link that is not honoured: the reason, for the 403 page."""


def link_signature(secret: bytes, lead_id: str, rep_id: str, expires: int) -> str:
    # Newline-separated, and refused in the values, so no two links sign the same text.
    return hmac.new(secret, f"{lead_id}\n{rep_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


def snooze_link(base_url: str, secret: bytes, lead_id: str, rep_id: str, expires: int) -> str:
    query = {"lead": lead_id, "rep": rep_id, "expires": expires,
             "signature": link_signature(secret, lead_id, rep_id, expires)}  # fmt: skip
    return f"{base_url.rstrip('/')}{PATH}?{urlencode(query)}"


def check_link(secret: bytes, query: str, now: datetime) -> tuple[str, str]:
    """(lead id, rep id) of a signed, unexpired link's query string, or LinkRefused."""
    fields = {name: values[0] for name, values in parse_qs(query).items() if len(values) == 1}
    try:
        lead_id, rep_id, expires, given = fields["lead"], fields["rep"], int(fields["expires"]), fields["signature"]
    except (KeyError, ValueError):
        raise LinkRefused("the link is incomplete: it needs lead, rep, expires and signature") from None
    if "\n" in lead_id + rep_id or not hmac.compare_digest(given, link_signature(secret, lead_id, rep_id, expires)):
        raise LinkRefused("the link's signature is not valid")
    if expires <= now.timestamp():
        expired = datetime.fromtimestamp(expires, timezone.utc).isoformat(timespec="seconds")
        raise LinkRefused(f"the link expired at {expired}; use the one in a newer alert")
    return lead_id, rep_id


class Snoozes:
    """Lead id → until when its alerts are suppressed, read back from the compacted topic at start."""

    def __init__(self, topic: str, producer: KafkaProducer, records):
        self.topic, self.producer = topic, producer
        self.until: dict[str, datetime] = {}
        for record in records:
            self.until[record.key.decode()] = datetime.fromisoformat(orjson.loads(record.value)["until"])
        self.lock = threading.Lock()  # the web server's threads add, the consume loop reads

    def snoozed(self, lead_id: str, now: datetime) -> bool:
        with self.lock:
            return lead_id in self.until and now < self.until[lead_id]

    def add(self, lead_id: str, rep_id: str, until: datetime) -> None:
        value = {"lead_id": lead_id, "rep_id": rep_id, "until": until.isoformat()}
        self.producer.send(self.topic, key=lead_id.encode(), value=orjson.dumps(value)).get(timeout=30)
        with self.lock:
            self.until[lead_id] = until
        log.info("lead %s snoozed until %s", lead_id, until.isoformat())


def page(title: str, body: str) -> bytes:
    return f"<!doctype html><title>{html.escape(title)}</title><p>{body}</p>\n".encode()


def serve(settings: Settings, metrics_registry: CollectorRegistry, snoozes: Snoozes | None,
          now: Callable[[], datetime]) -> ThreadingHTTPServer:  # fmt: skip
    """The notifier's web server on CRM_PULSE_NOTIFY_METRICS_HOST:PORT: /metrics, and with snooze links /snooze.
    A GET of a link only asks to confirm (mail scanners open links); the POST the page sends snoozes."""
    secret = settings.notify_link_secret.get_secret_value().encode() if settings.notify_link_secret else b""
    period = timedelta(seconds=settings.notify_snooze_seconds)

    class Handler(MetricsHandler):
        registry = metrics_registry

        def do_GET(self) -> None:
            if urlparse(self.path).path != PATH or snoozes is None:
                return super().do_GET()
            self.snooze(confirmed=False)

        def do_POST(self) -> None:
            if urlparse(self.path).path != PATH or snoozes is None:
                return self.answer(404, page("Not found", "Not found."))
            self.snooze(confirmed=True)

        def snooze(self, confirmed: bool) -> None:
            try:
                lead_id, rep_id = check_link(secret, urlparse(self.path).query, now())
            except LinkRefused as exc:
                return self.answer(403, page("Link refused", html.escape(str(exc), quote=False)))
            until = now() + period
            lead = html.escape(lead_id)
            if not confirmed:
                form = f'<form method="post"><button>Snooze lead {lead} until {until:%Y-%m-%d %H:%M} UTC</button></form>'
                return self.answer(200, page(f"Snooze lead {lead_id}", f"Stop alerts about lead {lead}?{form}"))
            snoozes.add(lead_id, rep_id, until)
            self.answer(200, page(f"Lead {lead_id} snoozed", f"No alerts about lead {lead} until {until:%Y-%m-%d %H:%M} UTC."))

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((settings.notify_metrics_host, settings.notify_metrics_port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="notify-web", daemon=True).start()
    return server
