"""bench/results.png: one panel per figure of results.json, each against its target."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _bars(ax, labels, values, colours, unit="", log=False, lower_bounds=None):
    shown = [v or 0 for v in values]
    bars = ax.bar(labels, shown, color=colours)
    for bar, value, bound in zip(bars, values, lower_bounds or [False] * len(values)):
        text = "n/a" if value is None else f"{'≥ ' if bound else ''}{_number(value)}{unit}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    if not any(shown):
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="#9e9e9e", fontsize=12)
    if log and any(shown):
        ax.set_yscale("log")
    ax.margins(y=0.2)


def _target(ax, value, label):
    ax.axhline(value, color="black", linestyle="--", linewidth=1)
    ax.annotate(label, (1, value), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8)


def draw(results: dict, path: Path) -> None:
    met = results["meets_targets"]
    config = results["config"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (throughput, latency, scan), (rss, recovery, scale) = axes

    ratio = results.get("pipeline_to_bare_faust_ratio")
    _bars(throughput, ["raw aiokafka", "bare Faust", "Faust +\nvalidation", "pipeline"],
          [results.get(f"{k}_events_per_s") for k in ("raw_aiokafka", "bare_faust", "validating_faust", "pipeline")],
          ["#607d8b", "#607d8b", "#607d8b", COLOURS[met["pipeline_to_bare_faust_ratio"]]], log=True)  # fmt: skip
    throughput.set_title(f"Throughput, events/s ({config['throughput_events']:,} events)\n"
                         f"pipeline / bare Faust = {ratio if ratio is not None else 'n/a'} (target ≥ 0.8)")  # fmt: skip

    keys = [f"event_to_{kind}_p{q}_ms" for kind in ("alert", "gauge") for q in (50, 99)]
    values = [results.get(k) for k in keys]
    _bars(latency, ["alert p50", "alert p99", "gauge p50", "gauge p99"], values,
          [COLOURS[met.get(k.replace("p50", "p99"))] for k in keys], " ms",
          log=max((v or 0) for v in values) > 2000,
          lower_bounds=[k in results["lower_bounds"] for k in keys])  # fmt: skip
    _target(latency, 200, "200 ms")
    latency.set_title(f"Event → alert / → /metrics at {config['latency_rate']:,.0f} events/s\n(p99 target < 200 ms)")

    leads = f"{config['leads']:,} open leads"
    _bars(scan, ["per tick"], [results.get("stall_scan_1m_seconds")], [COLOURS[met["stall_scan_1m_seconds"]]], " s")
    _target(scan, 1, "1 s")
    scan.set_title(f"Stall scan over {leads}\n(target ≤ 1 s per tick; from {results.get('stall_scan_method', '—')})")

    _bars(rss, ["worker RSS"], [results.get("rss_1m_leads_mib")], [COLOURS[met["rss_1m_leads_mib"]]], " MiB",
          lower_bounds=["rss_1m_leads_mib" in results["lower_bounds"]])  # fmt: skip
    _target(rss, 1024, "1 GiB")
    rss.set_title(f"Worker memory with {leads} (RocksDB store)\n(target ≤ 1 GiB)")

    keys = ["recovery_1m_keys_cold_seconds", "recovery_1m_keys_seconds"]
    with_leads = f"{config['leads']:,} keys,\n"
    _bars(recovery, ["empty tables", f"{with_leads}empty data dir", f"{with_leads}restart"],
          [results.get("startup_empty_seconds"), *(results.get(k) for k in keys)],
          ["#607d8b", "#607d8b", COLOURS[met["recovery_1m_keys_seconds"]]], " s",
          lower_bounds=[False, *(k in results["lower_bounds"] for k in keys)])  # fmt: skip
    _target(recovery, 60, "60 s")
    recovery.set_title("Start → first event processed, RocksDB store\n(target ≤ 60 s for the restart with 1M keys)")

    speedup = results.get("two_worker_speedup")
    _bars(scale, ["one worker", "two workers"],
          [results.get("one_worker_events_per_s"), results.get("two_workers_events_per_s")],
          ["#607d8b", COLOURS[met["two_worker_speedup"]]], "/s")  # fmt: skip
    scale.set_title(f"Scale-out on {config['scale_partitions']} partitions, events/s\n"
                    f"speed-up = {speedup if speedup is not None else 'n/a'} (target ≥ 1.6)")  # fmt: skip

    machine = results["machine"]
    fig.suptitle("crm-pulse benchmark on the embedded broker", fontsize=14)
    fig.text(0.5, 0.01, f"{results['started_at']} · {machine['cpu_count']} CPUs ({machine['cpu_model']}) · "
             f"Python {machine['python']} · faust-streaming {machine['faust_streaming']} · "
             f"commit {machine['git_commit'][:10]}{' + changes' if machine['worker_code_changes'] else ''} · "
             "green: target met, red: missed, grey: not measured", ha="center", fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
