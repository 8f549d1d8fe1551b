"""Write the JSON Schema of every published contract into schemas/jsonschema/ (`python -m schemas.generate`)."""

from __future__ import annotations

from pathlib import Path

import orjson

from crm_pulse.schemas.events import EVENT_ADAPTER
from crm_pulse.schemas.records import Alert, DeadLetter, DealAlert, NotificationDeadLetter

SCHEMA_DIR = Path(__file__).with_name("jsonschema")


def schemas() -> dict[str, dict]:
    return {
        "crm-event.v1.schema.json": EVENT_ADAPTER.json_schema(by_alias=True) | {"title": "CRM event v1"},
        "crm-alert.v1.schema.json": Alert.model_json_schema() | {"title": "crm-alerts record v1"},
        "crm-alert.v2.schema.json": DealAlert.model_json_schema() | {"title": "crm-alerts record v2 (deal alerts)"},
        "crm-dead-letter.v1.schema.json": DeadLetter.model_json_schema() | {"title": "crm-events-dlq record v1"},
        "crm-notification-dead-letter.v1.schema.json": NotificationDeadLetter.model_json_schema()
        | {"title": "<app id>-notify-dlq record v1"},
    }


def render(schema: dict) -> bytes:
    return orjson.dumps(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema},
        option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
    ) + b"\n"


def main() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, schema in schemas().items():
        (SCHEMA_DIR / name).write_bytes(render(schema))
        print(f"wrote {SCHEMA_DIR / name}")


if __name__ == "__main__":
    main()
