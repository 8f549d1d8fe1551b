"""The Faust app of one pipeline, its topics and tables, and the shared clock, built from the settings it is
given (`crm_pulse.agents.worker.build_app` adds the agents); the corrections to Faust it runs with are in
faust_fixes, the changelog seals in changelog_seals."""

from __future__ import annotations

from typing import TYPE_CHECKING

import faust
import orjson
from faust.serializers import codecs

from crm_pulse.broker import DEAD_LETTER_MAX_BYTES, key_partition, ssl_context
from crm_pulse.agents.faust_fixes import App
from crm_pulse.config import Settings
from crm_pulse.streams.clock import Clock

if TYPE_CHECKING:
    from crm_pulse.agents.aggregates import Aggregates
    from crm_pulse.agents.customers import Customers
    from crm_pulse.agents.deals import Deals
    from crm_pulse.agents.gauges import Gauges
    from crm_pulse.agents.ingest import Ingest
    from crm_pulse.agents.leads import Leads
    from crm_pulse.agents.signals import Signals


class OrjsonCodec(codecs.Codec):
    def _dumps(self, obj) -> bytes:
        return orjson.dumps(obj)

    def _loads(self, s: bytes):
        return orjson.loads(s)


codecs.register("orjson", OrjsonCodec())

DAY_S = 86400


def _credentials(settings: Settings):
    # The protocol decides: a SASL mechanism left set beside SECURITY_PROTOCOL=SSL must not drop TLS.
    tls = ssl_context(settings) if settings.security_protocol in ("SSL", "SASL_SSL") else None
    if settings.security_protocol.startswith("SASL_"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value() if settings.sasl_password else None,
            mechanism=settings.sasl_mechanism,
            ssl_context=tls,
        )
    return faust.SSLCredentials(tls) if tls else None


def new_app(settings: Settings) -> App:
    app = App(
        settings.app_id,
        broker=settings.broker,
        broker_credentials=_credentials(settings),
        # Both brokers: a worker that died stays in the group until its session times out, holding back the
        # rebalance that hands its partitions on (Faust's default is 60 s). Tansu also needs these for quick joins.
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        store=settings.store,
        recovery_consistency_check=settings.effective_recovery_consistency_check,
        datadir=settings.data_dir,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        key_serializer="raw",
        value_serializer="orjson",
        web_bind=settings.metrics_host,
        web_host=settings.metrics_host,
        web_port=settings.metrics_port,
        # Standby copies would live in the same in-memory store and be counted as this worker's own.
        table_standby_replicas=0,
        # A dead letter carries its input base64-encoded (4/3 of its size): room for any input the broker took.
        producer_max_request_size=DEAD_LETTER_MAX_BYTES,
        # A batch's changelog records go out as one producer batch per partition (agents.batches.
        # write_changelogged), as many as fit this size: Faust's 16 KiB held a few lead states each. Below
        # Apache Kafka's default limit on a record batch (1 MiB), which a changelog topic keeps.
        producer_max_batch_size=512 * 1024,
        # Apache Kafka: a topic Faust has just created may be missing from the metadata the group leader
        # assigns with (KRaft publishes it a moment later); the leader rebalances once its metadata shows the
        # topic, which by default it refreshes every 5 minutes: all that time nobody read it.
        consumer_metadata_max_age_ms=5_000,
        autodiscover=False,
    )
    app.fetch_max_wait_ms = settings.effective_fetch_max_wait_ms
    return app


