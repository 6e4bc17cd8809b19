"""The web port while the server starts: a page that says what it is doing, until the household's page
takes the port.

Start-up takes seconds (loading the model), minutes (a preset's first download) or, on a first start with
the demo model (the add-on's default), one to two hours: the model is built then. Without this page the
web port is closed all that time, and Home Assistant's sidebar panel (ingress) shows an error. While the
server loads, `StartingPage` serves on `--web-port` a page with what the start-up logged (its warnings and
its latest lines; the page reloads itself); `/healthz`, `/metrics` and the API answer 503 with the latest
line. It runs an aiohttp app in a thread of its own, as the start-up blocks the main thread, and closes
the port before the server's own web app opens it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from contextlib import suppress
from types import TracebackType

from aiohttp import web

from .webui import HEADERS, LogLine, starting_page, static

_LOGGER = logging.getLogger(__name__)

REFRESH_S = 30
WARNINGS_KEPT = 5
LINES_KEPT = 8
STOP_S = 5.0


class StartLog(logging.Handler):
    """The start-up's latest warnings and lines (of the package's loggers), for the page."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.since = time.time()
        self._warnings: deque[LogLine] = deque(maxlen=WARNINGS_KEPT)
        self._lines: deque[LogLine] = deque(maxlen=LINES_KEPT)

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = (record.created, record.levelno, record.getMessage())
        except Exception:  # a message that cannot be formatted: the logging module reports it
            self.handleError(record)
            return
        (self._warnings if record.levelno >= logging.WARNING else self._lines).append(line)

    def lines(self) -> list[LogLine]:
        """Warnings and latest lines, in time order."""
        with self.lock:  # type: ignore[union-attr]  # a Handler's lock, made in __init__
            return sorted({*self._warnings, *self._lines})


START_LOG = web.AppKey("start_log", StartLog)


class StartingPage:
    """`with StartingPage(host, port):` serves the page on `host:port` for the block's duration (port 0:
    any free one). A port that cannot be had is logged and the start-up goes on without the page."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.log = StartLog()
        self._thread = threading.Thread(target=self._run, name="starting-page", daemon=True)
        self._ready = threading.Event()  # listening, or given up
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> StartingPage:
        self._thread.start()
        self._ready.wait()
        logging.getLogger(__package__).addHandler(self.log)  # from here on: not its own line
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            with suppress(RuntimeError):  # its loop has ended already
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STOP_S)
        logging.getLogger(__package__).removeHandler(self.log)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        app = web.Application()
        app[START_LOG] = self.log
        app.add_routes(
            [
                web.get("/healthz", _healthz),
                web.get("/static/{name}", static),
                web.get("/metrics", _unavailable),
                web.route("*", "/api/{rest:.*}", _unavailable),
                web.get("/{rest:.*}", _page),
            ]
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as err:
            _LOGGER.warning("web: no start-up page on %s:%s (%s)", self.host, self.port, err)
            await runner.cleanup()
            return
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        host, port = runner.addresses[0][:2]
        _LOGGER.info("web: a start-up page on http://%s:%d until the server is ready", host, port)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()


def _start_log(request: web.Request) -> StartLog:
    return request.app[START_LOG]


def _doing(log: StartLog) -> str:
    lines = log.lines()
    return lines[-1][2] if lines else "loading"


async def _page(request: web.Request) -> web.Response:
    log = _start_log(request)
    return web.Response(
        text=starting_page(log.since, log.lines(), REFRESH_S), content_type="text/html", headers=HEADERS
    )


async def _healthz(request: web.Request) -> web.Response:
    return _not_yet({"status": "starting", "doing": _doing(_start_log(request))})


async def _unavailable(request: web.Request) -> web.Response:
    return _not_yet({"error": f"the server is starting ({_doing(_start_log(request))}); try again later"})


def _not_yet(body: dict[str, str]) -> web.Response:
    """503, with when to ask again."""
    return web.json_response(body, status=503, headers={"Retry-After": str(REFRESH_S)})
