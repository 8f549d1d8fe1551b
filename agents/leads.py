"""Lead pipeline family: per-lead state (keyed by lead), its stage-dwell, sales-cycle and conversion
deltas, and stalled-lead alerts, from events and from a timer."""

from __future__ import annotations

import asyncio
import functools
import logging

from crm_pulse.agents.aggregates import Aggregates, DeltaSender
from crm_pulse.agents.app import Pipeline, key_partition
from crm_pulse.agents.batches import BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS, Batch, unseen_events, upstream_watermark
from crm_pulse.agents.metrics import ALERTS_EMITTED, EVENTS_PROCESSED, STALL_SCAN_SECONDS
from crm_pulse.streams.deals import DueIndex, apply_deal_event, deal_alerts, fold_deal_alerted, lead_time
from crm_pulse.streams.forecast import closed_outcome, open_deal, outcome_deltas
from crm_pulse.streams.health import health_alerts, health_inputs, quiet_drops
from crm_pulse.streams.kpis import day_of
from crm_pulse.streams.leads import apply_lead_event, apply_stall_record, check_stall, new_lead, stall_record
from crm_pulse.streams.stall_index import StallIndex

log = logging.getLogger(__name__)


class Leads:
    """The leads table of one pipeline, the in-memory index of its open leads, and the stall levels raised
    but not yet saved."""

    def __init__(self, pipeline: Pipeline, aggregates: Aggregates):
        self.pipeline, self.aggregates = pipeline, aggregates
        settings = pipeline.settings
        self.policy = settings.stall_policy
        self.leads = pipeline.table("leads", default=None)
        # The agent reads the lead events and the stall levels the timer raised, both keyed by lead.
        self.lead_events = pipeline.family_topics["lead"]
        self.inputs = pipeline.app.topic(
            self.lead_events.get_topic_name(), pipeline.stall_levels_topic.get_topic_name(),
            internal=True, partitions=settings.partitions, key_type=str,  # declared: created with the app's partitions
        )  # fmt: skip
        self.index = StallIndex(self.policy)
        self.deal_policy = settings.deal_policy
        self.due_deals = DueIndex(self.deal_policy)
        # Open deals with an amount and close date, for the weighted pipeline: (pipeline, stage, amount, close
        # ms, team, rep) by lead.
        self.open_deals: dict[str, tuple] = {}
        # What deal health reads of each open lead (streams/health.py), by lead.
        self.health_inputs: dict[str, dict] = {}
        # Counts the batches written (and rebuilds): what is computed from every lead is recomputed only when it moves.
        self.version = 0
        # Deal alert occurrences the timer raised and not yet saved on the lead: merged in first by either path.
        self.raised_deal_alerts: dict[str, list[str]] = {}
        # Raised by the timer and not yet folded into the lead's state by the agent: applied first by either path.
        self.raised_stalls: dict[str, dict] = {}
        self.processed = upstream_watermark(pipeline, self.lead_events)
        self.between_batches = asyncio.Lock()

    def stall_now_ms(self) -> int | None:
        """The time idle leads are compared against: the wall clock live, else how far this agent has got."""
        clock = self.pipeline.clock
        return clock.now_ms() if clock.mode == "wall" else self.processed.watermark_ms

    async def forget_moved_partitions(self, sender, assigned, **kwargs) -> None:
        """Leads of partitions another worker owns now leave the index at once, with their table keys: the
        index is rebuilt only once recovery ends, and a stall scan in between looked up a key already gone
        (a worker joining mid-stream crashed its peer with a KeyError on Apache Kafka)."""
        # The leads' own partitions: a partition number held of another topic says nothing of these.
        mine = {tp.partition for tp in assigned if tp.topic == self.leads.changelog_topic.get_topic_name()}
        partitions = self.pipeline.settings.partitions
        for lead_id in [k for k in self.raised_stalls if key_partition(k, partitions) not in mine]:
            del self.raised_stalls[lead_id]
        for lead_id in [k for k in self.index.open if key_partition(k, partitions) not in mine]:
            self.index.discard(lead_id)
        for lead_id in [k for k in self.raised_deal_alerts if key_partition(k, partitions) not in mine]:
            del self.raised_deal_alerts[lead_id]
        for lead_id in [k for k in self.due_deals.due_at if key_partition(k, partitions) not in mine]:
            self.due_deals.discard(lead_id)
        for lead_id in [k for k in self.open_deals if key_partition(k, partitions) not in mine]:
            del self.open_deals[lead_id]
        for lead_id in [k for k in self.health_inputs if key_partition(k, partitions) not in mine]:
            del self.health_inputs[lead_id]

    async def rebuild_index(self) -> None:
        """After every rebalance, from the leads this worker now owns (restored from the changelog)."""
        self.index.rebuild(self.leads.items())
        self.due_deals.rebuild(self.leads.items())
        self.open_deals.clear()
        self.health_inputs.clear()
        self.version += 1
        for lead_id, lead in self.leads.items():
            self.track_deal(lead_id, lead)

    def track_deal(self, lead_id: str, lead: dict) -> None:
        if (deal := open_deal(lead, self.deal_policy)) is None:
            self.open_deals.pop(lead_id, None)
        else:
            self.open_deals[lead_id] = (*deal, lead["team"], lead["rep"])
        if (inputs := health_inputs(lead, self.deal_policy)) is None:
            self.health_inputs.pop(lead_id, None)
        else:
            self.health_inputs[lead_id] = inputs | {"pipeline": lead["pipeline"], "rep": lead["rep"]}

    def norms_at(self, now_ms: int):
        """Each stage's norms for deal health: its stall threshold, and its learned p50 and p90 dwell."""
        threshold = self.threshold_at(now_ms)

        @functools.cache
        def norms(stage: str) -> tuple[int, float | None, float | None]:
            p50, p90 = self.aggregates.stage_dwell_norms(stage, now_ms, self.policy.p90_min_samples)
            return threshold(stage)[0], p50, p90

        return norms

    def threshold_at(self, now_ms: int):
        @functools.cache
        def threshold(stage: str) -> tuple[int, str]:
            return self.policy.threshold(stage, *self.aggregates.stage_p90(stage, now_ms))

        return threshold

    def publish_alerts(self, alerts: list[dict]) -> list[tuple]:
        """Queue alerts in order; (delivery future, count it) for each, to await before saving the stall levels
        they announce, so a crash in between raises an alert again (same alert_id) rather than losing it."""
        alerts_topic = self.pipeline.alerts_topic
        return [(alerts_topic.send_soon(key=alert["rep_id"], value=alert), ALERTS_EMITTED.labels(alert["type"]).inc)
                for alert in alerts]  # fmt: skip

    def fold_raised_stall(self, lead_id: str, lead: dict) -> None:
        if (record := self.raised_stalls.pop(lead_id, None)) is not None:
            apply_stall_record(lead, record)

    def fold_raised_deal_alerts(self, lead_id: str, lead: dict) -> None:
        """The deal alerts the timer raised, into the lead the agent is about to write: never into the timer's
        copies, which would drop them."""
        if (raised := self.raised_deal_alerts.pop(lead_id, None)) is not None:
            fold_deal_alerted(lead, raised)

    async def track_leads(self, stream):
        pipeline, raised_stalls = self.pipeline, self.raised_stalls
        stall_levels = pipeline.stall_levels_topic.get_topic_name()
        zone = pipeline.settings.business_zone
        async for events in stream.take_events(BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS):
            # The stall timer decides only between batches: never on state a batch has changed but not saved.
            async with self.between_batches:
                batch = Batch(self.leads, new_lead)
                # Per day of event time: thresholds depend on the day's 30-day window and on the dwell
                # histograms, which do not change within a batch.
                thresholds: dict[int, object] = {}
                norms: dict[int, object] = {}
                for received in events:
                    if received.message.topic == stall_levels:
                        lead = batch.state(received.key)
                        if "deal_alerted" in received.value:  # deal alerts the timer raised
                            if fold_deal_alerted(lead, received.value["deal_alerted"]):
                                batch.touch(received.key, lead, received)
                            if set(self.raised_deal_alerts.get(received.key, ())) <= set(lead["deal_alerted"]):
                                self.raised_deal_alerts.pop(received.key, None)
                            continue
                        if apply_stall_record(lead, received.value):
                            batch.touch(received.key, lead, received)
                        if raised_stalls.get(received.key) == received.value:
                            del raised_stalls[received.key]
                        continue
                    deltas = DeltaSender(pipeline, "leads", batch, received)
                    for lead_id, event, lead in unseen_events(pipeline, batch, received, self.processed):
                        self.fold_raised_stall(lead_id, lead)
                        self.fold_raised_deal_alerts(lead_id, lead)
                        # Before the event changes the deal: the timer saw it so, and raises the same records.
                        alerts = quiet_drops(lead, lead_id, event["occurred_at"])
                        day = day_of(event["occurred_at"])
                        if day not in thresholds:
                            thresholds[day] = self.threshold_at(event["occurred_at"])
                        outcome_before = closed_outcome(lead, self.deal_policy, zone)
                        fact_deltas, lead_alerts = apply_lead_event(lead, event, lead_id, self.policy, thresholds[day])
                        alerts += lead_alerts
                        apply_deal_event(lead, event)
                        for key, delta in outcome_deltas(outcome_before, closed_outcome(lead, self.deal_policy, zone)):
                            deltas.send(pipeline.outcome_deltas_topic, key, delta)
                        known = lead_time(lead, event["occurred_at"])
                        alerts += deal_alerts(lead, lead_id, self.deal_policy, known)
                        if day not in norms:
                            norms[day] = self.norms_at(event["occurred_at"])
                        alerts += health_alerts(lead, lead_id, self.deal_policy, known, norms[day], event["event_id"])
                        deltas.facts(fact_deltas, event)
                        if event["type"] == "lead.activity" and event.get("rep_id"):
                            activity = {"at": event["occurred_at"]}
                            deltas.send(pipeline.actor_activity_topic, f"rep:{event['rep_id']}", activity)
                        for future, on_delivered in self.publish_alerts(alerts):
                            batch.sent(future, on_delivered)
                        EVENTS_PROCESSED.labels(event["type"]).inc()
                await batch.commit()
                self.version += 1
                for lead_id, (lead, _) in batch.touched.items():
                    self.index.update(lead_id, lead)
                    self.due_deals.update(lead_id, lead)
                    self.track_deal(lead_id, lead)

    async def scan_for_stalls(self):
        now = self.stall_now_ms()
        if now is None:
            return
        with STALL_SCAN_SECONDS.time():
            async with self.between_batches:
                # Until recovery ends the table holds leads being restored, a kept partition's too (a memory
                # store replays its changelog from the start): older versions, and a scan then stalled a
                # lead on an idle time its later events had ended (a worker joining mid-stream).
                if self.pipeline.app.rebalancing:
                    return
                threshold = self.threshold_at(now)
                alerts: list[dict] = []
                raised: dict[str, dict] = {}
                for lead_id in self.index.due(now, threshold):
                    if (saved := self.leads.get(lead_id)) is None:  # its partition moved, in this rebalance
                        self.index.discard(lead_id)
                        continue
                    lead = dict(saved)  # a copy: the agent alone writes the table
                    self.fold_raised_stall(lead_id, lead)
                    alerts += check_stall(lead, lead_id, now, self.policy, threshold)
                    raised[lead_id] = self.raised_stalls[lead_id] = stall_record(lead)
                    self.index.update(lead_id, lead)
                deal_raised: dict[str, list[str]] = {}
                for lead_id in self.due_deals.due(now):
                    if (saved := self.leads.get(lead_id)) is None:
                        continue
                    lead = dict(saved)  # a copy, as above (the deal functions replace its lists, never append)
                    fold_deal_alerted(lead, self.raised_deal_alerts.get(lead_id, []))
                    before = set(lead["deal_alerted"])
                    alerts += deal_alerts(lead, lead_id, self.deal_policy, now)
                    alerts += quiet_drops(lead, lead_id, now)
                    if new := [o for o in lead["deal_alerted"] if o not in before]:
                        deal_raised[lead_id] = new
                        self.raised_deal_alerts[lead_id] = self.raised_deal_alerts.get(lead_id, []) + new
                # Queued before the agent can clear any of them: in the order decided.
                published = self.publish_alerts(alerts)
            for future, on_delivered in published:
                await future
                on_delivered()
            # Only after the alerts: a crash in between raises them again rather than losing them.
            stall_levels = self.pipeline.stall_levels_topic
            records = [*raised.items(), *((lead_id, {"deal_alerted": new}) for lead_id, new in deal_raised.items())]
            for future in [stall_levels.send_soon(key=lead_id, value=record) for lead_id, record in records]:
                await future


def install(pipeline: Pipeline, aggregates: Aggregates) -> Leads:
    leads = Leads(pipeline, aggregates)
    app = pipeline.app
    app.on_partitions_assigned.connect(leads.forget_moved_partitions)
    leads.leads.on_recover(leads.rebuild_index)
    app.agent(leads.inputs)(leads.track_leads)
    app.timer(pipeline.settings.stall_scan_seconds)(leads.scan_for_stalls)
    return leads
