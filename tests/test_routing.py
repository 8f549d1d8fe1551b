"""The rep directory (TOML, CSV, reload, import from a CRM user export), the routing of an alert to its
recipients, and the message a rep gets, without a broker."""

from __future__ import annotations

import logging
import os
from datetime import time
from pathlib import Path

import pytest

from crm_pulse.channels import Email, SignedWebhook, SlackBot, TeamsWebhook
from crm_pulse.config import SettingsInvalid
from crm_pulse.directory import Directory, DirectoryFile, DirectoryInvalid, Rep, import_user_export, parse_directory
from crm_pulse.notify import check_link_template, compose, route
from crm_pulse.schemas.records import Alert, DealAlert

TOML = """
[reps.rep-7]
name = "Ana Lima"
email = "ana@example.com"
slack = "U07"
timezone = "Europe/Lisbon"
working_hours = "09:00-17:30"
manager = "rep-1"
team = "team-emea"
team_channel = "C-EMEA"

[reps.rep-1]
name = "Bo Chen"
email = "bo@example.com"
slack = "U01"
"""

CSV = """id,name,email,slack,timezone,working_hours,manager,team,team_channel
rep-7,Ana Lima,ana@example.com,U07,Europe/Lisbon,09:00-17:30,rep-1,team-emea,C-EMEA
rep-1,Bo Chen,bo@example.com,U01,,,,,
"""

ANA = Rep("rep-7", "Ana Lima", "ana@example.com", "U07", "Europe/Lisbon", (time(9), time(17, 30)), "rep-1",
          "team-emea", "C-EMEA")  # fmt: skip
BO = Rep("rep-1", "Bo Chen", "bo@example.com", "U01")
DIRECTORY = Directory({"rep-7": ANA, "rep-1": BO}, {"team-emea": "C-EMEA"})


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("name", "text"), [("reps.toml", TOML), ("reps.csv", CSV)])
def test_a_toml_or_csv_directory_reads_every_field(tmp_path, name, text):
    assert parse_directory(write(tmp_path, name, text)) == DIRECTORY


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[reps.r1]\ntimezone = "Europe/Lisbn"\n',
         ": [reps.r1]: timezone 'Europe/Lisbn' is not an IANA time zone such as Europe/Berlin"),
        ('[reps.r1]\nmanager = "r9"\n', ": rep r1: manager r9 is not in the directory; add them"),
        ('[reps.r1]\nworking_hours = "9-5"\n', ": [reps.r1]: working_hours '9-5' is not like 09:00-17:30"),
        ('[reps.r1]\nphone = "1"\n', ": [reps.r1]: unknown key 'phone'; the keys are id, name, email, slack, timezone, "
                                     "working_hours, manager, team, team_channel"),
        ('[reps.r1]\nemail = "ana"\n', ": [reps.r1]: email 'ana' is not an e-mail address"),
        ('[reps.r1]\nteam = "t"\nteam_channel = "C1"\n[reps.r2]\nteam = "t"\nteam_channel = "C2"\n',
         ": rep r2: team t has two team channels, C1 and C2; give the team one"),
        ("[reps.r1\n", ": Expected ']' at the end of a table declaration (at line 1, column 9)"),
    ],
)  # fmt: skip
def test_a_bad_directory_is_one_line_naming_the_file_the_rep_and_the_fix(tmp_path, text, expected):
    path = write(tmp_path, "reps.toml", text)
    with pytest.raises(DirectoryInvalid) as error:
        parse_directory(path)
    assert str(error.value) == f"{path}{expected}"


def test_the_directory_is_read_again_when_it_changes_and_a_bad_change_keeps_the_last_good_one(tmp_path, caplog):
    path = write(tmp_path, "reps.toml", '[reps.r1]\nname = "Ana"\n')
    watched = DirectoryFile(path)
    assert watched.current().reps["r1"].name == "Ana"
    path.write_text('[reps.r1]\nname = "Ana Lima"\n[reps.r2]\nname = "Bo"\n')
    os.utime(path, ns=(1, 1))  # a new stamp even within the file system's time resolution
    assert {rep.name for rep in watched.current().reps.values()} == {"Ana Lima", "Bo"}
    path.write_text('[reps.r1]\ntimezone = "Mars/Base"\n')
    with caplog.at_level(logging.ERROR, logger="crm_pulse.directory"):
        assert {rep.name for rep in watched.current().reps.values()} == {"Ana Lima", "Bo"}
    assert caplog.messages == [
        f"keeping the previous rep directory: {path}: [reps.r1]: timezone 'Mars/Base' is not an IANA time zone "
        "such as Europe/Berlin"
    ]


