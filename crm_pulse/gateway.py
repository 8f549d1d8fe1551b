"""`crm-pulse gateway`: CRM webhooks → verified → contract v1 events → the input topic (docs/ingestion.md); and,
with CRM_PULSE_NOTIFY_LINK_SECRET, the alerts' snooze links (crm_pulse.snooze).

A request is answered 2xx only once the broker has acknowledged (acks=all) every event and dead letter it gave;
otherwise 503, and the CRM delivers it again. Event ids derive from the vendor's own delivery ids, so a
redelivery gives the same `event_id` and the worker's de-duplication drops it, across gateway restarts too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import time
import tomllib
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable

import orjson
from aiohttp import BasicAuth, web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from crm_pulse import snooze
from crm_pulse.channels import signature
from crm_pulse.config import Settings, SettingsInvalid
from crm_pulse.schemas.records import dead_letter_record
from crm_pulse.schemas.validate import InvalidEvent, parse_event

log = logging.getLogger(__name__)

SOURCES = ("hubspot", "pipedrive", "salesforce", "events")
REPLAY_WINDOW_MS = 5 * 60 * 1000
# Fixed for good: event ids are uuid5(this, "<vendor>:<delivery id>:<type>"), the same for every redelivery.
EVENT_ID_NAMESPACE = uuid.UUID("5b0c6d38-4a55-4f0e-9d1e-0c7d3a1e6b21")
EVENTS_SIGNATURE_HEADER = "X-CRM-Pulse-Signature"
UNKNOWN_STAGE = "unknown"  # `from` of a change whose previous stage the CRM does not send (the worker reads `to`)
REMEMBERED_DEALS = 100_000  # deals whose last fields a gateway keeps in memory, each vendor's
# The contract's forecast categories from HubSpot's (internal values) and Salesforce's ForecastCategoryName.
HUBSPOT_FORECAST = {"PIPELINE": "pipeline", "BEST_CASE": "best_case", "COMMIT": "commit", "CLOSED": "closed",
                    "OMIT": "omitted"}  # fmt: skip
SALESFORCE_FORECAST = {"Pipeline": "pipeline", "Best Case": "best_case", "Commit": "commit", "Closed": "closed",
                       "Omitted": "omitted"}  # fmt: skip
SALESFORCE_OUTBOUND = "http://soap.sforce.com/2005/09/outbound"
SALESFORCE_ACK = (
    b'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    b'<soapenv:Body><notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound"><Ack>true</Ack>'
    b"</notificationsResponse></soapenv:Body></soapenv:Envelope>"
)
JSON_TYPES = ("application/json",)
XML_TYPES = ("text/xml", "application/xml")

REQUESTS = Counter("crm_gateway_requests_total", "Webhook requests by source and outcome.", ["source", "outcome"])
VERIFICATION_FAILURES = Counter(
    "crm_gateway_verification_failures_total", "Requests refused as unauthenticated, by source and reason.",
    ["source", "reason"],
)  # fmt: skip
TRANSLATION_FAILURES = Counter(
    "crm_gateway_translation_failures_total", "Vendor notifications dead-lettered, by source and reason.",
    ["source", "reason"],
)  # fmt: skip
EVENTS_PUBLISHED = Counter("crm_gateway_events_published_total", "Contract events acknowledged by the broker.",
                           ["source"])  # fmt: skip
ACK_SECONDS = Histogram(
    "crm_gateway_ack_seconds", "From a verified request to the broker's acknowledgement of all it gave.", ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip


class Refused(Exception):
    """The answer to a request that publishes nothing: its status, the outcome label and the reason sent back."""

    def __init__(self, status: int, outcome: str, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.outcome, self.reason, self.headers = status, outcome, reason, headers or {}


def unauthenticated(source: str, reason: str, detail: str) -> Refused:
    VERIFICATION_FAILURES.labels(source, reason).inc()
    return Refused(401, "unauthenticated", detail)


class Untranslatable(Exception):
    """A verified notification the mappings cannot turn into events (an unknown stage id, a missing field)."""


def event_id(source: str, delivery: str, kind: str) -> str:
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{source}:{delivery}:{kind}"))


# --- settings: stage mappings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageMap:
    """Each CRM's stage ids → (pipeline, contract stage); `won` and `lost` are the closing stages."""

    hubspot: dict[str, tuple[str, str]] = field(default_factory=dict)
    pipedrive: dict[str, tuple[str, str]] = field(default_factory=dict)
    salesforce: dict[str, tuple[None, str]] = field(default_factory=dict)  # Salesforce names no pipeline
    currency: str = "USD"

    def stage(self, source: str, stage_id: object) -> tuple[str | None, str]:
        stages = getattr(self, source)
        if str(stage_id) not in stages:
            raise Untranslatable(f"{source} stage {str(stage_id)[:64]!r} is not in the gateway mapping")
        return stages[str(stage_id)]


