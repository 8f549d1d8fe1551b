"""Backfill: `crm-pulse import` (a real process) publishing several Maven-shaped exports (mappings/maven-crm.toml)
merged in event-time order: events per second, the importer's peak RSS (its external sort must keep memory
bounded whatever the size) and its temporary disk, then every published event counted on the input topic."""

from __future__ import annotations

import csv
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.harness import REPO, Bench, rate

MAPPING = REPO / "mappings" / "maven-crm.toml"
COLUMNS = ["opportunity_id", "sales_agent", "product", "account", "deal_stage", "engage_date", "close_date",
           "close_value", "engage_quarter", "close_quarter"]  # fmt: skip
# The export's own mix: an engaging (open) row is one event, a won or lost row two.
STAGES = [("Won", 0.48), ("Lost", 0.32), ("Engaging", 0.20)]
EVENTS_PER_STAGE = {"Won": 2, "Lost": 2, "Engaging": 1}
FIRST_DAY = date(2016, 1, 1)


def write_exports(directory: Path, events: int, files: int, seed: int = 23) -> list[Path]:
    """Files of opportunities, `events` events in all, dealt round-robin so every file spans the whole history
    (the merge then interleaves them all the way through, as exports of one CRM's objects do)."""
    rng = random.Random(seed)
    names, weights = zip(*STAGES)
    paths = [directory / f"opportunities-{n}.csv" for n in range(files)]
    handles = [open(path, "w", newline="") for path in paths]
    try:
        writers = [csv.writer(handle) for handle in handles]
        for writer in writers:
            writer.writerow(COLUMNS)
        written = row = 0
        while written < events:
            stage = rng.choices(names, weights)[0] if events - written > 1 else "Engaging"
            engaged = FIRST_DAY + timedelta(days=rng.randrange(3650))
            closed = engaged + timedelta(days=rng.randrange(1, 140)) if stage != "Engaging" else None
            writers[row % files].writerow([
                f"OPP{row:09d}", f"Agent {rng.randrange(200)}", "GTX Basic", f"Account {rng.randrange(5000)}", stage,
                engaged.strftime("%d-%m-%y"), closed.strftime("%d-%m-%y") if closed else "",
                rng.randrange(100, 30_000) if stage == "Won" else 0, "", "",
            ])  # fmt: skip
            written += EVENTS_PER_STAGE[stage]
            row += 1
    finally:
        for handle in handles:
            handle.close()
    return paths


def disk_used(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def input_topic_records(bench: Bench, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bench.bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def phase_backfill(bench: Bench, config) -> dict:
    app = bench.app("backfill", config.partitions)
    await bench.create_topic(app.input_topic, config.partitions)
    exports = bench.workdir / "backfill-exports"
    exports.mkdir(exist_ok=True)
    bench.reporter.step(f"writing {config.backfill_events:,} events in {config.backfill_files} exports")
    paths = write_exports(exports, config.backfill_events, config.backfill_files)
    exports_mib = disk_used(exports) / 2**20

    sort_dir = Path(tempfile.mkdtemp(prefix="backfill-sort-", dir=bench.workdir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_PULSE_")}
    # Run in the exports' folder, where the importer writes each file's rejects list; `source` first on the path.
    env.update(CRM_PULSE_BROKER=bench.broker.url, CRM_PULSE_APP_ID=app.app_id, CRM_PULSE_INPUT_TOPIC=app.input_topic,
               CRM_PULSE_PARTITIONS=str(config.partitions), TMPDIR=str(sort_dir),
               PYTHONPATH=str(bench.worker_source))  # fmt: skip
    command = [sys.executable, "-m", "crm_pulse.cli", "import", *map(str, paths), "--mapping", str(MAPPING)]
    bench.reporter.step(f"importing {config.backfill_events:,} events from {len(paths)} files")
    log_path = bench.workdir / f"{app.app_id}-import.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=exports, stdout=log, stderr=log)
        peak_sort_disk = 0
        # wait4 gives the importer's own peak RSS; the sort's runs are sampled while it works.
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak_sort_disk = max(peak_sort_disk, disk_used(sort_dir))
            time.sleep(0.5)
    seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    output = log_path.read_text(errors="replace")
    if process.returncode:
        raise RuntimeError(f"crm-pulse import exited with {process.returncode}:\n{output[-2000:]}")
    published = int(re.search(r"events published\D*([\d,]+)", output).group(1).replace(",", ""))
    on_topic = await input_topic_records(bench, app.input_topic, config.partitions)
    return {
        "files": len(paths),
        "events_written": config.backfill_events,
        "events_published": published,
        "events_on_topic": on_topic,
        "seconds": round(seconds, 1),
        "events_per_s": rate(published, seconds),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "exports_mib": round(exports_mib, 1),
        "peak_sort_disk_mib": round(peak_sort_disk / 2**20, 1),
    }
