"""The gauges computed from a pipeline's tables and in-memory state at every scrape (`metrics.export_gauges`
serves them at /metrics, `web` as JSON at /kpis): KPIs, duration histograms, the customer base, open and
stalled leads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from crm_pulse.streams.catalogue import (
    KPIS, WINDOWS, baseline_comparison, customer_base_kpis, period_customer_base, period_kpis, window_sums,
)  # fmt: skip
from crm_pulse.streams.clock import Clock
from crm_pulse.streams.families import OVERALL
from crm_pulse.streams.kpis import CHURN_WINDOW_DAYS, churn, customers_started, day_of, dwell_stats, period_dwell_stats
from crm_pulse.streams.periods import current_periods, date_of_day, parse_period, period_days, periods_since

if TYPE_CHECKING:  # only for the types: `crm-pulse report` computes its gauges without Faust
    from crm_pulse.agents.aggregates import Aggregates
    from crm_pulse.agents.customers import Customers
    from crm_pulse.agents.leads import Leads

# Percentiles as gauges of their own: a "quantile" label is reserved for summaries.
PERCENTILES = (50, 90)
# Histogram scope prefix → (metric prefix, help subject, label of the scope's value or None).
HISTOGRAMS = {
    "dwell": ("crm_stage_dwell", "time spent in a stage, counted when the lead left it", "stage"),
    "cycle": ("crm_sales_cycle", "sales cycle (lead created → deal won), counted when won", None),
    "resolution": ("crm_ticket_resolution", "ticket time to resolution, counted when resolved", None),
}
CUSTOMER_BASE_HELP = {
    "churn_ratio": "Customers active at the window start who cancelled in it / those active at its start.",
    "retention_ratio": "1 - churn ratio.",
    "customers_active_at_window_start": "Customers active when the window opened.",
    "customers_churned": "Customers active at the window start who cancelled in it.",
    "customer_base_growth_ratio": "(Customers active now - active at the window start) / active at the start.",
    "customer_lifetime_value": "LTV: average purchase value × purchase frequency × average lifespan (1 / churn).",
    "retention_cost_per_retained_customer": "Retention spend in the window / customers retained through it.",
    "complaint_ratio": "Complaints in the window / customers active now.",
    "customers_new": "Customers who became active in the window (subscribed, or came back after cancelling).",
}
# [(window label, calendar period kind, period label)]: what a scrape or a /kpis?period= query covers.
Periods = list[tuple[str, str, str]]


class Gauges(Collector):
    """One pipeline's gauges, as a Prometheus collector."""

    def __init__(self, clock: Clock, aggregates: Aggregates, customers: Customers, leads: Leads):
        self.clock, self.aggregates, self.customers, self.leads = clock, aggregates, customers, leads
        self.zone = aggregates.zone
        # Per kpi-sums key: (what its samples were computed from, the samples). They depend only on the deltas
        # applied to it, which its per-origin marks name, and on the day: a scrape recomputes only the keys whose
        # marks moved since the last one (all of them once a day), not every KPI of every rep, source and campaign.
        self.kpi_samples: dict[str, tuple[tuple, list]] = {}

    def today(self) -> int | None:
        now = self.clock.now_ms()
        return None if now is None else day_of(now, self.zone)

    def collect(self) -> list[GaugeMetricFamily]:
        return [*self.kpi_families(), *self.lead_gauges()]

    def kpi_families(self) -> list[GaugeMetricFamily]:
        """The gauges computed from the aggregates: KPIs, duration histograms and the customer base."""
        return [*self.kpi_gauges(), *self.histogram_gauges(), *self.customer_base_gauges()]

    def periods(self, periods: Periods) -> list[GaugeMetricFamily]:
        """The period KPIs, duration histograms and customer base over the given calendar periods only."""
        return [*self.kpi_gauges(periods), *self.histogram_gauges(periods), *self.customer_base_gauges(periods)]

    def histogram_gauges(self, periods: Periods | None = None):
        families = {}
        for prefix, (metric, subject, label) in HISTOGRAMS.items():
            labels = ([label] if label else []) + ["window"]
            families[prefix] = (
                GaugeMetricFamily(f"{metric}_observations", f"Observations of {subject}, in the window.", labels=labels),
                GaugeMetricFamily(f"{metric}_mean_seconds", f"Mean {subject}.", labels=labels),
                *(GaugeMetricFamily(f"{metric}_p{percent}_seconds", f"{percent}th percentile of {subject}, "
                                    "interpolated within fixed histogram buckets.", labels=labels)
                  for percent in PERCENTILES),
            )
        now = self.clock.now_ms()
        if now is not None:
            for scope, state in self.aggregates.histograms.items():
                prefix, _, value = scope.partition(":")
                observations, mean, *percentiles = families[prefix]
                scope_labels = [value] if HISTOGRAMS[prefix][2] else []
                rolling = [] if periods is not None else [(window, dwell_stats(state, now, days, self.zone))
                                                          for window, days in WINDOWS.items()]  # fmt: skip
                calendar = [(window, period_dwell_stats(state, kind, label)) for window, kind, label
                            in (current_periods(day_of(now, self.zone)) if periods is None else periods)]  # fmt: skip
                for window, stats in rolling + calendar:
                    if not stats.count:
                        continue
                    observations.add_metric([*scope_labels, window], stats.count)
                    mean.add_metric([*scope_labels, window], stats.mean_seconds)
                    for percent, family in zip(PERCENTILES, percentiles):
                        family.add_metric([*scope_labels, window], stats.quantile_seconds(percent / 100))
        return [metric for group in families.values() for metric in group]

    def scope_samples(self, scope: str, state: dict, today: int) -> list[tuple]:
        """(kpi, dimension, label values, value) for every KPI of one kpi-sums key, over the rolling windows and
        the current and previous calendar periods."""
        version = (today, sorted((origin, *mark) for origin, mark in state.get("applied", {}).items()))
        if (cached := self.kpi_samples.get(scope)) and cached[0] == version:
            return cached[1]
        samples = []
        for window, days in WINDOWS.items():
            sums = window_sums(state, today, days)
            previous = {} if days is None else window_sums(state, today, days, offset_days=days)
            samples += self.labelled(scope, window, ((kpi, kpi.formula(sums, previous, days)) for kpi in KPIS))
        samples += self.period_samples(scope, state, current_periods(today))
        self.kpi_samples[scope] = (version, samples)
        return samples

    def period_samples(self, scope: str, state: dict, periods: Periods) -> list[tuple]:
        return [sample for window, kind, label in periods
                for sample in self.labelled(scope, window, period_kpis(state, kind, label))]  # fmt: skip

    @staticmethod
    def labelled(scope: str, window: str, results) -> list[tuple]:
        """(kpi, dimension, label values, value) of the (kpi, value) pairs defined and kept for the scope."""
        dimension, _, value = scope.partition(":")
        dimension = None if scope == "all" else dimension
        return [(kpi, dimension, [*([value] if dimension else []), window, *(v for _, v in kpi.labels)], result)
                for kpi, result in results
                if result is not None and (dimension is None or dimension in kpi.dimensions)]  # fmt: skip

    def kpi_gauges(self, periods: Periods | None = None):
        families: dict[str, GaugeMetricFamily] = {}

        def family(kpi, dimension):
            name = kpi.metric(dimension)
            if name not in families:
                labels = ([dimension] if dimension else []) + ["window"] + [k for k, _ in kpi.labels]
                families[name] = GaugeMetricFamily(name, kpi.help, labels=labels)
            return families[name]

        today = self.today()
        for kpi in KPIS:  # every family is described even before it has data
            for dimension in (None, *kpi.dimensions):
                family(kpi, dimension)
        vs_baseline = GaugeMetricFamily(
            "crm_kpi_baseline", "A KPI over the configured baseline period (e.g. before the CRM went live).", labels=["kpi"]
        )
        ratio_to_baseline = GaugeMetricFamily(
            "crm_kpi_to_baseline_ratio", "A KPI in the window / the same KPI over the baseline period.",
            labels=["kpi", "window"],
        )  # fmt: skip
        if periods is not None:
            for scope, state in self.aggregates.kpi_sums.items():
                for kpi, dimension, labels, result in self.period_samples(scope, state, periods):
                    family(kpi, dimension).add_metric(labels, result)
            return [family for family in families.values() if family.samples]
        if today is not None:
            kpi_sums = self.aggregates.kpi_sums
            scopes = dict(kpi_sums.items())
            for scope, state in scopes.items():
                for kpi, dimension, labels, result in self.scope_samples(scope, state, today):
                    family(kpi, dimension).add_metric(labels, result)
            for gone in self.kpi_samples.keys() - scopes.keys():  # moved to another worker
                del self.kpi_samples[gone]
            if "baseline" in (overall := kpi_sums.get("all", {})):
                baseline_values, ratios = baseline_comparison(overall, today)
                for metric, value in baseline_values.items():
                    vs_baseline.add_metric([metric], value)
                for (metric, window), value in ratios.items():
                    ratio_to_baseline.add_metric([metric, window], value)
        return [*families.values(), vs_baseline, ratio_to_baseline]

    def customer_base_gauges(self, periods: Periods | None = None):
        window = f"{CHURN_WINDOW_DAYS}d"
        families = {
            name: GaugeMetricFamily(f"crm_{name}", help_text, labels=["window"])
            for name, help_text in CUSTOMER_BASE_HELP.items()
        }
        active = GaugeMetricFamily("crm_customers_active", "Customers with an active subscription now.")
        now = self.clock.now_ms()
        state = self.customers.customer_base.get(OVERALL)
        if now is None or not state:
            return [] if periods is not None else [*families.values(), active]
        today = day_of(now, self.zone)
        values = []
        if periods is None:
            base = churn(state, now, zone=self.zone)
            active.add_metric([], base.active_now)
            sums = window_sums(self.aggregates.kpi_sums.get(OVERALL, {}), today, CHURN_WINDOW_DAYS)
            started = customers_started(state, today - CHURN_WINDOW_DAYS + 1, today)
            values.append((window, {**customer_base_kpis(base, sums), "customers_new": started}))
        # Older periods than the spells' horizon (`agents.customers`) are no longer exact: left out.
        horizon = state.get("horizon")
        values += [(window, period_customer_base(state, kind, label))
                   for window, kind, label in (current_periods(today) if periods is None else periods)
                   if horizon is None or period_days(kind, label)[0] >= horizon]  # fmt: skip
        for window, named in values:
            for name, value in named.items():
                if value is not None:
                    families[name].add_metric([window], value)
        return [*families.values(), active]

    def lead_gauges(self):
        index = self.leads.index
        open_leads = GaugeMetricFamily("crm_leads_open", "Open leads by current stage.", labels=["stage"])
        pipeline_value = GaugeMetricFamily(
            "crm_pipeline_open_value", "Open pipeline value (latest quote of each open lead) by stage.", labels=["stage"]
        )
        for stage, n in sorted(index.open_by_stage.items()):
            open_leads.add_metric([stage], n)
            pipeline_value.add_metric([stage], index.value_by_stage[stage])
        stalled = GaugeMetricFamily(
            "crm_leads_stalled", "Open leads currently stalled, by rep and stage.", labels=["rep", "stage"]
        )
        for (rep, stage), n in sorted(index.stalled_by_rep_stage.items()):
            stalled.add_metric([rep, stage], n)
        watermark = GaugeMetricFamily(
            "crm_event_time_watermark_seconds",
            "Event-time watermark: the latest event time of this worker's slowest input partition (Unix seconds).",
        )
        if self.clock.watermark_ms is not None:
            watermark.add_metric([], self.clock.watermark_ms / 1000)
        return [open_leads, pipeline_value, stalled, watermark]


def kpi_snapshot(families, prefix: str = "crm_") -> dict[str, list[dict]]:
    """{metric: [{"labels": {...}, "value": v}]} for every gauge with samples whose name starts with `prefix`."""
    return {
        family.name: [{"labels": s.labels, "value": s.value} for s in family.samples]
        for family in families
        if family.name.startswith(prefix) and family.samples
    }


def period_table(gauges: Gauges, kind: str, first: str) -> list[dict]:
    """Each `kind` period from `first` to the current one, its days and its KPIs (`window` names the period).
    ValueError names a period or `from` that is wrong."""
    first = parse_period(kind, first)
    today = gauges.today()
    labels = [] if today is None else periods_since(kind, first, today)
    snapshot = kpi_snapshot(gauges.periods([(label, kind, label) for label in labels]))
    table = []
    for label in labels:
        first_day, last_day = period_days(kind, label)
        kpis = {name: kept for name, samples in snapshot.items()
                if (kept := [s for s in samples if s["labels"]["window"] == label])}  # fmt: skip
        table.append({"period": label, "first_day": date_of_day(first_day).isoformat(),
                      "last_day": date_of_day(last_day).isoformat(), "kpis": kpis})  # fmt: skip
    return table
