"""Webhook payloads as the CRMs send them, shaped after their published webhook documentation (docs/ingestion.md
cites it: HubSpot's Webhooks API and request validation, Pipedrive's "Guide for Webhooks" v1 and v2, Salesforce's
Outbound Messaging WSDL), and the signatures and credentials computed here independently of crm_pulse.gateway."""

from __future__ import annotations

import base64
import hashlib
import hmac

import orjson

HUBSPOT_SECRET = "hubspot-client-secret-0123"
PIPEDRIVE_USER, PIPEDRIVE_PASSWORD = "pulse-hook", "pipedrive-password-4567"
SALESFORCE_ORG_18, SALESFORCE_ORG_15 = "00D5g000004ABCDEAZ", "00D5g000004ABCD"
EVENTS_SECRET = "events-secret-89ab"
PORTAL = 62515


def hubspot_event(event_id: int, kind: str, deal: int, at_ms: int, prop: str | None = None, value=None,
                  object_type: str | None = None) -> dict:  # fmt: skip
    """One event of the array HubSpot posts: the fields of its Webhooks API reference; `object_type`, the
    objectTypeId of a generic `object.*` subscription (deals 0-3, contacts 0-1)."""
    event = {"eventId": event_id, "subscriptionId": 1_234_567, "portalId": PORTAL, "appId": 54321,
             "occurredAt": at_ms, "subscriptionType": kind, "attemptNumber": 0, "objectId": deal,
             "objectTypeId": object_type, "changeSource": "CRM_UI",
             "changeFlag": "CREATED" if kind.endswith("creation") else None}  # fmt: skip
    if prop is not None:
        event.update(propertyName=prop, propertyValue=value, sourceId="userId:4242")
    return {k: v for k, v in event.items() if v is not None}


