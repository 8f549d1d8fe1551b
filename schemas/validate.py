"""Bytes off the wire → a validated event, or `InvalidEvent` with a machine-readable reason."""

from __future__ import annotations

import orjson
from pydantic import ValidationError

from crm_pulse.schemas.events import EVENT_ADAPTER, EVENT_TYPES, SCHEMA_VERSION, CrmEvent

MAX_EVENT_BYTES = 64 * 1024

# Reasons are metric label values, so the set is closed.
REASONS = (
    "oversized",
    "malformed_json",
    "not_an_object",
    "unsupported_version",
    "unknown_type",
    "bad_timestamp",
    "invalid_field",
    "late",
)


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_event(raw: bytes | None) -> CrmEvent:
    if raw is None or len(raw) == 0:
        raise InvalidEvent("malformed_json", "empty message")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversized", f"{len(raw)} bytes > {MAX_EVENT_BYTES}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("malformed_json", str(exc)) from None
    if not isinstance(doc, dict):
        raise InvalidEvent("not_an_object", f"top-level JSON is {type(doc).__name__}")
    version = doc.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:  # not True, 1.0 or "1"
        raise InvalidEvent("unsupported_version", f"schema_version {version!r} (this worker reads {SCHEMA_VERSION})")
    if doc.get("type") not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"type {str(doc.get('type'))[:64]!r} is not one of {', '.join(EVENT_TYPES)}")
    try:
        return EVENT_ADAPTER.validate_python(doc)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in errors)
        reason = "bad_timestamp" if any(err["loc"][1:2] == ("occurred_at",) for err in errors) else "invalid_field"
        raise InvalidEvent(reason, detail) from None
