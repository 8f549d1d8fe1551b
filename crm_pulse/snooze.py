"""Snooze links (docs/alerts.md#snooze-links): a URL signed with HMAC-SHA256 that names a lead, its rep and when
the link expires. `crm-pulse alerts notify` puts one in each message; `crm-pulse gateway` serves it, and once the rep
confirms, publishes the snooze, keyed by lead, to a compacted topic. The notifier follows that topic, so the two run
as separate processes and a restarted notifier still honours every snooze."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
from datetime import datetime, timedelta, timezone
from typing import Awaitable, Callable, Iterable
from urllib.parse import parse_qs, urlencode

import orjson
from aiohttp import web
from prometheus_client import Counter

from crm_pulse.config import Settings

log = logging.getLogger(__name__)

PATH = "/snooze"

LINKS = Counter(
    "crm_gateway_snooze_links_total", "Snooze links opened at the gateway, by outcome.", ["outcome"],
)  # fmt: skip


class LinkRefused(ValueError):
    """A snooze link that is not honoured: the HTTP status, the metric's outcome, and the one-line reason."""

    def __init__(self, status: int, outcome: str, reason: str):
        super().__init__(reason)
        self.status, self.outcome = status, outcome


def link_signature(secret: bytes, lead_id: str, rep_id: str, expires: int) -> str:
    # Newline-separated, and refused in the values, so no two links sign the same text.
    return hmac.new(secret, f"{lead_id}\n{rep_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


def snooze_link(base_url: str, secret: bytes, lead_id: str, rep_id: str, expires: int) -> str:
    query = {"lead": lead_id, "rep": rep_id, "expires": expires,
             "signature": link_signature(secret, lead_id, rep_id, expires)}  # fmt: skip
    return f"{base_url.rstrip('/')}{PATH}?{urlencode(query)}"


def check_link(secret: bytes, query: str, now: datetime) -> tuple[str, str]:
    """(lead id, rep id) of a signed, unexpired link's raw query string, or LinkRefused."""
    fields = {name: values[0] for name, values in parse_qs(query).items() if len(values) == 1}
    try:
        lead_id, rep_id, expires, given = fields["lead"], fields["rep"], int(fields["expires"]), fields["signature"]
    except (KeyError, ValueError):
        raise LinkRefused(400, "incomplete",
                          "the link is incomplete: it needs lead, rep, expires and signature") from None
    if "\n" in lead_id + rep_id or not hmac.compare_digest(given, link_signature(secret, lead_id, rep_id, expires)):
        raise LinkRefused(403, "bad_signature", "the link's signature is not valid")
    if expires <= now.timestamp():
        expired = datetime.fromtimestamp(expires, timezone.utc).isoformat(timespec="seconds")
        raise LinkRefused(410, "expired", f"the link expired at {expired}; use the one in a newer alert")
    return lead_id, rep_id


def snooze_record(lead_id: str, rep_id: str, until: datetime) -> tuple[bytes, bytes]:
    """The snoozes topic's key and value: a later snooze of the lead replaces the earlier once compacted."""
    return lead_id.encode(), orjson.dumps({"lead_id": lead_id, "rep_id": rep_id, "until": until.isoformat()})


class Snoozes:
    """Lead id → until when its alerts are suppressed. `fetch` gives the snoozes topic's records not yet seen, up to
    its end as of the call; `catch_up` applies them, so a snooze the gateway published before an alert is decided
    on is honoured for it."""

    def __init__(self, fetch: Callable[[], Iterable]):
        self.fetch = fetch
        self.until: dict[str, datetime] = {}
        self.catch_up()

    def catch_up(self) -> None:
        for record in self.fetch():
            value = orjson.loads(record.value)
            self.until[record.key.decode()] = datetime.fromisoformat(value["until"])
            log.info("lead %s snoozed until %s", record.key.decode(), value["until"])

    def snoozed(self, lead_id: str, now: datetime) -> bool:
        return lead_id in self.until and now < self.until[lead_id]


def page(title: str, body: str) -> str:
    return f"<!doctype html><title>{html.escape(title)}</title><p>{body}</p>\n"


def routes(settings: Settings, send: Callable[[str, bytes | None, bytes], Awaitable[None]],
           now: Callable[[], datetime]) -> list[web.RouteDef]:  # fmt: skip
    """The gateway's /snooze: a GET only asks to confirm (mail scanners open links); the POST the page sends
    publishes the snooze and answers once the broker acknowledged it. A refused link gets its status and one line."""
    secret = settings.notify_link_secret.get_secret_value().encode()
    period = timedelta(seconds=settings.notify_snooze_seconds)
    topic = settings.effective_notify_snoozes_topic

    async def snooze(request: web.Request) -> web.Response:
        try:
            lead_id, rep_id = check_link(secret, request.rel_url.raw_query_string, now())
        except LinkRefused as refused:
            LINKS.labels(refused.outcome).inc()
            return web.Response(status=refused.status, text=f"{refused}\n")
        until = now() + period
        lead = html.escape(lead_id)
        if request.method != "POST":
            LINKS.labels("shown").inc()
            form = f'<form method="post"><button>Snooze lead {lead} until {until:%Y-%m-%d %H:%M} UTC</button></form>'
            return web.Response(text=page(f"Snooze lead {lead_id}", f"Stop alerts about lead {lead}?{form}"),
                                content_type="text/html")  # fmt: skip
        try:
            await asyncio.wait_for(send(topic, *snooze_record(lead_id, rep_id, until)),
                                   settings.gateway_ack_timeout_seconds)
        except Exception as exc:  # noqa: BLE001 - whatever the broker did, the snooze is not saved
            log.warning("snooze of lead %s not acknowledged: %r", lead_id, exc)
            LINKS.labels("unavailable").inc()
            return web.Response(status=503, text="the snooze could not be saved now; open the link again in a minute\n",
                                headers={"Retry-After": "30"})  # fmt: skip
        LINKS.labels("snoozed").inc()
        log.info("lead %s snoozed until %s", lead_id, until.isoformat())
        done = f"No alerts about lead {lead} until {until:%Y-%m-%d %H:%M} UTC."
        return web.Response(text=page(f"Lead {lead_id} snoozed", done), content_type="text/html")

    return [web.get(PATH, snooze), web.post(PATH, snooze)]