def load_stage_map(path: Path | None) -> StageMap:
    if path is None:
        return StageMap()
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsInvalid(f"CRM_PULSE_GATEWAY_MAPPING={path}: {exc}") from None
    if unknown := set(doc) - {"currency", "hubspot", "pipedrive", "salesforce"}:
        raise SettingsInvalid(f"CRM_PULSE_GATEWAY_MAPPING={path}: unknown {', '.join(sorted(unknown))}")

    def by_pipeline(vendor: str) -> dict[str, tuple[str, str]]:
        pipelines = doc.get(vendor, {}).get("pipelines", {})
        return {str(stage_id): (str(pipeline), stage) for pipeline, stages in pipelines.items()
                for stage_id, stage in stages.items()}  # fmt: skip

    salesforce = {name: (None, stage) for name, stage in doc.get("salesforce", {}).get("stages", {}).items()}
    stages = StageMap(by_pipeline("hubspot"), by_pipeline("pipedrive"), salesforce, doc.get("currency", "USD"))
    for vendor in ("hubspot", "pipedrive", "salesforce"):
        for stage_id, (_, stage) in getattr(stages, vendor).items():
            if not isinstance(stage, str):
                raise SettingsInvalid(f"CRM_PULSE_GATEWAY_MAPPING={path}: {vendor} stage {stage_id!r} must map to a "
                                      f"stage name (a string)")  # fmt: skip
    return stages


# --- verification -----------------------------------------------------------------------------------------


def secret_bytes(secret) -> bytes:
    return secret.get_secret_value().encode()


def is_timestamp(value: str) -> bool:
    """ASCII digits, few enough for int() (which refuses over 4,300 digits) and for any time to come."""
    return value.isascii() and value.isdigit() and len(value) <= 15


# HubSpot's v3 signature covers the URI with these percent-escapes, and only these, decoded
# (https://developers.hubspot.com/docs/api/webhooks/validating-requests).
HUBSPOT_V3_DECODED = re.compile(r"%(3A|2F|3F|40|21|24|27|28|29|2A|2C|3B)", re.IGNORECASE)


def verify_hubspot(secret: bytes, method: str, uri: str, body: bytes, headers, now_ms: int) -> None:
    """`uri` as the request was sent (its percent-escapes as they came). HubSpot sends the v3 signature alongside
    an older one, and X-HubSpot-Signature-Version names the older one: v3, when present, is the one checked, so
    that its timestamp refuses replays; v1/v2 only for requests that carry nothing newer."""
    if "X-HubSpot-Signature-v3" in headers:
        given, timestamp = headers["X-HubSpot-Signature-v3"], headers.get("X-HubSpot-Request-Timestamp", "")
        if not given or not is_timestamp(timestamp):
            raise unauthenticated("hubspot", "missing_signature",
                                  "X-HubSpot-Signature-v3 and X-HubSpot-Request-Timestamp (epoch milliseconds) are required")
        # HubSpot refuses only older than 5 minutes; one from further ahead of this clock is no fresher.
        if abs(now_ms - int(timestamp)) > REPLAY_WINDOW_MS:
            raise unauthenticated("hubspot", "stale_timestamp",
                                  "X-HubSpot-Request-Timestamp is more than 5 minutes away")
        signed_uri = HUBSPOT_V3_DECODED.sub(lambda escape: chr(int(escape[1], 16)), uri)
        digest = hmac.new(secret, method.encode() + signed_uri.encode() + body + timestamp.encode(), hashlib.sha256)
        expected = base64.b64encode(digest.digest()).decode()
    else:
        version = headers.get("X-HubSpot-Signature-Version", "v1")
        if version not in ("v1", "v2"):
            raise unauthenticated("hubspot", "bad_signature", f"unknown X-HubSpot-Signature-Version {version[:16]!r}")
        given = headers.get("X-HubSpot-Signature")
        if not given:
            raise unauthenticated("hubspot", "missing_signature",
                                  "X-HubSpot-Signature-v3 or X-HubSpot-Signature is required")
        signed = secret + body if version == "v1" else secret + method.encode() + uri.encode() + body
        expected = hashlib.sha256(signed).hexdigest()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise unauthenticated("hubspot", "bad_signature", "the signature does not match")


