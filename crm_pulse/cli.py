"""`crm-pulse` command line: `worker` runs the stream processor, `demo` runs it with synthetic traffic."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

import orjson

from crm_pulse.broker import BrokerUnusable, bind_error, broker_for, create_missing, ensure_topics, seal_changelogs
from crm_pulse.config import Settings, SettingsInvalid, env_name, load_settings
from crm_pulse.directory import DirectoryInvalid, import_user_export
from crm_pulse.streams.periods import PERIODS


def check_port_free(host: str, port: int, variable: str = "CRM_PULSE_METRICS_PORT") -> None:
    """Faust would find the port taken only once it has joined its group, and then stop with tracebacks."""
    if (exc := bind_error(host, port)) is not None:
        reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise SettingsInvalid(
            f"{variable}={port}: {host}:{port} {reason}; stop what listens there or choose another port"
        ) from exc


def settings_help() -> str:
    """Every setting with its default, for `crm-pulse worker --help`."""
    def shown(value) -> str:
        if value is None:
            return "unset"
        if isinstance(value, (frozenset, dict)):
            return orjson.dumps(sorted(value) if isinstance(value, frozenset) else value).decode()
        return str(value)

    rows = [f"  {env_name(name):<42} {shown(field.default)}" for name, field in Settings.model_fields.items()]
    return "\n".join(["settings (default; docs/configuration.md says what each does):", *rows])


def run_worker(settings: Settings) -> None:
    check_port_free(settings.metrics_host, settings.metrics_port)
    with broker_for(settings) as resolved:
        seal_changelogs(resolved, ensure_topics(resolved, writes=(resolved.alerts_topic, resolved.dlq_topic)))
        from crm_pulse.agents.worker import run

        run(resolved)


def run_gateway(settings: Settings) -> None:
    import asyncio
    import signal

    from crm_pulse.gateway import load_stage_map, serve

    if not settings.broker:
        # An embedded broker would vanish with the gateway, and the events the CRMs were told are safe with it.
        raise SettingsInvalid("CRM_PULSE_BROKER is not set: set it to the broker your worker reads (kafka://host:port)")
    stages = load_stage_map(settings.gateway_mapping)
    check_port_free(settings.gateway_host, settings.gateway_port, "CRM_PULSE_GATEWAY_PORT")
    with broker_for(settings) as resolved:
        ensure_topics(resolved, writes=(resolved.input_topic, resolved.dlq_topic))
        if resolved.notify_link_secret:  # the gateway may start before any notifier has created it
            create_missing(resolved, {resolved.effective_notify_snoozes_topic: {"cleanup.policy": "compact"}})

        async def until_signalled() -> None:
            stop = asyncio.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(signum, stop.set)
            await serve(resolved, stages, stop)

        asyncio.run(until_signalled())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="crm-pulse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "worker", help="run the stream processor (embedded broker unless CRM_PULSE_BROKER is set)",
        description="Run the stream processor, configured by the CRM_PULSE_* environment variables below.",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands.add_parser("gateway", help="receive CRM webhooks and publish them as contract events (docs/ingestion.md)")
    demo = commands.add_parser("demo", help="embedded broker + worker + synthetic CRM traffic, with a live summary")
    demo.add_argument("--speed", type=float, default=3 * 3600, help="simulated seconds per real second")
    demo.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    kafka = commands.add_parser("kafka", help="run Apache Kafka (KRaft, one node) on loopback until Ctrl-C")
    kafka.add_argument("--data-dir", type=Path, help="keep the broker's log here across runs (default: a temporary one)")
    alerts = commands.add_parser("alerts", help="example consumers of the alerts topic (docs/alerts.md)")
    alert_commands = alerts.add_subparsers(dest="alerts_command", required=True)
    tail = alert_commands.add_parser("tail", help="print alerts one per line; invalid records go to stderr")
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest alert, not the newest")
    tail.add_argument("--no-follow", action="store_true", help="stop at the end of the topic instead of waiting")
    notify = alert_commands.add_parser("notify", help="route alerts to reps on Slack, e-mail, Teams, webhooks")
    notify.add_argument("--webhook-url", help="a Slack incoming webhook (default: $CRM_PULSE_WEBHOOK_URL)")
    notify.add_argument("--group", help="consumer group (default: <app id>-alerts-notify); one per notifier setup")
    notify.add_argument("--from-beginning", action="store_true", help="a new group starts at the oldest alert")
    notify.add_argument("--max-attempts", type=int, default=5, help="tries per delivery before dead-lettering it")
    notify.add_argument("--max-idle", type=float, default=None, help="stop after this many seconds without alerts")
    import_reps = alert_commands.add_parser("import-reps", help="write a rep directory CSV from a CRM user export")
    import_reps.add_argument("export", type=Path, help="the CRM's user export (CSV)")
    import_reps.add_argument("out", type=Path, help="the rep directory to write (CSV; see docs/alerts.md)")
    importer = commands.add_parser(
        "import", help="publish CSV exports as CRM events, merged in time order (see docs/importer.md)",
        usage="crm-pulse import FILE --mapping MAPPING [FILE --mapping MAPPING ...] [options]",
    )  # fmt: skip
    importer.add_argument("file", type=Path, nargs="+", help="a CSV export")
    importer.add_argument("--mapping", type=Path, required=True, action="append",
                          help="TOML mapping: columns → events; one per FILE, in order, or one for all")  # fmt: skip
    importer.add_argument("--dry-run", type=Path, metavar="OUT.jsonl", help="write events here, don't publish")
    importer.add_argument("--rejects", type=Path,
                          help="one FILE's rejected rows (default: OUT.rejects.csv, ./FILE.rejects.csv)")  # fmt: skip
    importer.add_argument("--allow-late", action="store_true",
                          help="publish even events the worker will dead-letter as late")  # fmt: skip
    importer.add_argument("--wait", action="store_true",
                          help="wait until the worker has applied the events, then show its headline KPIs")  # fmt: skip
    importer.add_argument("--wait-timeout", type=float, default=600, metavar="SECONDS", help="for --wait")
    reporter = commands.add_parser(
        "report", help="KPIs of CSV exports or of the input topic's history, without a worker (see docs/report.md)",
        usage="crm-pulse report (FILE --mapping MAPPING [FILE --mapping MAPPING ...] | --topic) [options]",
    )  # fmt: skip
    reporter.add_argument("file", type=Path, nargs="*", help="a CSV export, read as `crm-pulse import` reads it")
    reporter.add_argument("--mapping", type=Path, action="append", default=[],
                          help="TOML mapping: columns → events; one per FILE, in order, or one for all")  # fmt: skip
    reporter.add_argument("--topic", action="store_true", help="the input topic's history instead (CRM_PULSE_BROKER)")
    reporter.add_argument("--period", help=f"every calendar period instead of the rolling windows: {', '.join(PERIODS)}")
    reporter.add_argument("--from", dest="first", metavar="PERIOD",
                          help="the first period, e.g. 2018-W05, 2018-01, 2018-Q1 (default: the first event's)")  # fmt: skip
    reporter.add_argument("--format", default="table", help="table (the overall series; default), csv or json")
    reporter.add_argument("--out", type=Path, help="write here instead of standard output")
    # argparse takes one run of positionals: the files after the first --mapping come back unrecognised.
    args, more = parser.parse_known_args(argv)
    if args.command in ("import", "report") and not [a for a in more if a.startswith("-")]:
        args.file += [Path(a) for a in more]
    elif more:
        parser.error(f"unrecognized arguments: {' '.join(more)}")

    try:
        settings = load_settings()
    except SettingsInvalid as exc:
        print(f"crm-pulse: {exc} (settings: docs/configuration.md)", file=sys.stderr, flush=True)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # At debug level these log record keys and values (personal data) and SASL PLAIN tokens (passwords).
    for name in ("aiokafka", "faust.topics", "faust.transport.drivers.aiokafka"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    try:
        if args.command == "kafka":
            from crm_pulse.kafka import serve

            sys.exit(serve(args.data_dir))
        if args.command == "worker":
            run_worker(settings)
        elif args.command == "gateway":
            run_gateway(settings)
        elif args.command == "demo":
            from crm_pulse.demo import run_demo

            sys.exit(run_demo(settings, speed=args.speed, seconds=args.seconds))
        elif args.command == "import":
            from crm_pulse.importer import cli_import

            sys.exit(cli_import(settings, args.file, args.mapping, args.dry_run, args.rejects, args.allow_late,
                                args.wait_timeout if args.wait else None))  # fmt: skip
        elif args.command == "report":
            from crm_pulse.report import cli_report

            sys.exit(cli_report(settings, args.file, args.mapping, args.topic, args.period, args.first, args.format,
                                args.out))  # fmt: skip
        elif args.command == "alerts" and args.alerts_command == "tail":
            from crm_pulse.alerts import tail

            tail(settings, from_beginning=args.from_beginning, follow=not args.no_follow, out=sys.stdout)
        elif args.command == "alerts" and args.alerts_command == "notify":
            from crm_pulse.notify import notify

            counts = notify(
                settings, args.webhook_url, group=args.group, from_beginning=args.from_beginning,
                max_attempts=args.max_attempts, max_idle_seconds=args.max_idle,
            )  # fmt: skip
            sys.exit(1 if counts["failed"] else 0)
        elif args.command == "alerts" and args.alerts_command == "import-reps":
            reps = import_user_export(args.export, args.out)
            print(f"wrote {reps} reps to {args.out}")
    except (BrokerUnusable, SettingsInvalid, DirectoryInvalid) as exc:
        # The user's mistake, said in one line; how it came about only for whoever asked for debug output.
        logging.getLogger("crm_pulse").debug("cannot go on", exc_info=True)
        print(f"crm-pulse: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
