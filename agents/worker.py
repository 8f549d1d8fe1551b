"""Assemble every agent and table into the Faust worker, with Faust's own Prometheus sensors."""

from __future__ import annotations

import faust
from faust.sensors.prometheus import setup_prometheus_sensors

from agents import aggregates, customers, ingest, leads, signals, web  # noqa: F401  (registers agents, tables, views)
from agents.app import app, settings

setup_prometheus_sensors(app, pattern="/metrics", name_prefix="crm_pulse_faust")


def run() -> None:
    faust.Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
