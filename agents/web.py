"""Query endpoints on the worker's web server (beside /metrics): current KPIs and stalled leads as JSON.

Each worker answers for the keys it owns; behind several workers, query each (or the one owning the
"all" partition for the overall KPIs) — the response names the worker's partitions.
"""

from __future__ import annotations

from faust import web

from crm_pulse.agents.app import Pipeline
from crm_pulse.agents.deals import Deals
from crm_pulse.agents.gauges import Gauges, kpi_snapshot, period_table
from crm_pulse.agents.leads import Leads
from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.streams.commonalities import commonalities
from crm_pulse.streams.forecast import stage_figures, weighted_rows
from crm_pulse.streams.kpis import day_of
from crm_pulse.streams.periods import parse_period, period_days, period_of


def install(pipeline: Pipeline, gauges: Gauges, leads: Leads, deals: Deals) -> None:
    app, clock = pipeline.app, pipeline.clock

    def _envelope(body: dict) -> dict:
        now = clock.now_ms()
        return {
            "clock": clock.mode,
            # What "now" is: windows and stall checks end there.
            "time_basis": "wall clock" if clock.mode == "wall" else "event time: the latest event read, not the wall clock",
            "now": ms_to_iso(now) if now is not None else None,
            "watermark": ms_to_iso(clock.watermark_ms) if clock.watermark_ms is not None else None,
            "latest_event": ms_to_iso(clock.latest_ms) if clock.latest_ms is not None else None,
            "partitions": sorted(tp.partition for tp in app.assignor.assigned_actives()
                                 if tp.topic == leads.leads.changelog_topic.get_topic_name()),  # fmt: skip
            **body,
        }

    @app.page("/kpis")
    async def all_kpis(self: web.View, request: web.Request) -> web.Response:
        """`?period=week|month|quarter&from=<label>`: the period KPIs of each period from `from` to now."""
        if "period" not in request.query:
            return self.json(_envelope({"kpis": kpi_snapshot(gauges.collect())}))
        kind, first = request.query["period"], request.query.get("from")
        if first is None:
            return self.json({"error": "?period= needs &from=<first period>, e.g. from=2018-01"}, status=400)
        try:
            table = period_table(gauges, kind, first)
        except ValueError as exc:
            return self.json({"error": str(exc)}, status=400)
        return self.json(_envelope({"period": kind, "time_zone": pipeline.settings.business_timezone, "periods": table}))

    @app.page("/kpis/{family}")
    async def kpi_family(self: web.View, request: web.Request, family: str) -> web.Response:
        """/kpis/stage-dwell → every crm_stage_dwell_* gauge; /kpis/win-rate → crm_win_rate_ratio; …"""
        snapshot = kpi_snapshot(gauges.collect(), f"crm_{family.replace('-', '_')}")
        if not snapshot:
            return self.json({"error": f"no KPI family {family!r}; see /kpis for the names"}, status=404)
        return self.json(_envelope({"kpis": snapshot}))

    @app.page("/leads/stalled")
    async def stalled_leads(self: web.View, request: web.Request) -> web.Response:
        """Open leads currently stalled, longest idle first; `?rep=<rep id>` for one rep's."""
        rep = request.query.get("rep")
        now = leads.stall_now_ms()
        found = []
        for lead_id, lead in leads.index.open.items():
            if not lead.level or rep is not None and lead.rep != rep:
                continue
            found.append({
                "lead_id": lead_id, "rep_id": lead.rep, "stage": lead.stage,
                "level": "escalated" if lead.level == 2 else "stalled", "rule": lead.rule,
                "threshold_seconds": lead.threshold / 1000, "idle_since": ms_to_iso(lead.idle_since),
                "idle_seconds": None if now is None else (now - lead.idle_since) / 1000,
            })  # fmt: skip
        found.sort(key=lambda item: item["idle_since"])
        return self.json(_envelope({"stalled": found}))

    @app.page("/deals/forecast")
    async def forecast(self: web.View, request: web.Request) -> web.Response:
        """Stage conversion and P(win | stage) per pipeline, the weighted pipeline of this worker's open deals,
        and `?month=YYYY-MM` (default: the previous month) forecast at its start against what was won in it."""
        now = clock.now_ms()
        if now is None:
            return self.json(_envelope({"error": "no event read yet"}), status=503)
        zone = pipeline.settings.business_zone
        today = day_of(now, zone)
        month = request.query.get("month") or period_of("month", period_days("month", period_of("month", today))[0] - 1)
        try:
            parse_period("month", month)
        except ValueError as exc:
            return self.json({"error": str(exc)}, status=400)
        accuracy = deals.forecast(month)
        stages = {key: stage_figures(deals.counts(key, today)) for key in sorted(deals.outcomes.keys())}
        return self.json(_envelope({"history_days": deals.window_days, "stages": stages,
                                    "weighted_pipeline": weighted_rows(deals.weighted(now)),
                                    "forecast": {"month": month, **accuracy}}))  # fmt: skip

    @app.page("/deals/health")
    async def deal_health(self: web.View, request: web.Request) -> web.Response:
        """Deal health of this worker's open deals, worst first; `?rep=`, `?band=`, `?lead=` filter."""
        wanted = {key: request.query.get(key) for key in ("rep", "band", "lead")}
        found = [item for item in deals.deal_health()
                 if all(value is None or item[field] == value
                        for field, value in (("rep_id", wanted["rep"]), ("band", wanted["band"]), ("lead_id", wanted["lead"])))]  # fmt: skip
        found.sort(key=lambda item: (item["health"], item["lead_id"]))
        return self.json(_envelope({"deals": found}))

    @app.page("/commonalities")
    async def lead_commonalities(self: web.View, request: web.Request) -> web.Response:
        """Stall, loss and win rates of this worker's leads by source, campaign, score band, stage and rep,
        ranked by the Wilson lower bound; `?min=<n>` leaves out segments with fewer than n cases."""
        try:
            min_count = int(request.query.get("min", "1"))
        except ValueError:
            return self.json({"error": "?min= takes a whole number of cases, e.g. min=5"}, status=400)
        return self.json(_envelope(commonalities(leads.leads.values(), leads.policy, min_count)))
