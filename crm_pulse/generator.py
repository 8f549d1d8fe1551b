"""Synthetic CRM traffic for the demo and the tests: leads moving through stages, activities, wins and
losses, subscriptions, renewals and cancellations, and some leads that stall. Deterministic per seed."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Iterator

from crm_pulse.streams.kpis import DAY_MS

HOUR_MS = 3_600_000
STAGES = ("new", "qualified", "proposal", "negotiation")
SOURCES = ("web", "referral", "event", "outbound", "partner")
CAMPAIGNS = ("spring-webinar", "search-ads", "trade-show", None)
LOSS_REASONS = ("price", "competitor", "no-budget", "timing")


@dataclass(order=True)
class _Scheduled:
    at: int
    seq: int
    event: dict = field(compare=False)


class SyntheticCrm:
    """Events in event-time order, from `start_ms` on; call `until(t)` to get everything up to time t."""

    def __init__(self, start_ms: int, seed: int = 7, reps: int = 8, leads_per_day: float = 24.0,
                 stall_share: float = 0.15, initial_customers: int = 60):  # fmt: skip
        self.rng = random.Random(seed)
        # Deal updates draw from their own generator and ids, so the rest of the traffic stays as it was per seed.
        self.deal_rng = random.Random(seed + 1)
        self._deal_seq = itertools.count(10**12)
        self.reps = [f"rep-{i:02d}" for i in range(1, reps + 1)]
        self.teams = {rep: f"team-{'ab'[i % 2]}" for i, rep in enumerate(self.reps)}
        self.leads_per_day = leads_per_day
        self.stall_share = stall_share
        self._ids = itertools.count(1)
        self._queue: list[_Scheduled] = []
        self._next_lead_at = start_ms
        self._next_day = start_ms
        # An existing customer base, subscribed over the 60 days before the start, so churn has a denominator.
        for _ in range(initial_customers):
            self._subscribe(f"cust-{next(self._ids):06d}", start_ms - self.rng.randint(1, 60) * DAY_MS)

    def _event_id(self) -> str:
        return f"evt-{next(self._ids):08d}"

    def _push(self, at: int, event: dict, seq: int | None = None) -> None:
        event["occurred_at"] = at
        heapq.heappush(self._queue, _Scheduled(at, next(self._ids) if seq is None else seq, event))

    def _deal_update(self, lead: dict, at: int, amount: float, close_ms: int) -> None:
        event = self._lead_event(lead, "deal.updated", {"amount": round(amount, 2), "currency": "USD",
                                                        "close_date": close_ms})  # fmt: skip
        event["event_id"] = f"{lead['id']}:u{lead.setdefault('updates', 0)}"
        lead["updates"] += 1
        self._push(at, event, next(self._deal_seq))

    def _lead_event(self, lead: dict, kind: str, payload: dict) -> dict:
        return {"event_id": self._event_id(), "type": kind, "lead_id": lead["id"], "rep_id": lead["rep"],
                "team_id": self.teams[lead["rep"]], "pipeline": "default", "payload": payload}  # fmt: skip

    def _plan_lead(self, at: int) -> None:
        rng = self.rng
        lead = {"id": f"lead-{next(self._ids):06d}", "rep": rng.choice(self.reps)}
        campaign = rng.choice(CAMPAIGNS)
        self._push(at, self._lead_event(lead, "lead.created", {
            "source": rng.choice(SOURCES), "campaign": campaign, "score": rng.randint(0, 100),
            "stage": STAGES[0]}))  # fmt: skip
        if campaign:
            for kind in ("touch", "click", "response")[: rng.randint(1, 3)]:
                self._push(at + rng.randint(1, 12 * HOUR_MS), self._signal("campaign.touch",
                           {"campaign": campaign, "kind": kind}))  # fmt: skip
        stalls_in = rng.randrange(len(STAGES)) if rng.random() < self.stall_share else None
        # The deal's amount and expected close date; at some stage changes the date slips or the amount shrinks.
        deal = self.deal_rng
        amount, close_ms = deal.uniform(1_000, 30_000), at + deal.randint(3, 8) * DAY_MS
        self._deal_update(lead, at + 60_000, amount, close_ms)
        t = at
        for i, stage in enumerate(STAGES):
            dwell = int(rng.uniform(0.3, 1.8) * DAY_MS)
            for _ in range(rng.randint(0, 2)):  # activity while in the stage
                self._push(t + rng.randint(1, dwell), self._lead_event(lead, "lead.activity", {
                    "kind": rng.choice(("call", "email", "meeting", "note")),
                    "direction": rng.choice(("inbound", "outbound"))}))  # fmt: skip
            if i == stalls_in:
                return  # never moves again: the stall rules should catch it
            t += dwell
            if i + 1 < len(STAGES):
                self._push(t, self._lead_event(lead, "lead.stage_changed", {"from": stage, "to": STAGES[i + 1]}))
                if deal.random() < 0.3:
                    close_ms += deal.randint(1, 5) * DAY_MS
                    amount *= deal.uniform(0.6, 0.95) if deal.random() < 0.3 else 1
                    self._deal_update(lead, t + 60_000, amount, close_ms)
            if stage == "proposal":
                quote = {"quote_id": f"q-{lead['id']}", "amount": round(rng.uniform(500, 25_000), 2)}
                self._push(t - dwell // 2, self._lead_event(lead, "quote.sent", quote))
                lead["quote"] = quote
        if rng.random() < 0.45:
            self._push(t - HOUR_MS, self._lead_event(lead, "quote.accepted", {"quote_id": lead["quote"]["quote_id"]}))
            self._push(t, self._lead_event(lead, "deal.won", {"amount": lead["quote"]["amount"]}))
            self._subscribe(f"cust-{lead['id']}", t + HOUR_MS)
        else:
            self._push(t, self._lead_event(lead, "deal.lost", {"reason": rng.choice(LOSS_REASONS)}))

    def _signal(self, kind: str, payload: dict) -> dict:
        return {"event_id": self._event_id(), "type": kind, "payload": payload}

    def _subscribe(self, customer_id: str, at: int) -> None:
        rng = self.rng

        def customer_event(kind: str, **payload) -> dict:
            return {"event_id": self._event_id(), "type": kind, "customer_id": customer_id, "payload": payload}

        self._push(at, customer_event("customer.subscribed"))
        for _ in range(rng.randint(1, 4)):
            self._push(at + rng.randint(0, 60 * DAY_MS), customer_event("customer.purchase",
                       amount=round(rng.uniform(20, 2000), 2)))  # fmt: skip
        if rng.random() < 0.6:
            self._push(at + rng.randint(1, 40) * DAY_MS, customer_event(
                "survey.response", nps=rng.choice((3, 6, 7, 8, 9, 9, 10, 10)), effort=rng.randint(1, 7)))  # fmt: skip
        if rng.random() < 0.4:
            ticket = {"ticket_id": f"t-{next(self._ids)}"}
            opened = at + rng.randint(1, 30) * DAY_MS
            self._push(opened, customer_event("ticket.opened", **ticket))
            contacts = rng.randint(1, 3)
            for c in range(contacts):
                self._push(opened + (c + 1) * 2 * HOUR_MS, customer_event("ticket.contacted", **ticket))
            self._push(opened + (contacts + 1) * 3 * HOUR_MS, customer_event("ticket.resolved", **ticket))
            if contacts == 3:
                self._push(opened + DAY_MS, customer_event("complaint.filed", category="support"))
        t = at
        while True:  # monthly renewals until a cancellation
            t += 30 * DAY_MS + self.rng.randint(-2, 2) * DAY_MS
            if self.rng.random() < 0.25:
                self._push(t - self.rng.randint(1, 20) * DAY_MS, customer_event("customer.cancelled"))
                return
            if t - at > 365 * DAY_MS:
                return
            self._push(t, customer_event("customer.renewed"))

    def _plan_day(self, day_start: int) -> None:
        """Daily marketing spend per campaign and CRM users at work."""
        rng = self.rng
        for campaign in filter(None, CAMPAIGNS):
            self._push(day_start + rng.randint(0, DAY_MS - 1), self._signal("marketing.spend", {
                "campaign": campaign, "amount": round(rng.uniform(50, 400), 2),
                "purpose": rng.choice(("acquisition", "acquisition", "retention"))}))  # fmt: skip
        for user in self.reps + ["manager-1", "manager-2"]:
            for _ in range(rng.randint(0, 4)):
                event = self._signal("crm.user_activity", {"action": rng.choice(("view", "edit", "report"))})
                event["user_id"] = user
                self._push(day_start + rng.randint(0, DAY_MS - 1), event)

    @staticmethod
    def key(event: dict) -> bytes:
        """The message key the contract asks producers for: the event's entity."""
        entity = event.get("lead_id") or event.get("customer_id") or event.get("user_id")
        return (entity or event["payload"]["campaign"]).encode()

    def until(self, now_ms: int) -> Iterator[dict]:
        """Every event that occurred up to `now_ms`, in event-time order."""
        while self._next_lead_at <= now_ms:
            self._plan_lead(self._next_lead_at)
            self._next_lead_at += int(self.rng.expovariate(self.leads_per_day) * DAY_MS) + 1
        while self._next_day <= now_ms:
            self._plan_day(self._next_day)
            self._next_day += DAY_MS
        while self._queue and self._queue[0].at <= now_ms:
            yield heapq.heappop(self._queue).event
