"""How the worker's Faust app is wired where Faust's defaults do not fit: the fetch wait its consumer asks
the broker for, and the codec its tables write with."""

import asyncio

import orjson

import agents.worker  # noqa: F401  (registers every table)
from agents.app import app, settings


def test_the_consumer_asks_the_broker_to_hold_an_empty_fetch_no_longer_than_configured():
    async def build():
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        await consumer.stop()  # never started: only releases what construction took
        return consumer

    consumer = asyncio.run(build())
    # Faust's own value is 1,500 ms, which the embedded broker holds in full before answering.
    assert consumer._fetch_max_wait_ms == settings.fetch_max_wait_ms == 20


def test_every_table_writes_its_changelog_and_store_with_orjson():
    state = {"days": {"20400": {"leads": 3}}, "applied": {"leads@x:0": [7, 1]}, "share": 0.25}
    for table in app.tables.values():
        # Table.send_changelog encodes with the table's serializer; the store decodes what recovery reads.
        assert table.value_serializer == table.data.value_serializer == "orjson", table.name
        encoded, _headers = table.changelog_topic.prepare_value(state, table.value_serializer)
        assert encoded == orjson.dumps(state) and table.data._decode_value(encoded) == state, table.name
