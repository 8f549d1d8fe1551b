"""Changelog seals, on Tansu only: the changelog partitions a worker gives up end with a batch of one record,
so that the worker restoring them next reads them to their true end (see docs/reliability.md)."""

from __future__ import annotations

from crm_pulse.agents.app import Pipeline
from crm_pulse.broker import CHANGELOG_SEAL_KEY


async def seal_given_up_changelogs(pipeline: Pipeline, partitions: set[int]) -> None:
    """The changelog partitions this worker gives up end with a batch of one record, for the worker that
    restores them next (see `crm_pulse.broker.seal_changelogs`, which does the same before a start): on
    Tansu only, whose end offsets stop short of a partition's last batch."""
    if not pipeline.settings.on_tansu:
        return
    producer = pipeline.app.producer
    await producer.flush()
    for table in pipeline.app.tables.values():
        changelog = table.changelog_topic
        key, _ = changelog.prepare_key(CHANGELOG_SEAL_KEY, table.key_serializer)
        for partition in partitions & set(range(table.partitions)):
            # Raw None, not a serialized null: only that is a tombstone the stores delete on recovery.
            await producer.send(changelog.get_topic_name(), key, None, partition, None, None)
    await producer.flush()


def install(pipeline: Pipeline) -> None:
    app = pipeline.app

    @app.on_partitions_revoked.connect
    async def seal_revoked_changelogs(sender, revoked, **kwargs) -> None:
        await seal_given_up_changelogs(pipeline, {tp.partition for tp in revoked})

    @app.on_before_shutdown.connect
    async def seal_changelogs_on_shutdown(sender, **kwargs) -> None:
        await seal_given_up_changelogs(pipeline, {tp.partition for tp in app.consumer.assignment()})
