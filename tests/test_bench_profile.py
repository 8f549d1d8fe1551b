"""bench/profile.py: how py-spy's samples are put in categories (counted by hand below)."""

from __future__ import annotations

from bench.harness import REPO
from bench.profile import EVENT_LOOP, category, shares

SITE = "/venv/lib/python3.11/site-packages"
LOOP = f"_run_once ({SITE}/asyncio/base_events.py:1900)"
AGENT = f"track_leads ({REPO}/agents/leads.py:90)"
FOLD = f"apply_lead_event ({REPO}/streams/leads.py:100)"
TABLE_SET = f"__setitem__ ({SITE}/faust/tables/table.py:80)"
SEND = f"send ({SITE}/aiokafka/producer/producer.py:400)"
SCHEDULE = f"call_soon ({SITE}/asyncio/base_events.py:700)"


def test_a_sample_goes_to_the_deepest_frame_that_has_a_category():
    assert category([LOOP, AGENT, FOLD]) == "KPI folds (streams/)"
    # A changelog send made by a table write is the producer's time, not the table's.
    assert category([LOOP, AGENT, TABLE_SET, SEND]) == "produce (changelog and internal topics)"
    # asyncio's frames count toward the code that scheduled them.
    assert category([LOOP, AGENT, SCHEDULE]) == "agents/ (the pipeline's own wiring)"
    assert category([LOOP]) == EVENT_LOOP


def test_shares_are_of_the_main_threads_samples_only():
    raw = "\n".join([
        f"thread (11): MainThread;{LOOP};{AGENT};{FOLD} 30",
        f"thread (11): MainThread;{LOOP};{AGENT};{TABLE_SET};{SEND} 10",
        f"thread (11): MainThread;{LOOP} 10",
        f"thread (12): Thread-1;{LOOP};poll ({SITE}/aiokafka/consumer/fetcher.py:10) 50",
        "thread (11): MainThread 7",  # py-spy's idle marker: no frames
    ])  # fmt: skip
    result = shares(raw)
    assert result["main_thread_samples"] == 50
    assert result["main_thread_shares"] == {
        "KPI folds (streams/)": 0.6, "produce (changelog and internal topics)": 0.2, EVENT_LOOP: 0.2,
    }
    assert result["samples_by_thread"] == {"Thread-1": 50, "MainThread": 57}