def verify_basic(username: str, password: bytes, authorization: str | None) -> None:
    try:
        given = BasicAuth.decode(authorization or "")
    except ValueError:
        raise unauthenticated("pipedrive", "missing_credentials", "HTTP Basic credentials are required") from None
    # Both compared whatever the first gives, so the time taken says nothing about which was wrong.
    user_ok = hmac.compare_digest(given.login.encode(), username.encode())
    if not (hmac.compare_digest(given.password.encode(), password) and user_ok):
        raise unauthenticated("pipedrive", "bad_credentials", "wrong credentials")


def verify_signed_events(secret: bytes, body: bytes, header: str | None, now_ms: int) -> None:
    parts = dict(part.split("=", 1) for part in (header or "").split(",") if "=" in part)
    timestamp, given = parts.get("t", ""), parts.get("v1")
    if not given or not is_timestamp(timestamp):
        raise unauthenticated("events", "missing_signature",
                              f"{EVENTS_SIGNATURE_HEADER}: t=<unix seconds>,v1=<hex> is required")
    if abs(now_ms - int(timestamp) * 1000) > REPLAY_WINDOW_MS:
        raise unauthenticated("events", "stale_timestamp", "the signature's timestamp is more than 5 minutes away")
    if not hmac.compare_digest(given.encode(), signature(secret, timestamp, body).removeprefix("sha256=").encode()):
        raise unauthenticated("events", "bad_signature", "the signature does not match")


# --- translation ------------------------------------------------------------------------------------------


@dataclass
class Translated:
    """What one request gave: contract events, and dead letters (reason, detail, the notification's bytes)."""

    events: list[dict] = field(default_factory=list)
    dead: list[tuple[str, str, bytes]] = field(default_factory=list)


def lead_event(kind: str, delivery: str, source: str, lead_id: str, at: object, payload: dict, **envelope) -> dict:
    return {"event_id": event_id(source, delivery, kind), "type": kind, "occurred_at": at, "lead_id": lead_id,
            "payload": payload, **{k: v for k, v in envelope.items() if v is not None}}  # fmt: skip


def remember(store: dict, key: str, value) -> None:
    """Bounded: the oldest entry goes first, so a gateway that has seen every deal keeps the latest ones."""
    store.pop(key, None)
    store[key] = value
    if len(store) > REMEMBERED_DEALS:
        del store[next(iter(store))]


def day_start(date: str) -> str:
    """A close date the CRM gives as a day ("2026-03-31") as the contract's time: its start, in UTC."""
    return f"{date}T00:00:00Z" if len(date) == 10 else date


def deal_updated(source: str, delivery: str, lead_id: str, at: object, amount: float, currency: str, close_date: object,
                 forecast_category: str | None, **envelope) -> dict:  # fmt: skip
    payload = {"amount": amount, "currency": currency, "close_date": close_date}
    if forecast_category is not None:
        payload["forecast_category"] = forecast_category
    return lead_event("deal.updated", delivery, source, lead_id, at, payload, **envelope)


def closing_or_change(source: str, delivery: str, lead_id: str, at: object, stage: str, amount: float,
                      currency: str, lost_reason: str | None, **envelope) -> dict:  # fmt: skip
    """A move into `stage`: deal.won, deal.lost, or a lead.stage_changed whose previous stage the CRM does not say."""
    if stage == "won":
        payload = {"amount": amount, "currency": currency}
        return lead_event("deal.won", delivery, source, lead_id, at, payload, **envelope)
    if stage == "lost":
        return lead_event("deal.lost", delivery, source, lead_id, at, {"reason": lost_reason or "lost"}, **envelope)
    return lead_event("lead.stage_changed", delivery, source, lead_id, at, {"from": UNKNOWN_STAGE, "to": stage},
                      **envelope)


