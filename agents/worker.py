"""Assemble every agent and table into the Faust worker, and serve its metrics."""

from __future__ import annotations

import gc

import faust

from crm_pulse.agents import aggregates, changelog_seals, customers, deals, ingest, leads, signals, web
from crm_pulse.agents.app import Pipeline
from crm_pulse.agents.faust_fixes import check_versions
from crm_pulse.agents.gauges import Gauges
from crm_pulse.agents.metrics import serve_metrics
from crm_pulse.config import Settings


def build_app(settings: Settings) -> Pipeline:
    """A pipeline with every KPI family's tables, agents, timer, rebalance handlers and query pages on its
    app, configured by `settings` alone. Nothing process-wide is touched: `run` adds /metrics."""
    pipeline = Pipeline(settings)
    pipeline.aggregates = aggregates.install(pipeline)
    changelog_seals.install(pipeline)
    pipeline.customers = customers.install(pipeline)
    pipeline.ingest = ingest.install(pipeline)
    pipeline.leads = leads.install(pipeline, pipeline.aggregates)
    pipeline.deals = deals.install(pipeline, pipeline.leads)
    pipeline.signals = signals.install(pipeline)
    pipeline.gauges = Gauges(pipeline.clock, pipeline.aggregates, pipeline.customers, pipeline.leads)
    web.install(pipeline, pipeline.gauges, pipeline.leads, pipeline.deals)
    return pipeline


def freeze_what_is_loaded() -> None:
    """Keeps everything alive before the worker starts (modules, the app) out of the cyclic GC's full
    collections, which walk every tracked object: with it in them, they paused a worker at 1,000 events/s
    ~63 ms each, 7 times in 45 s (~9 ms without it)."""
    gc.collect()
    gc.freeze()


def run(settings: Settings) -> None:
    check_versions()
    pipeline = build_app(settings)
    serve_metrics(pipeline)
    freeze_what_is_loaded()
    faust.Worker(pipeline.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