def test_a_crm_user_export_becomes_a_directory(tmp_path):
    export = write(tmp_path, "users.csv", (
        "\ufeffId,First Name,Last Name,Email,TimeZoneSidKey,ManagerId,Title\n"
        "rep-1,Bo,Chen,bo@example.com,America/New_York,,VP Sales\n"
        "rep-7,Ana,Lima,ana@example.com,Europe/Lisbon,rep-1,AE\n"
    ))  # fmt: skip
    out = tmp_path / "reps.csv"
    assert import_user_export(export, out) == 2
    assert out.read_text().splitlines() == [
        "id,name,email,slack,timezone,working_hours,manager,team,team_channel",
        "rep-1,Bo Chen,bo@example.com,,America/New_York,,,,",
        "rep-7,Ana Lima,ana@example.com,,Europe/Lisbon,,rep-1,,",
    ]
    assert parse_directory(out).reps["rep-7"].manager == "rep-1"


def test_an_export_without_a_user_id_column_says_which_names_it_takes(tmp_path):
    export = write(tmp_path, "users.csv", "Login,Email\nana,ana@example.com\n")
    with pytest.raises(DirectoryInvalid) as error:
        import_user_export(export, tmp_path / "reps.csv")
    assert str(error.value) == f"{export}: no user id column (one of id, userid, ownerid, repid); rename it to id"


def alert(kind: str = "lead.stalled", rep: str = "rep-7", **fields) -> Alert:
    return Alert(**{
        "alert_id": "a-1", "type": kind, "lead_id": "L1", "rep_id": rep, "team_id": "team-emea", "pipeline": None,
        "stage": "qualified", "idle_since": "2026-01-01T00:00:00.000Z", "idle_seconds": 5 * 86400.0,
        "threshold_seconds": 4 * 86400.0, "rule": "p90_dwell", "detected_at": "2026-01-06T00:00:00.000Z", **fields,
    })  # fmt: skip


SLACK = SlackBot("xoxb-1", "http://slack.invalid", 5)
EMAIL = Email("smtp.invalid", 587, True, None, None, "crm@example.com", None, 5)
TEAMS = TeamsWebhook("http://teams.invalid", 5)
SIGNED = SignedWebhook("http://hook.invalid", b"k", 5)


def routes(deliveries) -> list[tuple[str, str, str | None]]:
    return [(d.channel.name, d.recipient, d.address) for d in deliveries]


def test_a_stall_goes_to_the_rep_an_escalation_also_to_the_manager_an_unassigned_lead_to_the_team_channel():
    channels = [EMAIL, SLACK, TEAMS, SIGNED]
    assert routes(route(alert(), DIRECTORY, channels)) == [
        ("email", "rep:rep-7", "ana@example.com"), ("slack", "rep:rep-7", "U07"), ("teams", "all", None),
        ("webhook", "all", None),
    ]  # fmt: skip
    assert routes(route(alert("lead.stall_escalated"), DIRECTORY, [EMAIL, SLACK])) == [
        ("email", "rep:rep-7", "ana@example.com"), ("email", "manager:rep-1", "bo@example.com"),
        ("slack", "rep:rep-7", "U07"), ("slack", "manager:rep-1", "U01"),
    ]  # fmt: skip
    # Bo has no manager; a cleared stall is not escalated.
    assert routes(route(alert("lead.stall_escalated", rep="rep-1"), DIRECTORY, [SLACK])) == [("slack", "rep:rep-1", "U01")]
    assert routes(route(alert("lead.stall_cleared"), DIRECTORY, [SLACK])) == [("slack", "rep:rep-7", "U07")]
    # The team channel is Slack's: e-mail has nobody to write to.
    assert routes(route(alert(rep="unassigned"), DIRECTORY, [EMAIL, SLACK])) == [("slack", "team:team-emea", "C-EMEA")]
    assert routes(route(alert(rep="unassigned", team_id="team-apac"), DIRECTORY, [EMAIL, SLACK])) == []


def test_the_message_says_what_a_rep_can_act_on():
    template = "https://crm.example.com/leads/{lead_id}?stage={stage}"
    message = compose(alert("lead.stall_escalated", account_id="acct-acme", deal_value=12500.0), DIRECTORY, template)
    assert message.headline == "Lead L1 (account acct-acme) still stalled in stage qualified (escalated)"
    assert message.facts == "idle 5.0d, threshold 4.0d, rep Ana Lima, manager Bo Chen, deal value 12,500.00"
    assert message.details == "lead.stall_escalated · detected 2026-01-06T00:00:00.000Z · rule p90_dwell · alert a-1"
    assert message.link == "https://crm.example.com/leads/L1?stage=qualified"
    # Without a directory entry or optional fields: the ids the alert has.
    bare = compose(alert(rep="unassigned"), None, None)
    assert (bare.headline, bare.facts, bare.link) == (
        "Lead L1 stalled in stage qualified", "idle 5.0d, threshold 4.0d, rep unassigned, team team-emea", None
    )  # fmt: skip