# Generic subscriptions (`object.creation`, `object.propertyChange`) name the object type by id instead
# (https://developers.hubspot.com/changelog/public-beta-generic-webhook-subscriptions).
HUBSPOT_OBJECT_TYPES = {"0-1": "contact", "0-3": "deal"}


class HubSpot:
    """HubSpot webhooks (a JSON array of up to 100 events): deal.creation, deal.propertyChange on dealstage,
    amount, closedate and hs_forecast_category, contact.creation, or their generic `object.*` forms. HubSpot
    sends only a property's new value: a stage change's `from` is unknown, and the deal's other fields are the
    last changes this gateway saw for it (a won deal's amount 0 if none)."""

    def __init__(self, stages: StageMap):
        # By deal: {"amount": float, "close_date": epoch ms or ISO, "forecast_category": contract name or None}.
        self.stages, self.deals = stages, {}

    def deal_change(self, deal: str, delivery: str, at: object, name: str, value: object) -> list[dict]:
        """Remember the changed field; a deal.updated with the deal's fields once its amount and close date are
        known (the contract's snapshot needs both, and an amount guessed as 0 would read as a cut). A cleared
        field ("") is forgotten."""
        fields = dict(self.deals.get(deal, {}))
        if name == "amount":
            try:
                fields["amount"] = float(value)
            except (TypeError, ValueError):
                fields.pop("amount", None)
        elif name == "closedate":
            text = str(value or "")
            # HubSpot sends date properties as epoch milliseconds; anything else goes to the contract as it came.
            fields["close_date"] = int(text) if is_timestamp(text) else (text or None)
        else:
            fields["forecast_category"] = HUBSPOT_FORECAST.get(str(value).upper())
        remember(self.deals, deal, fields)
        if fields.get("close_date") is None or fields.get("amount") is None:
            return []
        return [deal_updated("hubspot", delivery, deal, at, fields["amount"], self.stages.currency,
                             fields["close_date"], fields.get("forecast_category"))]  # fmt: skip

    def one(self, item: dict) -> list[dict]:
        kind, object_id = item.get("subscriptionType"), item.get("objectId")
        if isinstance(kind, str) and kind.startswith("object."):
            kind = f"{HUBSPOT_OBJECT_TYPES.get(item.get('objectTypeId'))}.{kind.removeprefix('object.')}"
        delivery = f"{item.get('portalId')}:{item['eventId']}"
        at = item["occurredAt"]
        if kind == "contact.creation":
            contact = f"hubspot-contact-{object_id}"
            return [lead_event("lead.created", delivery, "hubspot", contact, at, {"source": "hubspot"})]
        deal = f"hubspot-deal-{object_id}"
        if kind == "deal.creation":
            return [lead_event("lead.created", delivery, "hubspot", deal, at, {"source": "hubspot"})]
        if kind == "deal.propertyChange" and item.get("propertyName") in ("amount", "closedate", "hs_forecast_category"):
            return self.deal_change(deal, delivery, at, item["propertyName"], item.get("propertyValue"))
        if kind == "deal.propertyChange" and item.get("propertyName") == "dealstage":
            pipeline, stage = self.stages.stage("hubspot", item.get("propertyValue"))
            return [closing_or_change("hubspot", delivery, deal, at, stage, self.deals.get(deal, {}).get("amount", 0.0),
                                      self.stages.currency, str(item.get("propertyValue")), pipeline=pipeline)]  # fmt: skip
        return []

    def translate(self, body: bytes) -> Translated:
        items = parse_json(body)
        if not isinstance(items, list) or not all(isinstance(i, dict) and "eventId" in i and "occurredAt" in i
                                                  for i in items):  # fmt: skip
            raise Refused(400, "bad_request",
                          "expected a JSON array of HubSpot events, each with eventId and occurredAt")
        return translate_each("hubspot", items, self.one)


