"""The production stack in docker-compose.yml and deploy/: compose structure, the image, Prometheus config and
rules (checked and unit-tested with promtool), the Alertmanager config (amtool) and the Grafana dashboards.

promtool and amtool come from Debian's `prometheus` and `prometheus-alertmanager` packages; the tests that need
them are skipped when they are not installed. tests/integration/test_prometheus.py runs the same dashboards and
rules against a real Prometheus scraping a running demo."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from crm_pulse.kafka import kafka_version

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULE_FILES = (DEPLOY / "prometheus" / "rules" / "recording.yml", DEPLOY / "prometheus" / "rules" / "alerts.yml")
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
DASHBOARD_NAMES = {"pipeline", "sales", "marketing", "customer", "operations", "deals"}
DATASOURCE_UID = "prometheus"
WINDOWS = ("7d", "30d", "all")
# Grafana's interpolation of the dashboards' variables; `$window` takes each of WINDOWS in turn.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$rep": ".*"}
# Series that Prometheus itself adds to every scrape, not exported by the worker.
SCRAPE_SERIES = {"up", "scrape_duration_seconds"}


# --- helpers shared with tests/integration/test_prometheus.py ---------------------------------------------


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


def dashboards() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels of collapsed rows


def dashboard_queries() -> list[tuple[str, str, str]]:
    """[(where, raw expr)] for every panel target of every dashboard: where = "<dashboard> / <panel> / <refId>"."""
    return [
        (f"{name} / {panel['title']} / {target['refId']}", target["expr"])
        for name, dashboard in dashboards().items()
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries() -> list[tuple[str, str, str]]:
    """[(where, metric, label)] of every label_values(metric, label) template variable."""
    found = []
    for name, dashboard in dashboards().items():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
                assert match, f"{name}: unsupported variable query {variable['definition']!r}"
                found.append((f"{name} / ${variable['name']}", match[1], match[2]))
    return found


def interpolate(expr: str, window: str = "30d") -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    expr = expr.replace("$window", window)
    assert "$" not in expr, f"uninterpolated Grafana variable in {expr!r}"
    return expr


def interpolations(expr: str) -> list[str]:
    """The expression as Grafana sends it, for every value of `$window` when it uses it."""
    return [interpolate(expr, w) for w in WINDOWS] if "$window" in expr else [interpolate(expr)]


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                   "unless", "inf", "nan", "atan2"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (identifiers that are not functions, keywords, labels)."""
    assert "__name__" not in expr, f"select metrics by name, not by __name__: {expr!r}"
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        if not match[2] and match[1] not in PROMQL_KEYWORDS:
            names.add(match[1])
    return names


def rules(path: Path, kind: str) -> list[dict]:
    """Every rule of `kind` ("record" or "alert") in a rule file."""
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"] if kind in rule]


def recording_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules(RULE_FILES[0], "record")}


def alert_rules() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for rule in rules(RULE_FILES[1], "alert")}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install -y --no-install-recommends {package})")
    return path


def run(*command: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)


# --- docker-compose.yml and the Dockerfile ---------------------------------------------------------------


def host_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts (short syntax)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def test_compose_has_the_stack_with_pinned_images_and_ports():
    services = compose()["services"]
    assert set(services) == {"kafka", "kafka-init", "worker", "gateway", "prometheus", "grafana", "alertmanager"}
    images = {name: service.get("image", "") for name, service in services.items()}
    # The production broker is the version the integration suite runs against (deploy/kafka/pom.xml).
    assert images["kafka"] == f"apache/kafka:{kafka_version()}"
    assert images["kafka-init"] == images["kafka"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", images["prometheus"]), images["prometheus"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", images["grafana"]), images["grafana"]
    assert re.fullmatch(r"prom/alertmanager:v\d+\.\d+\.\d+", images["alertmanager"]), images["alertmanager"]
    assert services["worker"]["build"] == "."
    assert services["gateway"]["image"] == services["worker"]["image"]

    ports = {name: service.get("ports", []) for name, service in services.items()}
    assert ports == {"kafka": [], "kafka-init": [], "worker": ["6066:6066"], "gateway": ["8088:8088"], "prometheus": ["9090:9090"],
                     "grafana": ["3000:3000"], "alertmanager": ["9093:9093"]}  # fmt: skip