class Pipeline:
    """One Faust app with the topics, tables and clock its agents share. `worker.build_app` installs each
    KPI family on it and keeps what each family returns (its tables and in-memory state) as an attribute."""

    aggregates: Aggregates
    customers: Customers
    deals: Deals
    ingest: Ingest
    leads: Leads
    signals: Signals
    gauges: Gauges

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = new_app(settings)
        self.app.on_partitions_assigned.connect(self.drop_keys_now_owned_elsewhere)
        # Latest event time per input partition, keyed by the partition it describes and written while reading
        # it, so it is restored with that partition when a worker restarts or takes it over.
        self.event_time = self.table("event-time", default=None)
        self.clock = Clock(settings.clock, int(settings.grace_seconds * 1000), saved=self.event_time)
        self.input_topic = self.app.topic(settings.input_topic, key_serializer="raw", value_serializer="raw")
        self.alerts_topic = self.app.topic(settings.alerts_topic, value_serializer="orjson")
        self.dlq_topic = self.app.topic(settings.dlq_topic, value_serializer="orjson")
        # Validated events, re-keyed by their own entity whatever key the producer used, one topic per family:
        # a topic several agents read hands each message to all their queues, and Faust clears queues on
        # rebalance and shutdown, so a message one agent took and another lost is never acknowledged (the
        # commit sticks there, and shutdown waits for it forever). Packed per ingest batch into one message per
        # partition (see agents.ingest.Envelopes).
        self.family_topics = {
            family: self.internal_topic(f"{family}-events") for family in ("lead", "customer", "signal")
        }
        # Deltas for the keyed aggregates: histograms by "dwell:<stage>" / "cycle:all" / "resolution:all",
        # KPI sums by scope ("all", "rep:<id>", "source:<s>", ...), churn spells by "all", rep activity by "rep:<id>".
        self.histogram_deltas_topic = self.internal_topic("histogram-deltas")
        self.sums_deltas_topic = self.internal_topic("kpi-sum-deltas")
        self.churn_deltas_topic = self.internal_topic("churn-deltas")
        self.actor_activity_topic = self.internal_topic("actor-activity")
        # Closed deals' outcomes, keyed by pipeline, for stage conversion and P(win | stage) (agents/deals.py).
        self.outcome_deltas_topic = self.internal_topic("deal-outcome-deltas")
        # Stall levels the timer raised, keyed by lead: the lead agent folds them into the lead's state.
        self.stall_levels_topic = self.internal_topic("stall-levels")
        # Daily buckets are kept for the longest window (and the one before it, for growth rates) plus grace.
        self.retention_days = 60 + int(settings.grace_seconds // DAY_S) + 2
        # Event ids are kept this far behind the slowest input partition's latest event (its watermark + grace).
        self.forget_behind_watermark_ms = int((settings.dedupe_horizon_seconds - settings.grace_seconds) * 1000)

    def table(self, name: str, default=dict) -> faust.Table:
        """A table keyed by str, partitioned like every topic here, its values written with orjson: for
        untyped values Faust picks its stdlib json codec, which made serialising the large aggregate states
        a visible share of the worker's time. (Keys keep Faust's json: their bytes are their changelog identity.)"""
        created = self.app.Table(name, default=default, partitions=self.settings.partitions, key_type=str)
        # Read by every changelog write and when the store is made (lazily, after this).
        created.value_serializer = "orjson"
        return created

    def internal_topic(self, suffix: str) -> faust.TopicT:
        return self.app.topic(
            f"{self.settings.app_id}-{suffix}", internal=True, partitions=self.settings.partitions, key_type=str
        )

    async def drop_keys_now_owned_elsewhere(self, sender, assigned, **kwargs) -> None:
        """The in-memory store keeps every key it ever held; after a rebalance, keys of partitions another
        worker now owns would be exported and scanned twice. (RocksDB stores filter by partition themselves.)
        A table's own partitions are those of its changelog: the assignment spans every topic, and a partition
        number held of one topic (the single partition of Faust's leader topic, say) says nothing of another."""
        def held(topic: str) -> set[int]:
            return {tp.partition for tp in assigned if tp.topic == topic}

        self.clock.keep_only(held(self.input_topic.get_topic_name()))
        for table in self.app.tables.values():
            local = getattr(table.data, "data", None)
            if isinstance(local, dict):
                mine = held(table.changelog_topic.get_topic_name())
                partition_of = int if table is self.event_time else lambda key: key_partition(key, table.partitions)
                for key in [k for k in local if partition_of(k) not in mine]:
                    del local[key]
