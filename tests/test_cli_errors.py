"""A user's mistake gets one line on stderr that names the setting, value or address and says what to do,
and a non-zero exit; tracebacks only at debug level. Each case runs `crm-pulse` as a user would."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def crm_pulse(*args: str, **env: str) -> tuple[int, list[str], float]:
    """(exit code, stderr lines, seconds taken) of `crm-pulse ARGS` with the given settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRM_PULSE_")}
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "crm_pulse.cli", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return done.returncode, done.stderr.splitlines(), time.monotonic() - began


def refused_address() -> str:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"kafka://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("name, value, expected", [
    ("CRM_PULSE_STALL_STAGE_DAYS", "new:2",
     "CRM_PULSE_STALL_STAGE_DAYS='new:2' is not JSON: expected a JSON object of stage → days, "
     'e.g. {"new": 2, "qualified": 5}'),
    ("CRM_PULSE_STALL_STAGE_DAYS", '{"new": "two"}',
     "CRM_PULSE_STALL_STAGE_DAYS='{\"new\": \"two\"}': ['new']: Input should be a valid number, unable to parse "
     'string as a number (expected a JSON object of stage → days, e.g. {"new": 2, "qualified": 5})'),
    ("CRM_PULSE_CLOSED_STAGES", "won,lost",
     "CRM_PULSE_CLOSED_STAGES='won,lost' is not JSON: expected a JSON array of stage names, e.g. [\"won\", \"lost\"]"),
    ("CRM_PULSE_PARTITIONS", "0", "CRM_PULSE_PARTITIONS='0': Input should be greater than or equal to 1"),
    ("CRM_PULSE_BROKER", "localhost:9092",
     "CRM_PULSE_BROKER='localhost:9092': CRM_PULSE_BROKER must look like kafka://host:port[,host:port]"),
    ("CRM_PULSE_BUSINESS_TIMEZONE", "CET+1",
     "CRM_PULSE_BUSINESS_TIMEZONE='CET+1': not an IANA time zone; use a name such as UTC or Europe/Berlin"),
    ("CRM_PULSE_GRACE_SECONDS", "9999999999", "CRM_PULSE_DEDUPE_HORIZON_SECONDS must be at least CRM_PULSE_GRACE_SECONDS"),
    # The secret itself is not repeated.
    ("CRM_PULSE_NOTIFY_LINK_SECRET", "s3cret",
     "set both CRM_PULSE_NOTIFY_LINK_SECRET and CRM_PULSE_NOTIFY_LINK_BASE_URL, or neither"),
])  # fmt: skip
@pytest.mark.parametrize("command", [["worker"], ["demo", "--seconds", "1"], ["alerts", "tail"]])
def test_a_bad_setting_is_one_line_naming_it_and_exit_2(command, name, value, expected):
    code, stderr, _ = crm_pulse(*command, **{name: value})
    assert (code, stderr) == (2, [f"crm-pulse: {expected} (settings: docs/configuration.md)"])


def test_a_busy_metrics_port_is_one_line_naming_it_and_exit_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr, seconds = crm_pulse("worker", CRM_PULSE_METRICS_PORT=str(port), CRM_PULSE_BROKER=refused_address())
    assert (code, stderr) == (1, [f"crm-pulse: CRM_PULSE_METRICS_PORT={port}: 127.0.0.1:{port} is in use; stop what "
                                  "listens there or choose another port"])  # fmt: skip
    assert seconds < 10  # before any broker is tried


@pytest.mark.parametrize("timeout, within", [(None, 10), ("2", 2)])
@pytest.mark.parametrize("command", [["worker"], ["alerts", "tail"]])
def test_an_unreachable_broker_is_one_line_within_the_connect_timeout_and_exit_1(command, timeout, within):
    broker = refused_address()
    settings = {"CRM_PULSE_BROKER": broker, "CRM_PULSE_METRICS_PORT": "0"}
    if timeout:
        settings["CRM_PULSE_BROKER_CONNECT_TIMEOUT_SECONDS"] = timeout
    code, stderr, seconds = crm_pulse(*command, **settings)
    address = broker.removeprefix("kafka://")
    assert code == 1 and len(stderr) == 1, stderr
    assert stderr[0].startswith(f"crm-pulse: no broker answered at {address} within {within} s (PLAINTEXT): ")
    assert stderr[0].endswith("check CRM_PULSE_BROKER, or wait longer with CRM_PULSE_BROKER_CONNECT_TIMEOUT_SECONDS")
    assert within <= seconds < within + 5


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