def deal_alert(kind: str, rep: str = "rep-7", **fields) -> DealAlert:
    return DealAlert(**{
        "alert_id": "d-1", "type": kind, "lead_id": "D1", "rep_id": rep, "team_id": "team-emea", "pipeline": None,
        "account_id": None, "stage": "proposal", "detected_at": "2026-03-05T00:00:00.000Z", "amount": 10000.0,
        "close_date": "2026-03-31T00:00:00.000Z", "previous_close_date": None, "push_count": None,
        "previous_amount": None, "decrease_ratio": None, "from_stage": None, "to_stage": None, "health": None,
        "health_band": None, "previous_health_band": None, **fields,
    })  # fmt: skip


def test_a_deal_alert_goes_to_the_rep_alone_and_an_unassigned_deal_to_the_team_channel():
    # No deal alert is an escalation: the manager is not told.
    assert routes(route(deal_alert("deal.past_due"), DIRECTORY, [EMAIL, SLACK, TEAMS])) == [
        ("email", "rep:rep-7", "ana@example.com"), ("slack", "rep:rep-7", "U07"), ("teams", "all", None),
    ]  # fmt: skip
    assert routes(route(deal_alert("deal.past_due", rep="unassigned"), DIRECTORY, [EMAIL, SLACK])) == [
        ("slack", "team:team-emea", "C-EMEA")
    ]


def test_a_deal_alerts_message_says_what_happened_to_the_deal():
    template = "https://crm.example.com/deals/{lead_id}?stage={stage}"
    slipped = compose(deal_alert("deal.close_date_slipped", account_id="acct-acme", previous_close_date=
                                 "2026-03-15T00:00:00.000Z", push_count=2), DIRECTORY, template)  # fmt: skip
    assert (slipped.headline, slipped.facts, slipped.details, slipped.link) == (
        "Deal D1 (account acct-acme): close date pushed from 2026-03-15 to 2026-03-31 (2 pushes)",
        "stage proposal, amount 10,000.00, rep Ana Lima",
        "deal.close_date_slipped · detected 2026-03-05T00:00:00.000Z · alert d-1",
        "https://crm.example.com/deals/D1?stage=proposal",
    )  # fmt: skip
    once = compose(deal_alert("deal.close_date_slipped", previous_close_date="2026-03-15T12:30:00.000Z",
                              push_count=1), DIRECTORY, None)  # fmt: skip
    assert once.headline == "Deal D1: close date pushed from 2026-03-15T12:30:00.000Z to 2026-03-31 (1 push)"
    texts = [compose(alert, DIRECTORY, None).text for alert in (
        deal_alert("deal.past_due"),
        deal_alert("deal.stage_regressed", stage="qualified", from_stage="proposal", to_stage="qualified"),
        deal_alert("deal.amount_decreased", amount=7000.0, previous_amount=10000.0, decrease_ratio=0.3),
        deal_alert("deal.health_dropped", health=43.9, health_band="at_risk", previous_health_band="healthy"),
    )]  # fmt: skip
    assert texts == [
        "Deal D1 is past its close date 2026-03-31 and still open: stage proposal, amount 10,000.00, rep Ana Lima",
        "Deal D1 moved back from stage proposal to qualified: stage qualified, amount 10,000.00, close date "
        "2026-03-31, rep Ana Lima",
        "Deal D1: amount cut by 30% from 10,000.00 to 7,000.00: stage proposal, close date 2026-03-31, rep Ana Lima",
        "Deal D1: health dropped from healthy to at_risk (score 43.9): stage proposal, amount 10,000.00, close date "
        "2026-03-31, rep Ana Lima",
    ]
    bare = compose(deal_alert("deal.past_due", rep="unassigned", amount=None, stage=None), None, None)
    assert bare.text == "Deal D1 is past its close date 2026-03-31 and still open: rep unassigned, team team-emea"


def test_a_link_template_with_an_unknown_placeholder_names_the_ones_it_may_use():
    check_link_template("https://crm.example.com/leads/{lead_id}")
    # A stall alert's own field: a deal alert has none to fill it with.
    with pytest.raises(SettingsInvalid, match="unknown placeholder 'idle_since'"):
        check_link_template("https://crm.example.com/leads/{lead_id}?idle={idle_since}")
    with pytest.raises(SettingsInvalid) as error:
        check_link_template("https://crm.example.com/leads/{lead}")
    assert str(error.value).startswith(
        "CRM_PULSE_CRM_RECORD_URL='https://crm.example.com/leads/{lead}' has an unknown placeholder 'lead'; "
        "use the fields every alert has (stall and deal): {schema_version}, {alert_id}, {type}, {lead_id}, {rep_id}"
    )