def test_kafka_runs_in_kraft_mode_and_the_worker_uses_it():
    services = compose()["services"]
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["CLUSTER_ID"] and env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert not any("ZOOKEEPER" in key for key in env)
    worker = services["worker"]["environment"]
    assert worker["CRM_PULSE_BROKER"] == "kafka://kafka:9092"
    assert worker["CRM_PULSE_METRICS_HOST"] == "0.0.0.0" and worker["CRM_PULSE_METRICS_PORT"] == "6066"
    assert services["worker"]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    gateway = services["gateway"]
    assert gateway["command"] == ["crm-pulse", "gateway"]
    assert gateway["environment"]["CRM_PULSE_BROKER"] == "kafka://kafka:9092"
    assert gateway["environment"]["CRM_PULSE_GATEWAY_HOST"] == "0.0.0.0"
    assert gateway["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert dict(host_mounts(gateway)) == {"./mappings/gateway.toml": gateway["environment"]["CRM_PULSE_GATEWAY_MAPPING"]}
    # Its health check asks the gateway's own port whether the broker is reachable.
    assert f":{gateway['environment']['CRM_PULSE_GATEWAY_PORT']}/readyz" in " ".join(gateway["healthcheck"]["test"])


def test_every_mounted_host_path_exists_and_named_volumes_are_declared():
    document = compose()
    declared = set(document.get("volumes") or {})
    mounted = {}
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                path = (ROOT / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which is not in the repo"
                assert ROOT in path.parents, f"{name} mounts {source}, outside the repo"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
        mounted[name] = dict(host_mounts(service))
    assert mounted["prometheus"] == {"./deploy/prometheus/prometheus.yml": "/etc/prometheus/prometheus.yml",
                                     "./deploy/prometheus/rules": "/etc/prometheus/rules"}  # fmt: skip
    assert mounted["alertmanager"] == {"./deploy/alertmanager/alertmanager.yml": "/etc/alertmanager/alertmanager.yml"}
    assert mounted["grafana"] == {"./deploy/grafana/provisioning": "/etc/grafana/provisioning",
                                  "./deploy/grafana/dashboards": "/etc/grafana/dashboards"}  # fmt: skip
    for volume in ("kafka-data", "prometheus-data", "alertmanager-data", "grafana-data"):
        assert volume in declared
    # Config files are mounted read-only.
    for name in ("prometheus", "alertmanager", "grafana"):
        for volume in document["services"][name]["volumes"]:
            if volume.startswith("./"):
                assert volume.endswith(":ro"), volume


def test_services_point_at_each_other_by_compose_name_and_port():
    services = compose()["services"]
    prometheus = load_yaml(PROMETHEUS_CONFIG)
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in prometheus["scrape_configs"]}  # fmt: skip
    port = services["worker"]["environment"]["CRM_PULSE_METRICS_PORT"]
    assert targets["crm-pulse"] == [f"worker:{port}"]
    assert targets["crm-pulse-gateway"] == [f"gateway:{services['gateway']['environment']['CRM_PULSE_GATEWAY_PORT']}"]
    alertmanagers = [t for am in prometheus["alerting"]["alertmanagers"] for sc in am["static_configs"]
                     for t in sc["targets"]]  # fmt: skip
    assert alertmanagers == ["alertmanager:9093"]
    # rule_files are relative to the config file: deploy/prometheus/rules/ here, /etc/prometheus/rules/ in the
    # container (mounted next to /etc/prometheus/prometheus.yml).
    assert [(PROMETHEUS_CONFIG.parent / f).resolve() for f in prometheus["rule_files"]] == list(RULE_FILES)
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in services["alertmanager"]["command"]

    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    by_uid = {source["uid"]: source for source in datasources}
    assert by_uid[DATASOURCE_UID]["url"] == "http://prometheus:9090" and by_uid[DATASOURCE_UID]["isDefault"]
    assert by_uid["alertmanager"]["url"] == "http://alertmanager:9093"
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/dashboards"]
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    home = grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith("/etc/grafana/dashboards/") and (DASHBOARDS / Path(home).name).exists()


def test_dockerfile_runs_as_non_root_with_a_metrics_healthcheck():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    text = "\n".join(lines).replace("\\\n", " ")
    healthchecks = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    assert len(healthchecks) == 1 and " CMD " in healthchecks[0]
    assert "/metrics" in healthchecks[0] and "CRM_PULSE_METRICS_PORT" in healthchecks[0]
    assert text.index("USER ") < text.index("CMD [")


# --- Grafana dashboards ----------------------------------------------------------------------------------


def test_committed_dashboards_are_the_generated_ones():
    spec = importlib.util.spec_from_file_location("generate_dashboards", DEPLOY / "grafana" / "generate_dashboards.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generated = generator.render()
    assert {Path(name).stem for name in generated} == DASHBOARD_NAMES
    committed = {path.name: path.read_text() for path in DASHBOARDS.glob("*.json")}
    assert committed == generated, "run `python deploy/grafana/generate_dashboards.py` and commit the JSON"


def test_dashboards_are_well_formed():
    boards = dashboards()
    assert set(boards) == DASHBOARD_NAMES
    assert len({board["uid"] for board in boards.values()}) == len(boards)
    assert len({board["title"] for board in boards.values()}) == len(boards)
    for name, board in boards.items():
        assert board["tags"] == ["crm-pulse"] and board["schemaVersion"] >= 36
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), name
        cells = set()
        queries = 0
        for panel in panels(board):
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, (name, panel["title"])
            cell = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
            assert not cells & cell, f"{name}: {panel['title']} overlaps another panel"
            cells |= cell
            if panel["type"] == "row":
                continue
            assert panel["title"] and panel["targets"], (name, panel["title"])
            assert panel["datasource"]["uid"] == DATASOURCE_UID
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID and target["expr"].strip()
                queries += 1
        assert queries >= 10, f"{name} has only {queries} queries"
        variables = {variable["name"] for variable in board["templating"]["list"]}
        used = {m for panel in panels(board) for target in panel.get("targets", [])
                for m in re.findall(r"\$(\w+)", target["expr"])}  # fmt: skip
        assert used - {"__rate_interval", "__range"} == variables, f"{name}: variables {variables}, used {used}"


def test_metric_names_are_extracted_from_promql():
    assert metric_names('sum by (rep) (crm_leads_stalled{rep=~"a|b", stage!="x"})') == {"crm_leads_stalled"}
    assert metric_names("crm:win_rate_ratio:30d < 0.8 * (crm:win_rate_ratio:30d offset 7d)") == {
        "crm:win_rate_ratio:30d"}  # fmt: skip
    assert metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(crm_stall_scan_duration_seconds_bucket[1m])))"
    ) == {"crm_stall_scan_duration_seconds_bucket"}
    assert metric_names("max by (campaign) (a{w=\"7d\"}) / on (campaign) group_left max by (campaign) (b) "
                        "or time() - c") == {"a", "b", "c"}  # fmt: skip
    assert metric_names('label_replace(up, "x", "$1", "job", "(.*)") > bool 1e3') == {"up"}


