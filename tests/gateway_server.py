"""The gateway served in-process on a free loopback port, in its own thread and event loop, so that tests
talk to it over real HTTP."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request

from aiohttp import web

from crm_pulse.broker import free_port, wait_for_port


class Served:
    """`serve(port, stop)` (a coroutine that listens on `port` until `stop` is set) in a thread."""

    def __init__(self, serve):
        self.port, self.serve = free_port(), serve
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),), daemon=True)
        self.failure: BaseException | None = None

    async def _run(self) -> None:
        self.stop_event = asyncio.Event()
        try:
            await self.serve(self.port, self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - the test thread reports it
            self.failure = exc

    def __enter__(self) -> "Served":
        self.thread.start()
        wait_for_port(self.port, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)
        assert self.failure is None, self.failure

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.failure is None

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, headers=headers)
        return self.answer(request)

    def get(self, path: str) -> tuple[int, bytes, dict]:
        return self.answer(urllib.request.Request(f"http://127.0.0.1:{self.port}{path}"))

    @staticmethod
    def answer(request) -> tuple[int, bytes, dict]:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)


def app_server(app: web.Application):
    """A `serve` for `Served` that runs an aiohttp application."""

    async def serve(port: int, stop: asyncio.Event) -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    return serve