# The escapes HubSpot decodes in the URI it signs for v3, and only these.
V3_DECODED = {"%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$", "%27": "'", "%28": "(",
              "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";"}  # fmt: skip


def hubspot_v3_headers(uri: str, body: bytes, timestamp_ms: int, secret: str = HUBSPOT_SECRET) -> dict:
    """As HubSpot signs: `uri` the target URL as configured, with V3_DECODED's escapes decoded. Real requests
    also carry the v1 signature and X-HubSpot-Signature-Version: v1 (hubspot_v1_headers)."""
    for escape, character in V3_DECODED.items():
        uri = uri.replace(escape, character).replace(escape.lower(), character)
    digest = hmac.new(secret.encode(), b"POST" + uri.encode() + body + str(timestamp_ms).encode(), hashlib.sha256)
    return {"Content-Type": "application/json", "X-HubSpot-Signature-v3": base64.b64encode(digest.digest()).decode(),
            "X-HubSpot-Request-Timestamp": str(timestamp_ms)}  # fmt: skip


def hubspot_v1_headers(body: bytes) -> dict:
    return {"Content-Type": "application/json", "X-HubSpot-Signature-Version": "v1",
            "X-HubSpot-Signature": hashlib.sha256(HUBSPOT_SECRET.encode() + body).hexdigest()}  # fmt: skip


def hubspot_v2_headers(uri: str, body: bytes) -> dict:
    signed = HUBSPOT_SECRET.encode() + b"POST" + uri.encode() + body
    return {"Content-Type": "application/json", "X-HubSpot-Signature-Version": "v2",
            "X-HubSpot-Signature": hashlib.sha256(signed).hexdigest()}  # fmt: skip


def basic(user: str = PIPEDRIVE_USER, password: str = PIPEDRIVE_PASSWORD) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Content-Type": "application/json", "Authorization": f"Basic {token}"}


def pipedrive_v1_deal(action: str, deal: int, stamp_s: int, current: dict, previous: dict | None) -> dict:
    """v1: `event` "added.deal"/"updated.deal", the whole deal in `current` and (updates) `previous`."""
    meta = {"v": 1, "action": action, "object": "deal", "id": deal, "company_id": 7001, "user_id": 9001,
            "host": "acme.pipedrive.com", "timestamp": stamp_s, "timestamp_micro": stamp_s * 1_000_000 + 123,
            "permitted_user_ids": [9001], "trans_pending": False, "is_bulk_update": False,
            "pipedrive_service_name": False, "matches_filters": {"current": []}, "webhook_id": "55"}  # fmt: skip
    return {"v": 1, "matches_filters": {"current": []}, "meta": meta, "current": current, "previous": previous,
            "event": f"{action}.deal", "retry": 0}  # fmt: skip


def pipedrive_v1_current(deal: int, stage_id: int, status: str, add: str, update: str, value: float = 0) -> dict:
    return {"id": deal, "title": f"Deal {deal}", "value": value, "currency": "EUR", "status": status,
            "stage_id": stage_id, "pipeline_id": 1, "user_id": 9001, "add_time": add, "update_time": update,
            "lost_reason": "price" if status == "lost" else None}  # fmt: skip


def pipedrive_v2(event_uuid: str, action: str, entity: str, data: dict, previous: dict | None, stamp: str) -> dict:
    """v2: `meta.action` create/change/delete, `meta.entity`, the object in `data`, the changed fields' old
    values in `previous`."""
    meta = {"action": action, "entity": entity, "company_id": "7001", "correlation_id": "c0ffee", "entity_id":
            str(data["id"]), "id": event_uuid, "is_bulk_edit": False, "timestamp": stamp, "type": "general",
            "user_id": "9001", "version": "2.0", "webhook_id": "56", "webhook_owner_id": "9001", "attempt": 1,
            "host": "acme.pipedrive.com", "change_source": "app", "permitted_user_ids": ["9001"]}  # fmt: skip
    return {"data": data, "previous": previous, "meta": meta}


def salesforce_message(notifications: list[tuple[str, dict]], org: str = SALESFORCE_ORG_18) -> bytes:
    """An Outbound Message: `notifications` of (notification Id, Opportunity fields). The WSDL's ids (organization,
    action, notification, record) are 18 characters."""
    items = "".join(
        f"<Notification><Id>{nid}</Id><sObject xsi:type=\"sf:Opportunity\" "
        f"xmlns:sf=\"urn:sobject.enterprise.soap.sforce.com\">"
        + "".join(f"<sf:{name}>{value}</sf:{name}>" for name, value in fields.items())
        + "</sObject></Notification>"
        for nid, fields in notifications
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        '<soapenv:Body><notifications xmlns="http://soap.sforce.com/2005/09/outbound">'
        f"<OrganizationId>{org}</OrganizationId><ActionId>04k5g000000AbCdAAK</ActionId>"
        '<SessionId xsi:nil="true"/><EnterpriseUrl>https://acme.my.salesforce.com/services/Soap/c/60.0/00D5g000004ABCD'
        "</EnterpriseUrl><PartnerUrl>https://acme.my.salesforce.com/services/Soap/u/60.0/00D5g000004ABCD</PartnerUrl>"
        f"{items}</notifications></soapenv:Body></soapenv:Envelope>"
    ).encode()


def opportunity(opp: str, stage: str, created: str, modified: str, amount: float = 0, closed: bool = False,
                won: bool = False, close_date: str | None = None, forecast: str | None = None) -> dict:  # fmt: skip
    """The Opportunity fields an Outbound Message sends: those its action selects, `CloseDate` (a date) and
    `ForecastCategoryName` only when given."""
    fields = {"Id": opp, "AccountId": "0015g00000XyZ12AAB", "Amount": amount, "CloseDate": close_date,
              "CreatedDate": created, "ForecastCategoryName": forecast, "IsClosed": str(closed).lower(),
              "IsWon": str(won).lower(), "LastModifiedDate": modified, "OwnerId": "0055g00000Rep01AAA",
              "StageName": stage}  # fmt: skip
    return {name: value for name, value in fields.items() if value is not None}


SALESFORCE_HEADERS = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}


def events_headers(body: bytes, timestamp_s: int, secret: str = EVENTS_SECRET) -> dict:
    mac = hmac.new(secret.encode(), f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-CRM-Pulse-Signature": f"t={timestamp_s},v1={mac}"}


def dumps(value) -> bytes:
    return orjson.dumps(value)