def test_every_dashboard_query_parses_as_promql(tmp_path):
    """promtool parses every interpolated dashboard query (as a recording rule) without a server."""
    promtool = tool("promtool", "prometheus")
    exprs = sorted({expr for _, raw in dashboard_queries() for expr in interpolations(raw)})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}))  # fmt: skip
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    assert len(exprs) > 100


# --- Prometheus config and rules (promtool) --------------------------------------------------------------


def test_promtool_check_config():
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout
    assert "is valid prometheus config file syntax" in result.stdout


def test_promtool_check_rules():
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(recording_rules())} rules found" in result.stdout
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
    assert len(recording_rules()) >= 15 and len(alert_rules()) >= 9
    assert all(name.startswith("crm:") and name.count(":") == 2 for name in recording_rules())
    # The required examples exist with their documented meaning.
    records = recording_rules()
    assert records["crm:leads_stalled:by_rep"] == "sum by (rep) (crm_leads_stalled)"
    assert records["crm:dlq:rate5m"] == "sum(rate(crm_events_invalid_total[5m]))"
    for name in ("crm:win_rate_ratio:30d", "crm:events_processed:rate5m", "crm:stage_dwell_p90_seconds:30d"):
        assert name in records
    alerts = alert_rules()
    assert alerts["CrmPulseWorkerDown"] == 'up{job="crm-pulse"} == 0'
    assert "offset 7d" in alerts["CrmWinRateDrop"] and "offset 7d" in alerts["CrmChurnSpike"]


def _alert(severity: str, annotations: dict, **labels: str) -> dict:
    return {"exp_labels": {"severity": severity, **labels}, "exp_annotations": annotations}