# Data flows one way: contract (schemas) → pure KPI math (streams) → Faust wiring (agents) → commands.
ALLOWED = {
    "schemas": ("crm_pulse.schemas",),
    "streams": ("crm_pulse.schemas", "crm_pulse.streams"),
    "agents": ("crm_pulse.schemas", "crm_pulse.streams", "crm_pulse.agents", "crm_pulse.config", "crm_pulse.broker"),
}


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_no_module_imports_upward(folder):
    upward = {
        f"{path.name}: {name}"
        for path in (ROOT / folder).glob("*.py")
        for name in imports_of(path)
        if name.startswith("crm_pulse") and not name.startswith(ALLOWED[folder])
    }
    assert not upward


def test_the_kpi_math_imports_no_faust_and_no_client():
    clients = ("faust", "mode", "aiokafka", "kafka")
    impure = {f"{path.name}: {name}" for path in (ROOT / "streams").glob("*.py") for name in imports_of(path)
              if name.split(".")[0] in clients}  # fmt: skip
    assert not impure


def test_the_report_loads_no_faust():
    """`crm-pulse report` folds with the pure streams/ functions: Faust is not even imported."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, crm_pulse.cli, crm_pulse.report; "
                             "print(sorted({m.split('.')[0] for m in sys.modules} & {'faust', 'mode'}))"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert loaded.stdout == "[]\n", loaded.stderr


def test_worker_help_and_the_configuration_page_list_every_setting():
    from crm_pulse.config import Settings, env_name

    code = subprocess.run([sys.executable, "-m", "crm_pulse.cli", "worker", "--help"], capture_output=True, text=True)
    documented = (ROOT / "docs" / "configuration.md").read_text()
    names = [env_name(field) for field in Settings.model_fields]
    assert code.returncode == 0
    assert [name for name in names if name not in code.stdout] == []
    assert [name for name in names if f"| `{name}` |" not in documented] == []


@pytest.mark.parametrize("env, expected", [
    ({}, "alerts notify sends to slack (CRM_PULSE_NOTIFY_CHANNELS) and needs CRM_PULSE_SLACK_BOT_TOKEN, or "
         "--webhook-url URL or CRM_PULSE_WEBHOOK_URL"),
    ({"CRM_PULSE_NOTIFY_CHANNELS": '["email"]', "CRM_PULSE_SMTP_HOST": "smtp.example.com"},
     "alerts notify sends to email (CRM_PULSE_NOTIFY_CHANNELS) and needs CRM_PULSE_SMTP_HOST and CRM_PULSE_SMTP_FROM"),
    ({"CRM_PULSE_NOTIFY_CHANNELS": '["webhook"]', "CRM_PULSE_SIGNED_WEBHOOK_URL": "https://hook.example.com"},
     "alerts notify sends to webhook (CRM_PULSE_NOTIFY_CHANNELS) and needs CRM_PULSE_SIGNED_WEBHOOK_URL and "
     "CRM_PULSE_SIGNED_WEBHOOK_SECRET"),
    ({"CRM_PULSE_SLACK_BOT_TOKEN": "xoxb-1"},
     "alerts notify sends to reps (Slack bot or e-mail) and needs CRM_PULSE_REP_DIRECTORY, a TOML or CSV file"),
    ({"CRM_PULSE_SLACK_BOT_TOKEN": "xoxb-1", "CRM_PULSE_REP_DIRECTORY": "/nonexistent/reps.toml"},
     "/nonexistent/reps.toml: cannot be read (No such file or directory)"),
    ({"CRM_PULSE_WEBHOOK_URL": "https://hooks.example.com/1", "CRM_PULSE_CRM_RECORD_URL": "https://crm/{id}"},
     "CRM_PULSE_CRM_RECORD_URL='https://crm/{id}' has an unknown placeholder 'id'; use the fields every alert has "
     "(stall and deal): {schema_version}, {alert_id}, {type}, {lead_id}, {rep_id}, {team_id}, {pipeline}, {stage}, "
     "{detected_at}, {account_id}"),
])  # fmt: skip
def test_alerts_notify_missing_a_channels_setting_is_one_line_and_exit_1(env, expected):
    code, stderr, _ = crm_pulse("alerts", "notify", CRM_PULSE_BROKER=refused_address(), **env)
    assert (code, stderr) == (1, [f"crm-pulse: {expected}"])


def test_an_unknown_notify_channel_is_one_line_and_exit_2():
    code, stderr, _ = crm_pulse("alerts", "notify", CRM_PULSE_NOTIFY_CHANNELS='["sms"]')
    assert (code, stderr) == (2, [
        "crm-pulse: CRM_PULSE_NOTIFY_CHANNELS='[\"sms\"]': [0]: Input should be 'slack', 'email', 'teams' or "
        "'webhook' (expected a JSON array of channels among slack, email, teams, webhook, e.g. [\"slack\", "
        "\"email\"]) (settings: docs/configuration.md)"
    ])


def test_import_reps_from_a_bad_export_is_one_line_and_exit_1(tmp_path):
    export = tmp_path / "users.csv"
    export.write_text("Id,Email,TimeZoneSidKey\nrep-1,bo@example.com,Mars/Base\n")
    code, stderr, _ = crm_pulse("alerts", "import-reps", str(export), str(tmp_path / "reps.csv"))
    assert (code, stderr) == (1, [
        f"crm-pulse: {tmp_path / 'reps.csv'}:2: timezone 'Mars/Base' is not an IANA time zone such as Europe/Berlin"
    ])


ENVIRONMENT = ("environ", "environb", "getenv", "getenvb")


def environment_reads(source: str, filename: str) -> list[str]:
    """file:line of each read of the process environment: os.environ or os.getenv, or either imported by name."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            names = [node.attr]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            names = [alias.name for alias in node.names]
        else:
            continue
        if any(name in ENVIRONMENT for name in names):
            lines.append(node.lineno)
    return [f"{filename}:{line}" for line in sorted(lines)]