def translate_each(source: str, items: list, one: Callable[[object], list[dict]],
                   original: Callable[[object], bytes] = orjson.dumps) -> Translated:  # fmt: skip
    """Each notification's events, or its dead letter (with `original(notification)`): one poison notification
    does not hold back the others."""
    out = Translated()
    for item in items:
        try:
            out.events.extend(one(item))
        except (Untranslatable, AttributeError, KeyError, TypeError, ValueError) as exc:
            reason = "unknown_stage" if isinstance(exc, Untranslatable) else "missing_field"
            TRANSLATION_FAILURES.labels(source, reason).inc()
            out.dead.append(("untranslatable", f"{reason}: {exc}", original(item)))
    return out


def parse_json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused(400, "bad_request", f"unparseable JSON: {exc}") from None


def pipedrive_time(value: str) -> str:
    """v2 times are ISO-8601 with Z; v1's "2019-04-02 09:09:57" are UTC."""
    return value if "T" in value else value.replace(" ", "T") + "Z"


class Pipedrive:
    """Pipedrive webhooks v1 (`event: "updated.deal"`, `current`, `previous`) and v2 (`meta.action`,
    `meta.entity`, `data`, `previous` holding only the changed fields)."""

    def __init__(self, stages: StageMap):
        self.stages = stages

    def translate(self, body: bytes) -> Translated:
        doc = parse_json(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
            raise Refused(400, "bad_request", "expected a Pipedrive webhook: a JSON object with meta")
        return translate_each("pipedrive", [doc], self.one)

    def one(self, doc: dict) -> list[dict]:
        meta = doc["meta"]
        if "event" in doc or meta.get("v") == 1:  # v1
            action, entity = doc["event"].split(".", 1)
            current, previous = doc.get("current") or {}, doc.get("previous") or {}
            delivery = f"v1:{entity}:{meta['id']}:{meta['timestamp_micro']}"
            action = {"added": "create", "updated": "change"}.get(action, action)
        else:
            action, entity = meta["action"], meta["entity"]
            current, previous = doc.get("data") or {}, doc.get("previous") or {}
            delivery = str(meta["id"])
        if entity == "activity" and action == "create" and current.get("deal_id"):
            kind = current.get("type") if current.get("type") in ("call", "email", "meeting") else "note"
            return [lead_event("lead.activity", delivery, "pipedrive", f"pipedrive-deal-{current['deal_id']}",
                               pipedrive_time(current["add_time"]), {"kind": kind, "direction": "outbound"},
                               rep_id=self.rep(current))]  # fmt: skip
        if entity != "deal" or action not in ("create", "change"):
            return []
        lead_id, rep_id = f"pipedrive-deal-{current['id']}", self.rep(current)
        if action == "create":
            pipeline, stage = self.stages.stage("pipedrive", current["stage_id"])
            at = pipedrive_time(current["add_time"])
            created = [lead_event("lead.created", delivery, "pipedrive", lead_id, at,
                                  {"source": "pipedrive", "stage": stage}, pipeline=pipeline, rep_id=rep_id)]  # fmt: skip
            return created + self.snapshot(current, delivery, lead_id, at, pipeline, rep_id)
        at, events = pipedrive_time(current["update_time"]), []
        if "stage_id" in previous and previous["stage_id"] != current["stage_id"]:
            _, before = self.stages.stage("pipedrive", previous["stage_id"])
            pipeline, stage = self.stages.stage("pipedrive", current["stage_id"])
            events.append(lead_event("lead.stage_changed", delivery, "pipedrive", lead_id, at,
                                     {"from": before, "to": stage}, pipeline=pipeline, rep_id=rep_id))  # fmt: skip
        if "status" in previous and previous["status"] != current["status"] and current["status"] in ("won", "lost"):
            pipeline, _ = self.stages.stage("pipedrive", current["stage_id"])
            currency = current.get("currency") or self.stages.currency
            events.append(closing_or_change("pipedrive", delivery, lead_id, at, current["status"],
                                            float(current.get("value") or 0), currency, current.get("lost_reason"),
                                            pipeline=pipeline, rep_id=rep_id))  # fmt: skip
        # v1's `previous` is the whole deal, v2's only the changed fields: a field changed if it is there and differs.
        changed = any(name in previous and previous[name] != current.get(name)
                      for name in ("value", "currency", "expected_close_date"))  # fmt: skip
        if changed:
            pipeline, _ = self.stages.stage("pipedrive", current["stage_id"])
            events += self.snapshot(current, delivery, lead_id, at, pipeline, rep_id)
        return events

    def snapshot(self, current: dict, delivery: str, lead_id: str, at: str, pipeline: str | None,
                 rep_id: str | None) -> list[dict]:  # fmt: skip
        """The deal's deal.updated: none without an expected close date (nothing to snapshot), nor once closed (a
        won deal's amount is its deal.won's)."""
        if current.get("status", "open") != "open" or not current.get("expected_close_date"):
            return []
        return [deal_updated("pipedrive", delivery, lead_id, at, float(current.get("value") or 0),
                             current.get("currency") or self.stages.currency, day_start(current["expected_close_date"]),
                             None, pipeline=pipeline, rep_id=rep_id)]  # fmt: skip

    @staticmethod
    def rep(current: dict) -> str | None:
        owner = current.get("owner_id", current.get("user_id"))
        return f"pipedrive-user-{owner}" if owner is not None else None


class Salesforce:
    """Salesforce Outbound Messages on Opportunity: a SOAP `notifications` of up to 100 `Notification`s."""

    def __init__(self, stages: StageMap, organization_id: str):
        self.stages, self.organization_id = stages, organization_id
        # By opportunity, the last StageName and (Amount, CloseDate, ForecastCategoryName) seen, each with the
        # delivery that first carried it: a notification carries the whole record, not what changed, so an edit of
        # the amount alone is no stage change. That same delivery again (a retry after a 503) gives its events again.
        self.stage_names: dict[str, tuple[str, str]] = {}
        self.snapshots: dict[str, tuple[tuple, str]] = {}

    @staticmethod
    def seen_before(store: dict, key: str, value, delivery: str) -> bool:
        """Whether another delivery carried `value` last; remembers `value` with `delivery` if it is new."""
        last = store.get(key)
        if last is not None and last[0] == value:
            return last[1] != delivery
        remember(store, key, (value, delivery))
        return False

    def translate(self, body: bytes) -> Translated:
        if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
            raise Refused(400, "bad_request", "a DOCTYPE or ENTITY declaration has no place in an outbound message")
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError as exc:
            raise Refused(400, "bad_request", f"unparseable XML: {exc}") from None
        notifications = root.find(f".//{{{SALESFORCE_OUTBOUND}}}notifications")
        if notifications is None:
            raise Refused(400, "bad_request", "expected a SOAP envelope with an outbound-message notifications element")
        organization = notifications.findtext(f"{{{SALESFORCE_OUTBOUND}}}OrganizationId") or ""
        # 15- and 18-character ids name the same org: the 18 adds a case-safe suffix.
        if not organization or not hmac.compare_digest(organization[:15].encode(), self.organization_id[:15].encode()):
            VERIFICATION_FAILURES.labels("salesforce", "wrong_organization").inc()
            raise Refused(403, "unauthenticated", "OrganizationId is not the configured organization")
        return translate_each("salesforce", notifications.findall(f"{{{SALESFORCE_OUTBOUND}}}Notification"), self.one,
                              ElementTree.tostring)  # fmt: skip

    def one(self, notification) -> list[dict]:
        sobject = notification.find(f"{{{SALESFORCE_OUTBOUND}}}sObject")
        if sobject is None:
            raise KeyError("sObject")
        fields = {child.tag.rsplit("}", 1)[-1]: (child.text or "") for child in sobject}
        lead_id, at = f"salesforce-opportunity-{fields['Id']}", fields["LastModifiedDate"]
        # Salesforce sends a queued notification with the record as it is when sent, not as it was when queued:
        # two notifications may carry the same state (the close, twice). The state, not the notification Id,
        # names the event; a redelivery carries the same state or a newer one.
        delivery = f"{fields['Id']}:{at}"
        envelope = {"rep_id": f"salesforce-user-{fields['OwnerId']}" if fields.get("OwnerId") else None,
                    "account_id": fields.get("AccountId") or None}  # fmt: skip
        amount = float(fields.get("Amount") or 0)
        if fields.get("IsClosed") == "true":
            stage = "won" if fields.get("IsWon") == "true" else "lost"
            # The deal closed on CloseDate (a date), but the KPIs' clock is when it was recorded.
            return [closing_or_change("salesforce", delivery, lead_id, at, stage, amount, self.stages.currency,
                                      fields.get("StageName"), **envelope)]  # fmt: skip
        _, stage = self.stages.stage("salesforce", fields["StageName"])
        events = []
        if fields.get("CreatedDate") and fields.get("CreatedDate") == fields.get("LastModifiedDate"):
            events.append(lead_event("lead.created", delivery, "salesforce", lead_id, at,
                                     {"source": "salesforce", "stage": stage}, **envelope))  # fmt: skip
        elif not self.seen_before(self.stage_names, fields["Id"], fields["StageName"], delivery):
            events.append(lead_event("lead.stage_changed", delivery, "salesforce", lead_id, at,
                                     {"from": UNKNOWN_STAGE, "to": stage}, **envelope))  # fmt: skip
        snapshot = (amount, fields.get("CloseDate") or None, fields.get("ForecastCategoryName") or None)
        if snapshot[1] is not None and not self.seen_before(self.snapshots, fields["Id"], snapshot, delivery):
            events.append(deal_updated("salesforce", delivery, lead_id, at, amount, self.stages.currency,
                                       day_start(snapshot[1]), SALESFORCE_FORECAST.get(snapshot[2] or ""), **envelope))  # fmt: skip
        if events and events[0]["type"] == "lead.created":  # the stage it was created in is the one to compare with
            self.seen_before(self.stage_names, fields["Id"], fields["StageName"], delivery)
        return events


def contract_events(body: bytes) -> Translated:
    """`/webhooks/events`: a JSON array of contract events, forwarded as they are (the worker judges them)."""
    items = parse_json(body)
    if not isinstance(items, list):
        raise Refused(400, "bad_request", "expected a JSON array of contract events")
    return Translated(events=items)


# --- publishing -------------------------------------------------------------------------------------------


Send = Callable[[str, bytes | None, bytes], Awaitable[None]]


@dataclass
class Gateway:
    settings: Settings
    send: Send  # (topic, key, value) → returns once the broker acknowledged it
    ready: Callable[[], Awaitable[bool]]
    stages: StageMap = field(default_factory=StageMap)
    now: Callable[[], datetime] = field(default=lambda: datetime.now(timezone.utc))  # the snooze links' clock

    def __post_init__(self):
        self.hubspot, self.pipedrive = HubSpot(self.stages), Pipedrive(self.stages)
        self.salesforce = Salesforce(self.stages, self.settings.salesforce_organization_id or "")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.gateway_max_body_bytes)
        app.add_routes([web.post(f"/webhooks/{source}", self.handler(source)) for source in SOURCES])
        app.add_routes([web.get("/healthz", self.healthz), web.get("/readyz", self.readyz),
                        web.get("/metrics", self.metrics)])  # fmt: skip
        if self.settings.notify_link_secret:
            app.add_routes(snooze.routes(self.settings, self.send, self.now))
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if await self.ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "broker unreachable"}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def handler(self, source: str):
        async def handle(request: web.Request) -> web.Response:
            try:
                response = await self.receive(source, request)
                REQUESTS.labels(source, "accepted").inc()
                return response
            except Refused as refused:
                REQUESTS.labels(source, refused.outcome).inc()
                return web.json_response({"error": refused.reason}, status=refused.status, headers=refused.headers)

        return handle

    def translator(self, source: str) -> Callable[[bytes], Translated]:
        """The source's translator, or 404 when its secret is not configured: nothing unverified gets in."""
        s = self.settings
        if source == "hubspot" and s.hubspot_client_secret:
            return self.hubspot.translate
        if source == "pipedrive" and s.pipedrive_username and s.pipedrive_password:
            return self.pipedrive.translate
        if source == "salesforce" and s.salesforce_organization_id:
            return self.salesforce.translate
        if source == "events" and s.events_signing_secret:
            return contract_events
        raise Refused(404, "not_configured", f"the {source} webhook is not configured (docs/ingestion.md)")

    async def receive(self, source: str, request: web.Request) -> web.Response:
        translate = self.translator(source)
        content_type = XML_TYPES if source == "salesforce" else JSON_TYPES
        if request.content_type not in content_type:
            raise Refused(415, "unsupported_media_type", f"Content-Type must be {' or '.join(content_type)}")
        limit = self.settings.gateway_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Refused(413, "too_large", f"the body is over {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, "too_large", f"the body is over {limit} bytes") from None
        self.verify(source, request, body)
        started = time.monotonic()
        published, dead_lettered = await self.publish(source, translate(body))
        ACK_SECONDS.labels(source).observe(time.monotonic() - started)
        if source == "salesforce":
            return web.Response(body=SALESFORCE_ACK, content_type="text/xml", charset="utf-8")
        return web.json_response({"published": published, "dead_lettered": dead_lettered})

    def verify(self, source: str, request: web.Request, body: bytes) -> None:
        s, now_ms = self.settings, int(time.time() * 1000)
        if source == "hubspot":
            origin = s.gateway_public_url.rstrip("/") if s.gateway_public_url else f"{request.scheme}://{request.host}"
            uri = origin + request.raw_path  # the path and query as sent: HubSpot signs its own escaping
            verify_hubspot(secret_bytes(s.hubspot_client_secret), request.method, uri, body, request.headers, now_ms)
        elif source == "pipedrive":
            verify_basic(s.pipedrive_username, secret_bytes(s.pipedrive_password), request.headers.get("Authorization"))
        elif source == "events":
            verify_signed_events(secret_bytes(s.events_signing_secret), body,
                                 request.headers.get(EVENTS_SIGNATURE_HEADER), now_ms)  # fmt: skip
        # Salesforce signs nothing: its OrganizationId is checked once the message is parsed.

    async def publish(self, source: str, out: Translated) -> tuple[int, int]:
        """Validate every event as the worker will; send them and the dead letters; return how many of each once
        all are acknowledged, or refuse with 503 so that the CRM delivers the request again."""
        s, sends = self.settings, []
        for event in out.events:
            raw = orjson.dumps(event)
            try:
                crm_event = parse_event(raw)
            except InvalidEvent as error:
                TRANSLATION_FAILURES.labels(source, error.reason).inc()
                out.dead.append((error.reason, error.detail, raw))
                continue
            sends.append((s.input_topic, crm_event.key.encode(), raw))
        for reason, detail, original in out.dead:
            record = dead_letter_record(reason, detail, {"gateway": source}, None, original)
            sends.append((s.dlq_topic, None, orjson.dumps(record)))
        try:
            await asyncio.wait_for(asyncio.gather(*(self.send(*one) for one in sends)), s.gateway_ack_timeout_seconds)
        except Exception as exc:  # noqa: BLE001 - whatever the broker did, the CRM must deliver again
            log.warning("%s: %d message(s) not acknowledged: %r", source, len(sends), exc)
            raise Refused(503, "unavailable", "the broker did not acknowledge the events in time; deliver again",
                          {"Retry-After": "30"}) from None
        published = sum(1 for topic, _, _ in sends if topic == s.input_topic)
        EVENTS_PUBLISHED.labels(source).inc(published)
        return published, len(sends) - published


# --- the server -------------------------------------------------------------------------------------------


async def serve(settings: Settings, stages: StageMap, stop: asyncio.Event) -> None:
    """Run the gateway on the resolved broker until `stop` is set; in-flight requests finish first."""
    from aiokafka import AIOKafkaProducer

    from crm_pulse.broker import aiokafka_security

    # acks=all: a 2xx promises the events survive the loss of the leader.
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5,
                                request_timeout_ms=int(settings.gateway_ack_timeout_seconds * 1000),
                                **aiokafka_security(settings))  # fmt: skip
    await producer.start()

    async def send(topic: str, key: bytes | None, value: bytes) -> None:
        await producer.send_and_wait(topic, value, key=key)

    async def ready() -> bool:
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), 2)
            return True
        except Exception:  # noqa: BLE001 - whatever it is, the broker cannot take events now
            return False

    runner = web.AppRunner(Gateway(settings, send, ready, stages).app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.gateway_host, settings.gateway_port).start()
        log.info("gateway listening on http://%s:%s, publishing to %s", settings.gateway_host, settings.gateway_port,
                 settings.input_topic)  # fmt: skip
        await stop.wait()
    finally:
        await runner.cleanup()
        await producer.stop()
