"""Gateway: `crm-pulse gateway` (a real process) taking signed `/webhooks/events` requests from concurrent
clients for a fixed time: requests and events per second, and each request's time from sending to its 2xx,
which waits for the broker's acks=all acknowledgement of every event. Then every acknowledged event is counted
on the input topic."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time

import aiohttp
import orjson

from bench.harness import Bench, percentile, rate, synthetic_events
from crm_pulse.broker import free_port
from crm_pulse.generator import SyntheticCrm

SECRET = "bench-signing-secret"
CRM = {"seed": 19, "reps": 40, "leads_per_day": 500}


def signed(body: bytes) -> dict:
    t = str(int(time.time()))
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-CRM-Pulse-Signature": f"t={t},v1={mac}"}


async def phase_gateway(bench: Bench, config) -> dict:
    app = bench.app("gateway", config.partitions)
    for topic in (app.input_topic, app.dlq_topic):
        await bench.create_topic(topic, config.partitions)
    port = free_port()
    gateway = bench.worker(app, "gateway", CRM_PULSE_GATEWAY_PORT=str(port), CRM_PULSE_EVENTS_SIGNING_SECRET=SECRET,
                           CRM_PULSE_BROKER_KIND=bench.broker_kind).start()  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    bench.reporter.step("waiting for the gateway to be ready")
    deadline = time.monotonic() + 60
    while True:
        gateway.check_alive()
        try:
            async with bench.session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    break
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway was not ready after 60 s:\n{gateway.log_tail()}")
        await asyncio.sleep(0.2)

    events = list(synthetic_events(config.gateway_batch * 1000, **CRM))
    bodies = itertools.cycle([orjson.dumps(events[i:i + config.gateway_batch])
                              for i in range(0, len(events), config.gateway_batch)])  # fmt: skip
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted_events = 0
    bench.reporter.step(f"{config.gateway_clients} clients for {config.gateway_seconds:.0f} s",
                        total=config.gateway_seconds)  # fmt: skip
    started = time.monotonic()
    stop_at = started + config.gateway_seconds

    async def client() -> None:
        nonlocal accepted_events
        while (now := time.monotonic()) < stop_at:
            body = next(bodies)
            async with bench.session.post(f"{url}/webhooks/events", data=body, headers=signed(body)) as response:
                answer = await response.json()
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 200:
                latencies.append((time.monotonic() - now) * 1000)
                accepted_events += answer["published"]
            bench.reporter.update(min(time.monotonic() - started, config.gateway_seconds))

    await asyncio.gather(*(client() for _ in range(config.gateway_clients)))
    seconds = time.monotonic() - started
    steady = await at_fixed_rate(bench, f"{url}/webhooks/events", bodies, config)
    bench.reporter.step("counting the input topic")
    on_topic = 0
    async for _ in bench.read_topic(app.input_topic, config.partitions):
        on_topic += 1
    plain_events_per_s = await plain_producer_rate(bench, events, config.partitions)
    requests = sum(statuses.values())
    return {
        "clients": config.gateway_clients, "events_per_request": config.gateway_batch, "seconds": round(seconds, 2),
        "requests": requests, "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "requests_per_s": rate(requests, seconds), "events_per_s": rate(accepted_events, seconds),
        "ack_p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "ack_p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "events_acknowledged": accepted_events + steady["events_acknowledged"], "events_on_topic": on_topic,
        "fixed_rate": steady,
        "plain_producer_events_per_s": plain_events_per_s,
        "to_plain_producer_ratio": round(accepted_events / seconds / plain_events_per_s, 3),
        "memory": gateway.memory_mib(),
    }  # fmt: skip


async def at_fixed_rate(bench: Bench, url: str, bodies, config) -> dict:
    """Requests sent on a fixed schedule (`gateway_rate` per second) by at most `gateway_clients` at once: the
    time to ack a CRM sees at a steady load, not at saturation. Each time counts from the request's scheduled
    start, so a request held back because the senders were all busy counts its wait too."""
    total = int(config.gateway_rate * config.gateway_seconds)
    senders = asyncio.Semaphore(config.gateway_clients)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    acknowledged = 0
    bench.reporter.step(f"{config.gateway_rate:.0f} requests/s for {config.gateway_seconds:.0f} s", total=total)

    async def send(body: bytes, scheduled: float) -> None:
        nonlocal acknowledged
        async with senders:
            async with bench.session.post(url, data=body, headers=signed(body)) as response:
                answer = await response.json()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if response.status == 200:
            latencies.append((time.monotonic() - scheduled) * 1000)
            acknowledged += answer["published"]
        bench.reporter.update(len(latencies))

    started = time.monotonic()
    requests = []
    for n in range(total):
        scheduled = started + n / config.gateway_rate
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        requests.append(asyncio.create_task(send(next(bodies), scheduled)))
    await asyncio.gather(*requests)
    return {
        "requests_per_s_target": config.gateway_rate, "requests": total,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "ack_p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "ack_p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "events_acknowledged": acknowledged,
    }  # fmt: skip


async def plain_producer_rate(bench: Bench, events: list[dict], partitions: int) -> float:
    """Events per second one aiokafka producer (acks=all, as the gateway) writes the same events to a topic of
    the same broker: what the gateway's HTTP, signature checking and validation leave of the broker's rate."""
    topic = bench.app("gateway-plain", partitions).input_topic
    await bench.create_topic(topic, partitions)
    records = [(SyntheticCrm.key(event), orjson.dumps(event), None) for event in events]
    started = time.monotonic()
    await bench.produce(topic, records, len(records), "the same events from a plain producer", acks="all")
    return rate(len(records), time.monotonic() - started)
