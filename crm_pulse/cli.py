"""`crm-pulse` command line: `worker` runs the stream processor, `demo` runs it with synthetic traffic."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from crm_pulse.broker import broker_for, ensure_topics
from crm_pulse.config import Settings


def run_worker(settings: Settings) -> None:
    with broker_for(settings) as resolved:
        ensure_topics(resolved)
        # The Faust app reads its settings from the environment when first imported.
        os.environ["CRM_PULSE_BROKER"] = resolved.broker
        from agents.worker import run

        run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="crm-pulse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("worker", help="run the stream processor (embedded broker unless CRM_PULSE_BROKER is set)")
    demo = commands.add_parser("demo", help="embedded broker + worker + synthetic CRM traffic, with a live summary")
    demo.add_argument("--speed", type=float, default=3 * 3600, help="simulated seconds per real second")
    demo.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    args = parser.parse_args(argv)

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if args.command == "worker":
        run_worker(settings)
    elif args.command == "demo":
        from crm_pulse.demo import run_demo

        sys.exit(run_demo(settings, speed=args.speed, seconds=args.seconds))


if __name__ == "__main__":
    main()
