"""Generate the crm-pulse Grafana dashboards into deploy/grafana/dashboards/*.json.

The JSON files are committed and provisioned by Grafana (deploy/grafana/provisioning/dashboards/). Edit this
script, not the JSON, then run `python deploy/grafana/generate_dashboards.py`; tests/test_stack.py fails when
the committed files differ from what this script generates.

Conventions, from the README's "Metrics" section:
- per-worker series (counters, crm_leads_open, crm_leads_stalled, crm_pipeline_open_value) are summed;
- owned KPI gauges (exported by the one worker holding their key) are aggregated with max to drop `instance`;
- `$window` is one of 7d / 30d / all; KPIs undefined over all time (growth rates, per-day rates) and the
  customer-base KPIs (30d only) use fixed windows or show every window they have.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/prometheus.yml
TAGS = ["crm-pulse"]

# --- building blocks -------------------------------------------------------------------------------


def q(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> dict:
    target = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto", "range": not instant,
              "instant": instant}  # fmt: skip
    if table:
        target["format"] = "table"
    return target


def _fields(unit: str, *, decimals: int | None = None, minimum: float | None = None,
            maximum: float | None = None, thresholds: list | None = None) -> dict:  # fmt: skip
    defaults: dict = {"unit": unit, "color": {"mode": "palette-classic"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if thresholds:
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {"mode": "absolute", "steps": thresholds}
    else:
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
    return {"defaults": defaults, "overrides": []}


def steps(*pairs) -> list:
    """steps("green", 5, "orange", 10, "red") → Grafana threshold steps."""
    out = [{"color": pairs[0], "value": None}]
    for i in range(1, len(pairs), 2):
        out.append({"color": pairs[i + 1], "value": pairs[i]})
    return out


def stat(title: str, targets: list, unit: str = "short", description: str = "", **fields) -> dict:
    for target in targets:
        target.update(instant=True, range=False)
    return {"type": "stat", "title": title, "description": description, "targets": targets,
            "fieldConfig": _fields(unit, **fields),
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "none", "justifyMode": "auto", "textMode": "auto",
                        "orientation": "auto"}}  # fmt: skip


def timeseries(title: str, targets: list, unit: str = "short", description: str = "", *, stack: bool = False,
               **fields) -> dict:  # fmt: skip
    config = _fields(unit, **fields)
    config["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 5,
                                    "showPoints": "never", "spanNulls": True,
                                    "stacking": {"mode": "normal" if stack else "none", "group": "A"}}  # fmt: skip
    return {"type": "timeseries", "title": title, "description": description, "targets": targets,
            "fieldConfig": config,
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}  # fmt: skip


def bars(title: str, targets: list, unit: str = "short", description: str = "", **fields) -> dict:
    """Horizontal bar gauge of the current value of each series (instant queries)."""
    for target in targets:
        target.update(instant=True, range=False)
    return {"type": "bargauge", "title": title, "description": description, "targets": targets,
            "fieldConfig": _fields(unit, **fields),
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                        "valueMode": "color", "namePlacement": "auto", "sizing": "auto"}}  # fmt: skip


def table(title: str, key: str, columns: list[tuple[str, str, str]], description: str = "") -> dict:
    """One row per value of the label `key`; columns are (header, expr, unit), merged on `key`."""
    targets, rename, overrides = [], {}, []
    for i, (header, expr, unit) in enumerate(columns):
        target = q(expr, instant=True, table=True)
        target["refId"] = chr(ord("A") + i)
        targets.append(target)
        rename["Value" if len(columns) == 1 else f"Value #{target['refId']}"] = header
        overrides.append({"matcher": {"id": "byName", "options": header},
                          "properties": [{"id": "unit", "value": unit}]})  # fmt: skip
    config = _fields("short")
    config["overrides"] = overrides
    return {"type": "table", "title": title, "description": description, "targets": targets,
            "fieldConfig": config,
            "transformations": [{"id": "merge", "options": {}},
                                {"id": "organize", "options": {"excludeByName": {"Time": True},
                                                               "indexByName": {key: 0}, "renameByName": rename}}],
            "options": {"showHeader": True, "cellHeight": "sm",
                        "sortBy": [{"displayName": columns[0][0], "desc": True}]}}  # fmt: skip


def window_variable() -> dict:
    options = [{"text": w, "value": w, "selected": w == "30d"} for w in ("7d", "30d", "all")]
    return {"type": "custom", "name": "window", "label": "Window", "query": "7d,30d,all",
            "current": {"text": "30d", "value": "30d", "selected": True}, "options": options,
            "multi": False, "includeAll": False, "hide": 0, "skipUrlSync": False,
            "description": "KPI window: whole UTC days ending today (7d, 30d) or all time"}  # fmt: skip


def label_variable(name: str, label: str, metric: str) -> dict:
    query = f"label_values({metric}, {name})"
    return {"type": "query", "name": name, "label": label, "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
            "refresh": 2, "sort": 1, "regex": "", "multi": True, "includeAll": True, "allValue": ".*",
            "current": {"text": ["All"], "value": ["$__all"], "selected": True}, "options": [],
            "hide": 0, "skipUrlSync": False}  # fmt: skip


class Dashboard:
    """Lays panels out left to right in rows of 24 grid units."""

    def __init__(self, uid: str, title: str, description: str, variables: list[dict] = (), refresh: str = "30s"):
        self.uid, self.title, self.description = uid, title, description
        self.variables, self.refresh = list(variables), refresh
        self.panels: list[dict] = []
        self.x = self.y = self.line_height = 0

    def _newline(self) -> None:
        self.y += self.line_height
        self.x = self.line_height = 0

    def row(self, title: str) -> "Dashboard":
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})  # fmt: skip
        self.y += 1
        return self

    def add(self, panel: dict, w: int = 6, h: int = 8) -> "Dashboard":
        if self.x + w > 24:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["datasource"] = DATASOURCE
        for i, target in enumerate(panel["targets"]):
            target.setdefault("refId", chr(ord("A") + i))
        self.panels.append(panel)
        self.x += w
        self.line_height = max(self.line_height, h)
        return self

    def json(self) -> dict:
        for i, panel in enumerate(self.panels, start=1):
            panel["id"] = i
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": TAGS,
            "editable": True, "graphTooltip": 1, "timezone": "utc", "schemaVersion": 39, "version": 1,
            "refresh": self.refresh, "time": {"from": "now-6h", "to": "now"}, "timepicker": {},
            "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
            "links": [{"type": "dashboards", "tags": TAGS, "asDropdown": True, "title": "crm-pulse dashboards",
                       "includeVars": False, "keepTime": True, "icon": "external link", "targetBlank": False,
                       "tooltip": "", "url": ""}],
            "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                      "name": "Annotations & Alerts", "type": "dashboard"}]},
            "templating": {"list": self.variables},
            "panels": self.panels,
        }  # fmt: skip


W = 'window="$window"'
REP = 'rep=~"$rep"'
RATE = "$__rate_interval"

# --- dashboards ------------------------------------------------------------------------------------


def pipeline() -> Dashboard:
    d = Dashboard("crm-pulse-pipeline", "crm-pulse / Pipeline & stalls",
                  "Open leads by stage, stalled leads by rep and stage, stall alerts and stage dwell times.",
                  [window_variable(), label_variable("rep", "Rep", "crm_rep_new_leads")])  # fmt: skip
    d.row("Open pipeline (as of the last stall scan)")
    d.add(stat("Open leads", [q("sum(crm_leads_open)")], description="Open leads of every stage, all workers."))
    d.add(stat("Stalled leads", [q(f"sum(crm_leads_stalled{{{REP}}}) or vector(0)")],
               thresholds=steps("green", 1, "orange", 10, "red"),
               description="Open leads idle longer than their stage's threshold (selected reps)."))  # fmt: skip
    d.add(stat("Stalled share", [q("(sum(crm_leads_stalled) or vector(0)) / sum(crm_leads_open)")], "percentunit", decimals=1,
               thresholds=steps("green", 0.1, "orange", 0.25, "red"),
               description="Stalled leads / open leads, every rep."))  # fmt: skip
    d.add(stat("Open pipeline value", [q("sum(crm_pipeline_open_value)")], "short", decimals=0,
               description="Latest quote amount of each open lead, summed."))  # fmt: skip
    d.add(timeseries("Open leads by stage", [q("crm:leads_open:by_stage", "{{stage}}")], stack=True), w=12)
    d.add(bars("Open pipeline value by stage", [q("sum by (stage) (crm_pipeline_open_value)", "{{stage}}")],
               decimals=0), w=12)  # fmt: skip
    d.row("Stalls")
    d.add(bars("Stalled leads by rep", [q(f"sort_desc(sum by (rep) (crm_leads_stalled{{{REP}}}))", "{{rep}}")],
               thresholds=steps("green", 3, "orange", 6, "red"),
               description="A rep with more than 5 stalled leads for 30 min raises CrmLeadsStalledPerRep."),
          w=8)  # fmt: skip
    d.add(timeseries("Stalled leads by stage", [q(f"sum by (stage) (crm_leads_stalled{{{REP}}})", "{{stage}}")],
                     stack=True), w=8)  # fmt: skip
    d.add(timeseries("Stall alerts published", [q(f"sum by (type) (rate(crm_alerts_emitted_total[{RATE}]))",
                                                  "{{type}}")], "ops",
                     description="Alerts published to the alerts topic per second, by type."), w=8)  # fmt: skip
    d.add(table("Stalled leads by rep and stage", "rep", [
        ("stalled", f"sum by (rep, stage) (crm_leads_stalled{{{REP}}})", "short"),
    ], description="One row per rep and stage with stalled leads."), w=24)
    d.row("Stage dwell ($window)")
    d.add(bars("Mean dwell by stage", [q(f"max by (stage) (crm_stage_dwell_mean_seconds{{{W}}})", "{{stage}}")], "s",
               description="Mean time spent in a stage, counted when leads leave it."), w=8)  # fmt: skip
    d.add(bars("p50 dwell by stage",
               [q(f'max by (stage) (crm_stage_dwell_p50_seconds{{{W}}})', "{{stage}}")], "s"),
          w=8)  # fmt: skip
    d.add(bars("p90 dwell by stage",
               [q(f'max by (stage) (crm_stage_dwell_p90_seconds{{{W}}})', "{{stage}}")], "s",
               description="2 × the 30-day p90 can lower a stage's stall threshold (CRM_PULSE_STALL_P90_FACTOR)."),
          w=8)  # fmt: skip
    d.add(timeseries("p90 dwell by stage, 30d", [q("crm:stage_dwell_p90_seconds:30d", "{{stage}}")], "s"), w=12)
    d.add(timeseries("Leads that left each stage", [q(f"max by (stage) (crm_stage_dwell_observations{{{W}}})",
                                                      "{{stage}}")]), w=12)  # fmt: skip
    return d


def sales() -> Dashboard:
    d = Dashboard("crm-pulse-sales", "crm-pulse / Sales",
                  "Win rate, deals, revenue, sales cycle, conversion and activity, overall and per rep.",
                  [window_variable(), label_variable("rep", "Rep", "crm_rep_new_leads")])  # fmt: skip
    d.row("Outcomes ($window)")
    d.add(stat("Win rate", [q(f"max(crm_win_rate_ratio{{{W}}})")], "percentunit", decimals=1,
               description="Won / (won + lost) deals closed in the window."), w=4)  # fmt: skip
    d.add(stat("Deals won", [q(f"max(crm_deals_won{{{W}}})")]), w=4)
    d.add(stat("Deals lost", [q(f"max(crm_deals_lost{{{W}}})")]), w=4)
    d.add(stat("Won revenue", [q(f"max(crm_won_revenue{{{W}}})")], decimals=0), w=4)
    d.add(stat("Average deal size", [q(f"max(crm_average_deal_size{{{W}}})")], decimals=0), w=4)
    d.add(stat("Quote success", [q(f"max(crm_quote_success_ratio{{{W}}})")], "percentunit", decimals=1,
               description="Quotes accepted / quotes sent."), w=4)  # fmt: skip
    d.add(timeseries("Win rate, 7d and 30d", [q("crm:win_rate_ratio:7d", "7d"), q("crm:win_rate_ratio:30d", "30d")],
                     "percentunit", minimum=0, maximum=1,
                     description="CrmWinRateDrop fires when the 30d win rate falls below 0.8 × its value 7 days "
                                 "earlier."), w=12)  # fmt: skip
    d.add(timeseries("Deals won and lost", [q(f"max(crm_deals_won{{{W}}})", "won"),
                                            q(f"max(crm_deals_lost{{{W}}})", "lost")]), w=12)  # fmt: skip
    d.row("Funnel ($window)")
    d.add(stat("New leads", [q(f"max(crm_new_leads{{{W}}})")]), w=4)
    d.add(stat("New deals", [q(f"max(crm_new_deals{{{W}}})")], description="Leads that entered a deal stage."), w=4)
    d.add(stat("Deals per 100 leads", [q(f"max(crm_deals_per_100_leads{{{W}}})")], decimals=1), w=4)
    d.add(stat("Conversion", [q(f"max(crm_conversion_ratio{{{W}}})")], "percentunit", decimals=1,
               description="Deals won / leads created."), w=4)  # fmt: skip
    d.add(timeseries("Lead velocity", [q("max by (window) (crm_lead_velocity_ratio)", "{{window}}")], "percentunit",
                     description="(New leads in the window − in the window before) / in the window before. "
                                 "Exported once the window before has leads."), w=8)  # fmt: skip
    d.add(timeseries("Sales cycle (lead created → won)", [
        q(f"max(crm_sales_cycle_mean_seconds{{{W}}})", "mean"),
        q(f'max(crm_sales_cycle_p50_seconds{{{W}}})', "p50"),
        q(f'max(crm_sales_cycle_p90_seconds{{{W}}})', "p90"),
    ], "s"), w=12)
    d.add(timeseries("New leads and new deals", [q(f"max(crm_new_leads{{{W}}})", "new leads"),
                                                 q(f"max(crm_new_deals{{{W}}})", "new deals")]), w=12)  # fmt: skip
    d.row("Reps ($window)")
    d.add(table("Rep scorecard", "rep", [
        ("won", f"max by (rep) (crm_rep_deals_won{{{W}, {REP}}})", "short"),
        ("lost", f"max by (rep) (crm_rep_deals_lost{{{W}, {REP}}})", "short"),
        ("win rate", f"max by (rep) (crm_rep_win_rate_ratio{{{W}, {REP}}})", "percentunit"),
        ("won revenue", f"max by (rep) (crm_rep_won_revenue{{{W}, {REP}}})", "short"),
        ("avg deal", f"max by (rep) (crm_rep_average_deal_size{{{W}, {REP}}})", "short"),
        ("new leads", f"max by (rep) (crm_rep_new_leads{{{W}, {REP}}})", "short"),
        ("new deals", f"max by (rep) (crm_rep_new_deals{{{W}, {REP}}})", "short"),
        ("quote success", f"max by (rep) (crm_rep_quote_success_ratio{{{W}, {REP}}})", "percentunit"),
        ("activities", f"max by (rep) (crm_rep_activities{{{W}, {REP}}})", "short"),
        ("calls", f"sum by (rep) (max by (rep, direction) (crm_rep_calls{{{W}, {REP}}}))", "short"),
        ("sales per call", f"max by (rep) (crm_rep_sales_per_call_ratio{{{W}, {REP}}})", "short"),
        ("stalled now", f"sum by (rep) (crm_leads_stalled{{{REP}}})", "short"),
    ]), w=24, h=10)
    d.add(bars("Win rate by rep", [q(f"sort_desc(max by (rep) (crm_rep_win_rate_ratio{{{W}, {REP}}}))", "{{rep}}")],
               "percentunit", minimum=0, maximum=1), w=12)  # fmt: skip
    d.add(bars("Won revenue by rep", [q(f"sort_desc(max by (rep) (crm_rep_won_revenue{{{W}, {REP}}}))", "{{rep}}")],
               decimals=0), w=12)  # fmt: skip
    d.row("Activity and CRM adoption ($window)")
    d.add(timeseries("Calls by direction", [q(f"max by (direction) (crm_calls{{{W}}})", "{{direction}}")],
                     stack=True), w=8)  # fmt: skip
    d.add(timeseries("Sales per call", [q(f"max(crm_sales_per_call_ratio{{{W}}})", "deals won / calls")]), w=8)
    d.add(bars("Activities by rep", [q(f"sort_desc(max by (rep) (crm_rep_activities{{{W}, {REP}}}))", "{{rep}}")]),
          w=8)  # fmt: skip
    d.add(stat("Lead activities", [q(f"max(crm_activities{{{W}}})")],
               description="Calls, e-mails, meetings and notes logged on leads."), w=4)  # fmt: skip
    d.add(stat("Active reps", [q(f"max(crm_active_reps{{{W}}})")], description="Reps who logged a lead activity."),
          w=4)  # fmt: skip
    d.add(stat("Active CRM users", [q(f"max(crm_active_users{{{W}}})")]), w=4)
    d.add(stat("CRM user actions", [q(f"max(crm_user_actions{{{W}}})")]), w=4)
    d.add(timeseries("Activities per rep per day", [q("max by (window) (crm_activities_per_rep_per_day)",
                                                      "{{window}}")], decimals=1), w=8)  # fmt: skip
    return d


def marketing() -> Dashboard:
    d = Dashboard("crm-pulse-marketing", "crm-pulse / Marketing",
                  "Leads by source, campaign and score band, campaign touches and spend, and acquisition cost.",
                  [window_variable()])  # fmt: skip
    d.row("Spend ($window)")
    d.add(stat("Acquisition spend", [q(f"max(crm_acquisition_spend{{{W}}})")], decimals=0), w=6)
    d.add(stat("Retention spend", [q(f"max(crm_retention_spend{{{W}}})")], decimals=0), w=6)
    d.add(stat("Customer acquisition cost", [q(f"max(crm_customer_acquisition_cost{{{W}}})")], decimals=0,
               description="Acquisition spend / deals won."), w=6)  # fmt: skip
    d.add(stat("Spend across campaigns", [q(f"sum(max by (campaign) (crm_campaign_spend{{{W}}}))")], decimals=0),
          w=6)  # fmt: skip
    d.add(bars("Spend by campaign", [q(f"sort_desc(max by (campaign) (crm_campaign_spend{{{W}}}))", "{{campaign}}")],
               decimals=0), w=12)  # fmt: skip
    d.add(timeseries("Acquisition cost", [q(f"max(crm_customer_acquisition_cost{{{W}}})", "CAC")], decimals=0),
          w=12)  # fmt: skip
    d.row("Campaigns ($window)")
    d.add(table("Campaign funnel", "campaign", [
        ("touches", f"max by (campaign) (crm_campaign_touches{{{W}}})", "short"),
        ("clicks", f"max by (campaign) (crm_campaign_clicks{{{W}}})", "short"),
        ("responses", f"max by (campaign) (crm_campaign_responses{{{W}}})", "short"),
        ("new leads", f"max by (campaign) (crm_campaign_new_leads{{{W}}})", "short"),
        ("won revenue", f"max by (campaign) (crm_campaign_won_revenue{{{W}}})", "short"),
        ("spend", f"max by (campaign) (crm_campaign_spend{{{W}}})", "short"),
        ("revenue / spend", f"max by (campaign) (crm_campaign_won_revenue{{{W}}})"
                            f" / max by (campaign) (crm_campaign_spend{{{W}}})", "short"),
    ], description="Won revenue is credited to the campaign of the lead that was won."), w=24)  # fmt: skip
    d.add(timeseries("Click-through by campaign", [q(f"max by (campaign) (crm_campaign_clicks{{{W}}})"
                                                     f" / max by (campaign) (crm_campaign_touches{{{W}}})",
                                                     "{{campaign}}")], "percentunit",
                     description="Campaign clicks / campaign touches."), w=12)  # fmt: skip
    d.add(timeseries("New leads by campaign", [q(f"max by (campaign) (crm_campaign_new_leads{{{W}}})",
                                                 "{{campaign}}")], stack=True), w=12)  # fmt: skip
    d.row("Sources ($window)")
    d.add(bars("New leads by source", [q(f"sort_desc(max by (source) (crm_source_new_leads{{{W}}}))", "{{source}}")]),
          w=6)  # fmt: skip
    d.add(bars("New deals by source", [q(f"sort_desc(max by (source) (crm_source_new_deals{{{W}}}))", "{{source}}")]),
          w=6)  # fmt: skip
    d.add(bars("Deals per 100 leads by source",
               [q(f"sort_desc(max by (source) (crm_source_deals_per_100_leads{{{W}}}))", "{{source}}")], decimals=1),
          w=6)  # fmt: skip
    d.add(bars("Conversion by source", [q(f"sort_desc(max by (source) (crm_source_conversion_ratio{{{W}}}))",
                                          "{{source}}")], "percentunit", decimals=1), w=6)  # fmt: skip
    d.row("Lead score ($window)")
    d.add(bars("New leads by score band", [q(f"max by (score_band) (crm_score_band_new_leads{{{W}}})",
                                             "{{score_band}}")]), w=12)  # fmt: skip
    d.add(bars("Conversion by score band", [q(f"max by (score_band) (crm_score_band_conversion_ratio{{{W}}})",
                                              "{{score_band}}")], "percentunit", decimals=1,
               description="Deals won / leads created, by the lead's score band at creation."), w=12)  # fmt: skip
    return d


def customer() -> Dashboard:
    d = Dashboard("crm-pulse-customer", "crm-pulse / Customers",
                  "Churn, retention and the customer base; renewals and purchases; satisfaction and support.",
                  [window_variable()])  # fmt: skip
    d.row("Customer base (30d)")
    d.add(stat("Churn, 30d", [q("crm:churn_ratio:30d")], "percentunit", decimals=1,
               thresholds=steps("green", 0.05, "orange", 0.15, "red"),
               description="Customers active at the window start who cancelled in it / those active at its start."),
          w=4)  # fmt: skip
    d.add(stat("Retention, 30d", [q("crm:retention_ratio:30d")], "percentunit", decimals=1), w=4)
    d.add(stat("Active customers", [q("max(crm_customers_active)")]), w=4)
    d.add(stat("Active at window start", [q('max(crm_customers_active_at_window_start{window="30d"})')]), w=4)
    d.add(stat("Churned in window", [q('max(crm_customers_churned{window="30d"})')]), w=4)
    d.add(stat("Base growth, 30d", [q('max(crm_customer_base_growth_ratio{window="30d"})')], "percentunit",
               decimals=1), w=4)  # fmt: skip
    d.add(timeseries("Churn and retention, 30d", [q("crm:churn_ratio:30d", "churn"),
                                                  q("crm:retention_ratio:30d", "retention")], "percentunit",
                     minimum=0, maximum=1), w=12)  # fmt: skip
    d.add(timeseries("Active customers", [q("max(crm_customers_active)", "active now"),
                                          q('max(crm_customers_active_at_window_start{window="30d"})',
                                            "active 30 days ago")]), w=12)  # fmt: skip
    d.add(stat("Customer lifetime value", [q('max(crm_customer_lifetime_value{window="30d"})')], decimals=0,
               description="Average purchase value × purchase frequency × 1 / churn (30d)."), w=8)  # fmt: skip
    d.add(stat("Retention cost per retained customer", [q('max(crm_retention_cost_per_retained_customer'
                                                          '{window="30d"})')], decimals=1), w=8)  # fmt: skip
    d.add(stat("Complaints per active customer", [q('max(crm_complaint_ratio{window="30d"})')], "percentunit",
               decimals=2), w=8)  # fmt: skip
    d.row("Subscriptions and purchases ($window)")
    d.add(timeseries("Renewals and cancellations", [q(f"max(crm_renewals{{{W}}})", "renewals"),
                                                    q(f"max(crm_cancellations{{{W}}})", "cancellations")]),
          w=12)  # fmt: skip
    d.add(stat("Renewal ratio", [q(f"max(crm_renewal_ratio{{{W}}})")], "percentunit", decimals=1,
               description="Renewals / (renewals + cancellations)."), w=4)  # fmt: skip
    d.add(stat("Purchases", [q(f"max(crm_purchases{{{W}}})")]), w=4)
    d.add(stat("Purchase revenue", [q(f"max(crm_purchase_revenue{{{W}}})")], decimals=0), w=4)
    d.add(stat("Average purchase value", [q(f"max(crm_average_purchase_value{{{W}}})")], decimals=1), w=6)
    d.add(stat("Purchase frequency", [q(f"max(crm_purchase_frequency{{{W}}})")], decimals=2,
               description="Purchases / distinct purchasing customers."), w=6)  # fmt: skip
    d.add(timeseries("Purchase revenue", [q(f"max(crm_purchase_revenue{{{W}}})", "revenue")], decimals=0), w=12)
    d.row("Satisfaction and support ($window)")
    d.add(stat("NPS", [q(f"max(crm_nps_score{{{W}}})")], "none", decimals=0, minimum=-100, maximum=100,
               thresholds=steps("red", 0, "orange", 30, "green")), w=4)  # fmt: skip
    d.add(stat("NPS responses", [q(f"max(crm_nps_responses{{{W}}})")]), w=4)
    d.add(stat("Customer effort score", [q(f"max(crm_customer_effort_score{{{W}}})")], "none", decimals=2,
               description="Mean answer, 1 (easy) to 7 (hard)."), w=4)  # fmt: skip
    d.add(timeseries("Tickets", [q(f"max(crm_tickets_opened{{{W}}})", "opened"),
                                 q(f"max(crm_tickets_resolved{{{W}}})", "resolved"),
                                 q(f"max(crm_complaints{{{W}}})", "complaints")]), w=12)  # fmt: skip
    d.add(timeseries("First-contact resolution", [q("max by (window) (crm_first_contact_resolution_ratio)",
                                                    "{{window}}")], "percentunit",
                     description="Tickets resolved with at most one contact / tickets resolved; exported for "
                                 "windows with resolved tickets."), w=12)  # fmt: skip
    d.add(timeseries("Ticket time to resolution", [
        q("max by (window) (crm_ticket_resolution_mean_seconds)", "mean {{window}}"),
        q('max by (window) (crm_ticket_resolution_p90_seconds)', "p90 {{window}}"),
    ], "s"), w=12)
    return d


def operations() -> Dashboard:
    d = Dashboard("crm-pulse-operations", "crm-pulse / Operations",
                  "Worker health: event throughput, dead letters, duplicates, alerts, event-time lag, consumer "
                  "offsets and lag.", refresh="15s")  # fmt: skip
    d.row("Throughput")
    d.add(stat("Workers up", [q('sum(up{job="crm-pulse"})')], thresholds=steps("red", 1, "green"),
               description="Scraped crm-pulse workers that answered /metrics."), w=4)  # fmt: skip
    d.add(stat("Received / s", [q("crm:events_received:rate5m")], "ops", decimals=2), w=4)
    d.add(stat("Processed / s", [q("crm:events_processed:rate5m")], "ops", decimals=2), w=4)
    d.add(stat("Dead-lettered / s", [q("crm:dlq:rate5m")], "ops", decimals=3,
               thresholds=steps("green", 0.05, "orange", 0.1, "red")), w=4)  # fmt: skip
    d.add(stat("Dead-letter share", [q("crm:dlq_ratio:rate5m")], "percentunit", decimals=2,
               thresholds=steps("green", 0.01, "orange", 0.05, "red")), w=4)  # fmt: skip
    d.add(stat("Duplicates / s", [q("crm:events_duplicate:rate5m")], "ops", decimals=3), w=4)
    d.add(timeseries("Events", [
        q(f"sum(rate(crm_events_received_total[{RATE}]))", "received"),
        q(f"sum(rate(crm_events_processed_total[{RATE}]))", "processed"),
        q(f"sum(rate(crm_events_invalid_total[{RATE}]))", "dead-lettered"),
        q(f"sum(rate(crm_events_duplicate_total[{RATE}]))", "duplicates"),
    ], "ops"), w=12)
    d.add(timeseries("Processed by type", [q(f"sum by (type) (rate(crm_events_processed_total[{RATE}]))",
                                             "{{type}}")], "ops", stack=True), w=12)  # fmt: skip
    d.add(timeseries("Dead letters by reason", [q(f"sum by (reason) (rate(crm_events_invalid_total[{RATE}]))",
                                                  "{{reason}}")], "ops", stack=True), w=8)  # fmt: skip
    d.add(bars("Dead letters in the time range, by reason",
               [q("sort_desc(sum by (reason) (increase(crm_events_invalid_total[$__range])))", "{{reason}}")],
               decimals=0), w=8)  # fmt: skip
    d.add(timeseries("Duplicates by type", [q(f"sum by (type) (rate(crm_events_duplicate_total[{RATE}]))",
                                              "{{type}}")], "ops", stack=True), w=8)  # fmt: skip
    d.add(timeseries("Alerts published by type", [q(f"sum by (type) (rate(crm_alerts_emitted_total[{RATE}]))",
                                                    "{{type}}")], "ops"), w=12)  # fmt: skip
    d.add(timeseries("Event-time lag", [q("crm:event_time_lag_seconds:max", "slowest worker"),
                                        q("time() - crm_event_time_watermark_seconds", "{{instance}}")], "s",
                     description="Wall clock − event-time watermark (latest event time of the slowest input "
                                 "partition). It grows when no events arrive, or when one partition falls "
                                 "behind."), w=12)  # fmt: skip
    d.row("Kafka consumer")
    d.add(timeseries("Consumer lag by topic", [q("crm:consumer_lag_messages:by_topic", "{{topic}}")],
                     description="End offset − committed offset, summed over partitions."), w=12)  # fmt: skip
    d.add(timeseries("Messages committed by topic",
                     [q(f"sum by (topic) (deriv(crm_consumer_committed_offset[{RATE}]))", "{{topic}}")], "ops",
                     stack=True, description="How fast the workers' committed offsets advance."), w=12)  # fmt: skip
    d.add(timeseries("Messages arriving by topic",
                     [q(f"sum by (topic) (deriv(crm_consumer_end_offset[{RATE}]))", "{{topic}}")], "ops",
                     stack=True, description="How fast the end offsets of the topics the workers read "
                                             "advance."), w=8)  # fmt: skip
    d.add(timeseries("Rebalances", [q(f"sum(increase(crm_consumer_rebalances_total[{RATE}]))", "rebalances")],
                     decimals=0), w=8)  # fmt: skip
    d.add(timeseries("/metrics scrape duration", [q('scrape_duration_seconds{job="crm-pulse"}', "{{instance}}")],
                     "s", description="KPI gauges are computed from the tables on each scrape."), w=8)  # fmt: skip
    d.row("Process")
    d.add(timeseries("CPU", [q(f'rate(process_cpu_seconds_total{{job="crm-pulse"}}[{RATE}])', "{{instance}}")],
                     "percentunit"), w=12)  # fmt: skip
    d.add(timeseries("Resident memory", [q('process_resident_memory_bytes{job="crm-pulse"}', "{{instance}}")],
                     "bytes"), w=12)  # fmt: skip
    return d


def deals() -> Dashboard:
    d = Dashboard("crm-pulse-deals", "crm-pulse / Deal inspection",
                  "Weighted pipeline by close month, rep and team; stage conversion and P(win | stage) from closed "
                  "deals; deal health by band; deal alerts (slips, past due, regressions, shrinking amounts). "
                  "Formulas: docs/deals.md.", [label_variable("rep", "Rep", "crm_pipeline_weighted_value")])  # fmt: skip
    weighted = f"crm_pipeline_weighted_value{{{REP}}}"
    deal_alerts = 'crm_alerts_emitted_total{type=~"deal[.].+"}'
    d.row("Forecast: Σ amount × P(win | stage) of open deals")
    d.add(stat("Weighted pipeline", [q(f"sum({weighted})")], decimals=0,
               description="Open deals with an amount and close date, weighted by their stage's win probability "
                           "(selected reps)."))  # fmt: skip
    d.add(stat("Open deals scored", [q("sum(crm_deal_health_deals)")], decimals=0,
               description="Open leads and deals with a deal health score: every open one."))  # fmt: skip
    d.add(stat("Critical deals", [q('sum(crm_deal_health_deals{band="critical"}) / sum(crm_deal_health_deals)')],
               "percentunit", decimals=1, thresholds=steps("green", 0.2, "orange", 0.3, "red"),
               description="Deals with health below 40 / open deals. Above 30% for 1 h raises "
                           "CrmDealsCriticalShareHigh."))  # fmt: skip
    d.add(stat("Deal alerts in the time range", [q(f"sum(increase({deal_alerts}[$__range]))")], decimals=0))
    d.add(bars("Weighted pipeline by close month", [q(f"sum by (close_month) ({weighted})", "{{close_month}}")],
               decimals=0), w=8)  # fmt: skip
    d.add(bars("Weighted pipeline by rep", [q(f"sort_desc(sum by (rep) ({weighted}))", "{{rep}}")], decimals=0), w=8)
    d.add(bars("Weighted pipeline by team", [q(f"sum by (team) ({weighted})", "{{team}}")], decimals=0), w=8)
    d.add(timeseries("Weighted pipeline by pipeline", [q(f"sum by (pipeline) ({weighted})", "{{pipeline}}")],
                     stack=True), w=12)  # fmt: skip
    d.add(timeseries("Month forecast (made at the month's start) and won", [
        q("sum by (window) (crm_forecast_weighted_value)", "forecast {{window}}"),
        q("sum by (window) (crm_forecast_won_value)", "won {{window}}"),
    ], decimals=0), w=8)
    d.add(stat("Last month's forecast accuracy", [q("crm:forecast_accuracy_ratio:month_previous")], "percentunit",
               decimals=1, description="1 − |won − forecast| / won, for the previous month."), w=4)  # fmt: skip
    d.add(bars("Last month's forecast accuracy by team",
               [q("sort_desc(crm:forecast_accuracy_ratio:month_previous_by_team)", "{{team}}")], "percentunit",
               decimals=1, description="1 − |won − forecast| / won of each team's deals, for the previous month."),
          w=6)  # fmt: skip
    d.add(bars("Last month's forecast accuracy by rep",
               [q(f"sort_desc(crm:forecast_accuracy_ratio:month_previous_by_rep{{{REP}}})", "{{rep}} ({{team}})")],
               "percentunit", decimals=1,
               description="1 − |won − forecast| / won of each rep's deals, for the previous month (selected reps)."),
          w=6)  # fmt: skip
    d.row("Conversion: deals closed in the trailing window (CRM_PULSE_DEAL_HISTORY_DAYS)")
    d.add(bars("P(win | stage)", [q("crm:deal_win_probability_ratio:by_stage", "{{pipeline}} {{stage}}")],
               "percentunit", minimum=0, maximum=1,
               description="Won / reached among closed deals that reached the stage."), w=8)  # fmt: skip
    d.add(bars("Stage conversion", [q("max by (pipeline, stage) (crm_deal_stage_conversion_ratio)",
                                      "{{pipeline}} {{stage}}")], "percentunit", minimum=0, maximum=1,
               description="Closed deals that went on to a later stage or were won / reached."), w=8)  # fmt: skip
    d.add(bars("Closed deals behind them", [q("max by (pipeline, stage) (crm_deal_closed_reached)",
                                              "{{pipeline}} {{stage}}")], decimals=0), w=8)  # fmt: skip
    d.row("Deal health and deal alerts")
    d.add(timeseries("Open deals by health band", [q("crm:deal_health_deals:by_band", "{{band}}")], stack=True,
                     description="healthy ≥ 70, at_risk ≥ 40, critical below (docs/deals.md#deal-health)."),
          w=12)  # fmt: skip
    d.add(bars("Health bands by pipeline", [q("sum by (pipeline, band) (crm_deal_health_deals)",
                                              "{{pipeline}} {{band}}")], decimals=0), w=12)  # fmt: skip
    d.add(timeseries("Deal alerts published", [q(f"sum by (type) (rate({deal_alerts}[{RATE}]))", "{{type}}")], "ops"),
          w=12)  # fmt: skip
    d.add(bars("Deal alerts in the time range, by type",
               [q(f"sort_desc(sum by (type) (increase({deal_alerts}[$__range])))", "{{type}}")], decimals=0),
          w=12)  # fmt: skip
    return d


DASHBOARDS = {"pipeline": pipeline, "sales": sales, "marketing": marketing, "customer": customer,
              "operations": operations, "deals": deals}  # fmt: skip


def render() -> dict[str, str]:
    """{file name: JSON text} of every dashboard."""
    return {f"{name}.json": json.dumps(build().json(), indent=2, ensure_ascii=False) + "\n"
            for name, build in DASHBOARDS.items()}  # fmt: skip


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