def test_the_environment_check_finds_every_way_of_reading_it():
    snippet = "import os\nfrom os import environ as env, getenv\nos.environ.get('X')\nos.getenv('X')\nenviron['X']\n"
    assert environment_reads(snippet, "snippet.py") == ["snippet.py:2", "snippet.py:3", "snippet.py:4", "snippet.py:5"]


def test_only_the_settings_read_the_environment():
    # Settings are read once, at start (crm_pulse/config.py): everything else is given them.
    reads = [
        read
        for folder in ("crm_pulse", *ALLOWED)
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "crm_pulse" / "config.py"
        for read in environment_reads(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert reads == []


def test_importing_the_agents_builds_no_app_and_reads_no_settings():
    # A setting that cannot be read fails only whoever builds an app from the environment: nobody, on import.
    agents = sorted(f"crm_pulse.agents.{path.stem}" for path in (ROOT / "agents").glob("*.py") if path.stem != "__init__")
    script = "\n".join([
        "import gc, importlib, faust",
        *(f"importlib.import_module({name!r})" for name in agents),
        "assert not [obj for obj in gc.get_objects() if isinstance(obj, faust.App)]",
    ])  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "CRM_PULSE_PARTITIONS": "zero"},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_two_apps_built_in_one_process_keep_their_own_topics_and_tables():
    from prometheus_client import CollectorRegistry, generate_latest

    from crm_pulse.agents.metrics import serve_metrics
    from crm_pulse.agents.worker import build_app
    from crm_pulse.config import Settings

    first = build_app(Settings(app_id="crm-pulse-a", input_topic="events-a", partitions=2))
    second = build_app(Settings(app_id="crm-pulse-b", input_topic="events-b", partitions=3))
    for pipeline, app_id, topic, partitions in ((first, "crm-pulse-a", "events-a", 2), (second, "crm-pulse-b", "events-b", 3)):
        assert pipeline.app.conf.id == app_id
        assert pipeline.input_topic.get_topic_name() == topic
        assert pipeline.family_topics["lead"].get_topic_name() == f"{app_id}-lead-events"
        assert {table.changelog_topic.get_topic_name() for table in pipeline.app.tables.values()} == {
            f"{app_id}-{name}-changelog" for name in pipeline.app.tables
        }
        assert {table.partitions for table in pipeline.app.tables.values()} == {partitions}
    assert first.leads.index is not second.leads.index and first.clock is not second.clock
    # Building exports nothing (the second build would collide with the first): a worker serves its own gauges.
    for pipeline in (first, second):
        registry = CollectorRegistry()
        serve_metrics(pipeline, registry)
        assert "# TYPE crm_leads_open gauge" in generate_latest(registry).decode()