def test_alert_rules_fire_on_the_conditions_they_describe(tmp_path):
    """promtool unit tests: synthetic series in, the exact alerts (labels and rendered annotations) out."""
    promtool = tool("promtool", "prometheus")
    w1 = 'instance="w1", job="crm-pulse"'
    eight_days = 8 * 24  # hourly samples
    kpis = {  # 8 days at one level, then a drop (win rate) and a spike (churn)
        "interval": "1h",
        "input_series": [
            {"series": f'crm_win_rate_ratio{{window="30d", {w1}}}', "values": f"0.5x{eight_days} 0.3x4"},
            {"series": f'crm_win_rate_ratio{{window="7d", {w1}}}', "values": f"0.1x{eight_days + 4}"},
            {"series": f'crm_churn_ratio{{window="30d", {w1}}}', "values": f"0.04x{eight_days} 0.08x4"},
            {"series": f'crm_pipeline_weighted_value{{close_month="2026-04", pipeline="default", team="t1", rep="r1", '
                       f'{w1}}}', "values": f"1000x{eight_days} 600x4"},
        ],
        "promql_expr_test": [
            {"expr": "crm:win_rate_ratio:30d", "eval_time": "8d2h",
             "exp_samples": [{"labels": "crm:win_rate_ratio:30d", "value": 0.3}]},
            {"expr": "crm:win_rate_ratio:7d", "eval_time": "8d2h",
             "exp_samples": [{"labels": "crm:win_rate_ratio:7d", "value": 0.1}]},
        ],
        "alert_rule_test": [
            {"eval_time": "7d23h", "alertname": "CrmWinRateDrop", "exp_alerts": []},
            {"eval_time": "8d3h", "alertname": "CrmWinRateDrop", "exp_alerts": [_alert(
                "warning", {
                    "summary": "30-day win rate dropped to 30%",
                    "description": "The 30-day win rate is below 80% of its value 7 days ago."})]},
            {"eval_time": "8d3h", "alertname": "CrmWinRateLow", "exp_alerts": []},
            {"eval_time": "7d23h", "alertname": "CrmWeightedPipelineDrop", "exp_alerts": []},
            {"eval_time": "8d3h", "alertname": "CrmWeightedPipelineDrop", "exp_alerts": [_alert(
                "warning", {
                    "summary": "The weighted pipeline fell to 600",
                    "description": "The weighted pipeline (amount × P(win | stage) of open deals) is below 70% of its "
                                   "value 7 days ago."})]},
            {"eval_time": "7d23h", "alertname": "CrmChurnSpike", "exp_alerts": []},
            {"eval_time": "8d3h", "alertname": "CrmChurnSpike", "exp_alerts": [_alert(
                "warning", {"summary": "30-day churn is 8%",
                                             "description": "30-day churn is above 15%, or above 5% and 1.5 times its "
                                                            "value 7 days ago."})]},
        ],
    }  # fmt: skip
    stalls = {  # rep-01: 4 + 3 stalled over two workers; rep-02: exactly the limit
        "interval": "1m",
        "input_series": [
            {"series": 'crm_leads_stalled{rep="rep-01", stage="new", instance="w1"}', "values": "4x60"},
            {"series": 'crm_leads_stalled{rep="rep-01", stage="proposal", instance="w2"}', "values": "3x60"},
            {"series": 'crm_leads_stalled{rep="rep-02", stage="new", instance="w1"}', "values": "5x60"},
        ],
        "promql_expr_test": [{"expr": "crm:leads_stalled:by_rep", "eval_time": "10m", "exp_samples": [
            {"labels": 'crm:leads_stalled:by_rep{rep="rep-01"}', "value": 7},
            {"labels": 'crm:leads_stalled:by_rep{rep="rep-02"}', "value": 5}]}],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "CrmLeadsStalledPerRep", "exp_alerts": []},
            {"eval_time": "40m", "alertname": "CrmLeadsStalledPerRep", "exp_alerts": [_alert(
                "warning", {
                    "summary": "rep-01 has 7 stalled leads",
                    "description": "Rep rep-01 has had more than 5 stalled open leads for 30 minutes. The lead-level "
                                   "alerts are on the crm-alerts topic."}, rep="rep-01")]},
        ],
    }  # fmt: skip
    worker_down = {  # scraped for 3 minutes, then down: metrics go stale 5 minutes after the last sample
        "interval": "1m",
        "input_series": [
            {"series": 'up{instance="worker:6066", job="crm-pulse"}', "values": "1 1 1 0x30"},
            {"series": 'crm_events_received_total{instance="worker:6066", job="crm-pulse"}', "values": "0 60 120"},
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "CrmPulseWorkerDown", "exp_alerts": []},
            {"eval_time": "6m", "alertname": "CrmPulseWorkerDown", "exp_alerts": [_alert(
                "critical", {
                    "summary": "crm-pulse worker worker:6066 is down",
                    "description": "Prometheus could not scrape worker:6066/metrics for 2 minutes."},
                instance="worker:6066", job="crm-pulse")]},
            {"eval_time": "6m", "alertname": "CrmPulseMetricsAbsent", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "CrmPulseMetricsAbsent", "exp_alerts": [_alert(
                "critical", {
                    "summary": "No crm-pulse worker is exporting metrics",
                    "description": "crm_events_received_total has been absent for 5 minutes: no worker is scraped "
                                   "successfully, or none is configured."}, job="crm-pulse")]},
        ],
    }  # fmt: skip
    dead_letters = {  # 10 messages/s read, 1/s rejected
        "interval": "1m",
        "input_series": [
            {"series": f'crm_events_received_total{{{w1}}}', "values": "0+600x40"},
            {"series": f'crm_events_invalid_total{{reason="malformed_json", {w1}}}', "values": "0+60x40"},
            {"series": f'crm_events_invalid_total{{reason="late", {w1}}}', "values": "0x40"},
        ],
        "promql_expr_test": [
            {"expr": "crm:dlq:rate5m", "eval_time": "10m", "exp_samples": [{"labels": "crm:dlq:rate5m", "value": 1}]},
            {"expr": "crm:dlq_ratio:rate5m", "eval_time": "10m",
             "exp_samples": [{"labels": "crm:dlq_ratio:rate5m", "value": 0.1}]},
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "CrmPulseDeadLettersGrowing", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "CrmPulseDeadLettersGrowing", "exp_alerts": [_alert(
                "warning", {
                    "summary": "Events are being dead-lettered (1/s)",
                    "description": "More than 0.1 events/s have gone to the dead-letter topic over the last 5 minutes, "
                                   "for 10 minutes. See crm_events_invalid_total by reason."})]},
            {"eval_time": "20m", "alertname": "CrmPulseDeadLetterShareHigh", "exp_alerts": [_alert(
                "warning", {
                    "summary": "10% of incoming events are dead-lettered",
                    "description": "More than 5% of the messages read over the last 5 minutes were rejected, for 10 "
                                   "minutes."})]},
        ],
    }  # fmt: skip
    lag = {
        "interval": "1m",
        "input_series": [
            # End offsets 20,000 and 100, committed 5,000 and 90: lags 15,000 and 10.
            {"series": 'crm_consumer_lag_messages{topic="crm-events", partition="0", instance="w1"}',
             "values": "15000x30"},
            {"series": 'crm_consumer_lag_messages{topic="crm-events", partition="1", instance="w2"}',
             "values": "10x30"},
        ],
        "promql_expr_test": [{"expr": "crm:consumer_lag_messages:by_topic", "eval_time": "1m",
                              "exp_samples": [{"labels": 'crm:consumer_lag_messages:by_topic{topic="crm-events"}',
                                               "value": 15010}]}],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "CrmPulseConsumerLagHigh", "exp_alerts": [_alert(
                "warning", {
                    "summary": "Consumer lag on crm-events is 15.01k messages",
                    "description": "The crm-pulse workers have been more than 10000 messages behind on crm-events "
                                   "for 15 minutes."}, topic="crm-events")]},
        ],
    }  # fmt: skip
    deals = {  # 4 of 10 open deals critical; 2 close dates slipping a minute
        "interval": "1m",
        "input_series": [
            {"series": f'crm_deal_health_deals{{pipeline="default", band="critical", {w1}}}', "values": "4x120"},
            {"series": f'crm_deal_health_deals{{pipeline="default", band="healthy", {w1}}}', "values": "6x120"},
            {"series": f'crm_alerts_emitted_total{{type="deal.close_date_slipped", {w1}}}', "values": "0+2x120"},
            # Last month: r1 (team t1) forecast 800 on one worker and 200 on another, won 1,250 there; r2 (t1)
            # forecast 500, won 400; r3 (t2) forecast 300, won nothing yet.
            *({"series": f'crm_forecast_rep_{kind}_value{{window="month_previous", team="{team}", rep="{rep}", '
                         f'instance="{worker}", job="crm-pulse"}}', "values": f"{value}x120"}
              for kind, team, rep, worker, value in (
                  ("weighted", "t1", "r1", "w1", 800), ("weighted", "t1", "r1", "w2", 200),
                  ("won", "t1", "r1", "w2", 1250), ("weighted", "t1", "r2", "w1", 500), ("won", "t1", "r2", "w1", 400),
                  ("weighted", "t2", "r3", "w1", 300), ("won", "t2", "r3", "w1", 0))),
        ],
        "promql_expr_test": [
            {"expr": "crm:deal_health_deals:by_band", "eval_time": "10m", "exp_samples": [
                {"labels": 'crm:deal_health_deals:by_band{band="critical"}', "value": 4},
                {"labels": 'crm:deal_health_deals:by_band{band="healthy"}', "value": 6}]},
            # r1: 1 − |1,250 − 1,000| / 1,250 = 0.8; r2: 1 − 100/400 = 0.75; t1: 1 − |1,650 − 1,500| / 1,650.
            # Nothing won (t2, r3): no accuracy, as /deals/forecast gives null, rather than PromQL's −Inf.
            {"expr": "crm:forecast_accuracy_ratio:month_previous_by_rep", "eval_time": "10m", "exp_samples": [
                {"labels": 'crm:forecast_accuracy_ratio:month_previous_by_rep{team="t1", rep="r1"}', "value": 0.8},
                {"labels": 'crm:forecast_accuracy_ratio:month_previous_by_rep{team="t1", rep="r2"}', "value": 0.75}]},
            {"expr": "crm:forecast_accuracy_ratio:month_previous_by_team", "eval_time": "10m", "exp_samples": [
                {"labels": 'crm:forecast_accuracy_ratio:month_previous_by_team{team="t1"}', "value": 1 - 150 / 1650}]},
        ],
        "alert_rule_test": [
            {"eval_time": "50m", "alertname": "CrmDealsCriticalShareHigh", "exp_alerts": []},
            {"eval_time": "70m", "alertname": "CrmDealsCriticalShareHigh", "exp_alerts": [_alert(
                "warning", {
                    "summary": "40% of open deals are in critical health",
                    "description": "More than 30% of the open deals have had a deal health below 40 for 1 hour "
                                   "(docs/deals.md)."})]},
            {"eval_time": "20m", "alertname": "CrmCloseDatesSlipping", "exp_alerts": []},
            {"eval_time": "100m", "alertname": "CrmCloseDatesSlipping", "exp_alerts": [_alert(
                "warning", {
                    "summary": "120 close dates slipped in the last hour",
                    "description": "More than 50 deal.close_date_slipped alerts an hour for 30 minutes: the deal-level "
                                   "alerts are on the crm-alerts topic."})]},
        ],
    }  # fmt: skip
    # The 8-day KPI case is evaluated hourly (its alerts wait 1 h), the others every minute.
    for name, interval, group in (("kpis", "1h", [kpis]), ("ops", "1m", [stalls, worker_down, dead_letters, lag, deals])):
        path = tmp_path / f"{name}_test.yml"
        path.write_text(yaml.safe_dump({"rule_files": [str(f) for f in RULE_FILES], "evaluation_interval": interval,
                                        "tests": group}, sort_keys=False))  # fmt: skip
        result = run(promtool, "test", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout
    cases = (kpis, stalls, worker_down, dead_letters, lag, deals)
    tested = {test["alertname"] for case in cases for test in case["alert_rule_test"]}
    assert tested == set(alert_rules()), "every alert rule has a unit test"


def test_amtool_check_config():
    amtool = tool("amtool", "prometheus-alertmanager")
    result = run(amtool, "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "2 receivers" in result.stdout
    config = load_yaml(ALERTMANAGER_CONFIG)
    assert config["route"]["receiver"] == "default"
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    assert receivers["webhook"]["webhook_configs"][0]["url"].startswith("http")
    # A critical alert is routed to the webhook, anything else only to the default receiver.
    routes = run(amtool, "config", "routes", "test", "--config.file", str(ALERTMANAGER_CONFIG),
                 "alertname=CrmPulseWorkerDown", "severity=critical")  # fmt: skip
    assert routes.stdout.split() == ["webhook"], routes.stdout + routes.stderr
    routes = run(amtool, "config", "routes", "test", "--config.file", str(ALERTMANAGER_CONFIG),
                 "alertname=CrmWinRateDrop", "severity=warning")  # fmt: skip
    assert routes.stdout.split() == ["default"], routes.stdout + routes.stderr
