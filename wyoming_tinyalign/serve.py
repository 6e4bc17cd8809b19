"""`wyoming-tinyalign serve`: the Wyoming server for Home Assistant and voice satellites.

Start-up loads the model (building the demo model or writing a preset bundle first when asked; on
`--device cuda` in half precision), opens the interaction log, listens on `--uri` (tcp://, unix:// or
stdio://) and advertises itself over zeroconf. With `--hass-url` the household context for the prompt
comes from Home Assistant, fetched in the background (see `hass.py`); serving never waits for it.
SIGTERM or SIGINT stop it gracefully: no new connections, requests in flight are answered, the
log is flushed, exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sqlite3
import sys
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event, async_get_stdin, async_write_event
from wyoming.server import AsyncServer, AsyncStdioServer, AsyncTcpServer, AsyncUnixServer

from .adapt import NightData
from .assistant import (
    DEFAULT_MIN_CONFIDENCE,
    Assistant,
    ContextProvider,
    load_context_file,
    static_context,
)
from .discovery import Advert
from .handler import MAX_HEADER_BYTES, ServerSettings, TinyAlignHandler, build_info, close_gently
from .hass import DEFAULT_REFRESH_MINUTES, HOUSEHOLD_FILE, HassContext, cached_context
from .models import (
    DEV,
    PRESET_PREFIX,
    PRESETS,
    add_dtype_arg,
    inference_dtype,
    load_model,
    projector_version,
    resolve_model,
    sweep_stopped_builds,
)
from .scheduler import Nightly, add_adaptation_args
from .starting import StartingPage
from .store import MIN_FREE_BYTES, NO_LOG, InteractionStore, StoreDamaged, StoreError
from .words import counted
from .worker import PATH_CHOICES, InferenceWorker

_LOGGER = logging.getLogger(__name__)

DEFAULT_ZEROCONF_NAME = "tinyalign"
SHUTDOWN_GRACE_S = 30.0
_TRUE = {"1", "true", "yes", "on"}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `serve` (each also from `WYOMING_TINYALIGN_<FLAG>`)."""
    presets = ", ".join(PRESET_PREFIX + name for name in PRESETS)
    parser.add_argument(
        "--uri", default="tcp://0.0.0.0:10300", help="tcp://HOST:PORT, unix://PATH or stdio://"
    )
    parser.add_argument("--data-dir", required=True, type=Path, help="where models and the log live")
    parser.add_argument(
        "--model", default=DEV, help=f"bundle folder, '{DEV}' (offline demo model, built once), or {presets}"
    )
    parser.add_argument("--path", choices=PATH_CHOICES, default="auto", help="auto: aligned once trained")
    parser.add_argument("--language", default="en", help="language of the model (and of the answers)")
    parser.add_argument(
        "--min-confidence", type=min_confidence, default=DEFAULT_MIN_CONFIDENCE, metavar="LOGPROB|off",
        help="withhold an audio answer's intent when its words were heard with a lower mean token "
        "log-probability (answer 'not understood' instead)",
    )  # fmt: skip
    parser.add_argument(
        "--zeroconf", nargs="?", const=DEFAULT_ZEROCONF_NAME, default=None, metavar="NAME",
        help=f"advertise over zeroconf (mDNS) as NAME (default {DEFAULT_ZEROCONF_NAME})",
    )  # fmt: skip
    parser.add_argument(
        "--max-audio-seconds", type=float, default=30.0, help="longer utterances get an error"
    )
    parser.add_argument("--no-log-audio", action="store_true", help="log interactions without their audio")
    parser.add_argument("--no-log", action="store_true", help="keep no interaction log at all")
    parser.add_argument(
        "--retention-days", type=float, default=30.0, help="forget older interactions (0: keep)"
    )
    parser.add_argument("--retention-mb", type=float, default=2000.0, help="cap on logged audio (0: no cap)")
    parser.add_argument(
        "--min-free-mb", type=float, default=MIN_FREE_BYTES >> 20,
        help="keep no recordings while the disk has less free (0: no limit)",
    )  # fmt: skip
    parser.add_argument(
        "--context-file", type=Path, help="household JSON: areas and device names for the LLM"
    )
    parser.add_argument(
        "--hass-url", help="Home Assistant (http(s)://HOST:8123 or a ws:// URL) for household context"
    )
    parser.add_argument("--hass-token", help="Home Assistant long-lived access token (better from the env)")
    parser.add_argument(
        "--hass-refresh-minutes", type=float, default=DEFAULT_REFRESH_MINUTES,
        help="how often the household context is fetched again",
    )  # fmt: skip
    add_dtype_arg(parser)
    parser.add_argument("--tts-uri", help="Wyoming TTS server for run-pipeline clients ending in tts")
    parser.add_argument("--no-streaming", action="store_true", help="no transcript-start/-chunk/-stop events")
    parser.add_argument("--max-connections", type=int, default=16, help="more concurrent clients are refused")
    parser.add_argument(
        "--max-event-bytes", type=int, default=4 << 20, help="cap on one event's data+payload"
    )
    parser.add_argument(
        "--read-timeout", type=float, default=30.0, help="seconds within an event or a stream"
    )
    parser.add_argument("--idle-timeout", type=float, default=600.0, help="idle connection timeout (0: none)")
    add_adaptation_args(parser)  # --adapt-at, --web-port, ... (scheduler.py)


def min_confidence(value: str) -> float | None:
    """`--min-confidence`: a log-probability (<= 0), or `off` (None)."""
    if value.strip().lower() == "off":
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a log-probability <= 0 or 'off', got {value!r}") from None
    if not number <= 0:
        raise argparse.ArgumentTypeError(f"a log-probability is <= 0, got {value!r}")
    return number


def open_log(args: argparse.Namespace) -> tuple[InteractionStore | None, str]:
    """The interaction log, or None and why logging is off. A damaged log is set aside for a new one;
    one that cannot be used otherwise (a newer version's, a full disk while migrating, a folder that may
    not be written) leaves logging off until a restart: answering matters more than the log."""
    if args.no_log:
        return None, NO_LOG
    store = InteractionStore(
        args.data_dir / "log",
        log_audio=not args.no_log_audio,
        retention_days=args.retention_days,
        retention_bytes=int(args.retention_mb * 1024 * 1024),
        min_free_bytes=int(args.min_free_mb * 1024 * 1024),
        derived=NightData(args.data_dir),
    )
    try:
        try:
            store.open()  # before the model, while the event loop is not running yet
        except StoreDamaged as err:
            store.start_over(err)
        store.sweep()  # audio a crash left without its row (nothing is being logged yet)
    except (StoreError, OSError, sqlite3.Error) as err:
        store.close()
        _LOGGER.error("logging is off: %s; the assistant answers without it (fix it, then restart)", err)
        return None, str(err)
    return store, ""


def _stop_loading(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    """Load everything, then serve until SIGTERM/SIGINT (or stdin ends for stdio://).

    Until it serves, SIGTERM stops it as Ctrl-C does, with a line in the log and exit code 0: loading
    takes minutes, a first start's demo build hours (and that build goes on at the next start)."""
    signal.signal(signal.SIGTERM, _stop_loading)  # until `App.serve` puts its own handlers in place
    page = StartingPage(args.web_host, args.web_port) if args.web_port is not None else nullcontext()
    try:
        with page:  # the web port says what the start-up does until the household's page takes it
            app, server, zeroconf = _load(args)
    except KeyboardInterrupt:
        _LOGGER.warning("stopped before serving")
        return 0
    return asyncio.run(app.serve(server, zeroconf))


def _load(args: argparse.Namespace) -> tuple[App, AsyncServer, str | None]:
    """The app of `args`, its server (not listening yet) and its zeroconf name."""
    server = AsyncServer.from_uri(args.uri)  # validates the URI
    if args.tts_uri:
        AsyncClient.from_uri(args.tts_uri)  # validates it now rather than at the first request
    for name in ("max_audio_seconds", "read_timeout", "max_event_bytes", "max_connections"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    file_context = load_context_file(args.context_file) if args.context_file else ""
    hass = None
    if args.hass_url:  # the context file (or the last context fetched) until Home Assistant answers
        hass = HassContext(
            args.hass_url,
            args.hass_token or "",
            data_dir=args.data_dir,
            refresh_s=args.hass_refresh_minutes * 60,
            initial=file_context or cached_context(args.data_dir / HOUSEHOLD_FILE),
        )
    household: ContextProvider = hass if hass is not None else static_context(file_context)
    dtype = inference_dtype(args.device, args.dtype)
    store, log_off = open_log(args)
    choice = resolve_model(args.model, args.data_dir)
    if not choice.demo:
        sweep_stopped_builds(args.data_dir / "models")
    model = load_model(choice, args.device, dtype)
    worker = InferenceWorker(model, args.path)
    if store is not None:  # (opened before the model: now a delete can reach the memory it serves too)
        store.derived = NightData(args.data_dir, served=worker.forget_memory)
    version = projector_version(choice.folder)
    nightly = Nightly.setup(args, choice, worker, version)  # serves the promoted version (scheduler.py)
    version = nightly.version
    description = (
        "DEMO model: the offline development model, trained on synthetic speech only"
        if choice.demo
        else f"bundle {choice.folder}"
    )
    if choice.demo:
        _LOGGER.warning("serving the DEMO model %s (synthetic speech only; not for real use)", choice.folder)
    aligned = "aligned projector" if model.has_aligned_projector else "no aligned projector yet"
    _LOGGER.info(
        "model %s loaded on %s in %s (%s); path %s",
        choice.name, model.device, str(dtype).removeprefix("torch."), aligned, worker.path,
    )  # fmt: skip
    settings = ServerSettings(
        language=args.language,
        max_audio_seconds=args.max_audio_seconds,
        max_event_bytes=args.max_event_bytes,
        read_timeout=args.read_timeout,
        idle_timeout=args.idle_timeout or None,
        streaming=not args.no_streaming,
        tts_uri=args.tts_uri,
    )
    assistant = Assistant(worker, store, household, version, args.min_confidence)
    assistant.cascade_version = version if nightly.adapted else None
    app = App(
        assistant=assistant,
        settings=settings,
        info=build_info(choice.name, description, version, settings).event(),
        max_connections=args.max_connections,
        log_off=log_off,
        services=[nightly] if hass is None else [hass, nightly],
    )
    zeroconf = args.zeroconf
    if zeroconf is not None and zeroconf.strip().lower() in _TRUE:  # WYOMING_TINYALIGN_ZEROCONF=true
        zeroconf = DEFAULT_ZEROCONF_NAME
    return app, server, zeroconf


@dataclass
class App:
    """The running server: listener, connections, shared assistant, graceful stop."""

    assistant: Assistant
    settings: ServerSettings
    info: Event
    max_connections: int
    log_off: str = ""  # why the interaction log is off ("--no-log", or why it cannot be used)
    services: list[Any] = field(default_factory=list)  # start(app) once listening, stop() at the end
    _handlers: dict[asyncio.Task[None], TinyAlignHandler] = field(default_factory=dict, init=False)
    _stopping: bool = field(default=False, init=False)

    async def serve(self, server: AsyncServer, zeroconf_name: str | None) -> int:
        """Serve until SIGTERM/SIGINT (or the end of stdin), then stop gracefully; returns 0."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        store = self.assistant.store
        listener: asyncio.Server | None = None
        advert = None
        try:
            if isinstance(server, AsyncStdioServer):
                stdio_task = await self._serve_stdio()
                _LOGGER.info("ready: serving on stdio://")
                await self._start_services()
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait({stopped, stdio_task}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
            else:
                listener, where = await self._listen(server)
                _LOGGER.info("ready: serving on %s", where)
                await self._start_services()
                if zeroconf_name and isinstance(server, AsyncTcpServer):
                    advert = await Advert.start(zeroconf_name, server.host, listener)
                await stop.wait()
            busy = sum(h.busy for h in self._handlers.values())
            _LOGGER.info(
                "stopping: %s, %d with a request in flight", counted(len(self._handlers), "connection"), busy
            )
        finally:
            if listener is not None:
                listener.close()
                if isinstance(server, AsyncUnixServer):
                    server.socket_path.unlink(missing_ok=True)
            if advert is not None:
                await advert.stop()
            for service in self.services:
                await service.stop()
            await self._stop_handlers()
            await asyncio.to_thread(self.assistant.worker.close)
            await self.assistant.drain()
            if store is not None:
                await store.async_close()
            _LOGGER.info("stopped")
        return 0

    def set_info(self, info: Event) -> None:
        """A new `info` (e.g. after a projector hot-swap), for new and open connections."""
        self.info = info
        for handler in self._handlers.values():
            handler._info = info

    async def _start_services(self) -> None:
        """Once listening: the background services (Home Assistant context, nightly adaptation, web)."""
        for service in self.services:
            await service.start(self)

    async def _listen(self, server: AsyncServer) -> tuple[asyncio.Server, str]:
        if isinstance(server, AsyncTcpServer):
            listener = await asyncio.start_server(
                self._accept, host=server.host, port=server.port, limit=MAX_HEADER_BYTES
            )
            host, port = listener.sockets[0].getsockname()[:2]
            return listener, f"tcp://{host}:{port}"
        assert isinstance(server, AsyncUnixServer)
        server.socket_path.unlink(missing_ok=True)
        listener = await asyncio.start_unix_server(
            self._accept, path=server.socket_path, limit=MAX_HEADER_BYTES
        )
        return listener, f"unix://{server.socket_path}"

    async def _serve_stdio(self) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        reader = await async_get_stdin()
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return self._start_handler(reader, writer, "stdio")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if len(self._handlers) >= self.max_connections:
            _LOGGER.warning(
                "%s: refused, %d connections open (--max-connections)", client, len(self._handlers)
            )
            text = f"too many connections ({self.max_connections}); try again later"
            with suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(async_write_event(Error(text=text, code="busy").event(), writer), 5.0)
            await close_gently(reader, writer)
            return
        self._start_handler(reader, writer, client)

    def _start_handler(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str
    ) -> asyncio.Task[None]:
        handler = TinyAlignHandler(
            reader,
            writer,
            assistant=self.assistant,
            settings=self.settings,
            info=self.info,
            client=client,
        )
        if self._stopping:  # accepted just before the listener closed: answer what it sent, then close
            handler.request_stop()
        task = asyncio.create_task(handler.run(), name=f"wyoming {client}")
        self._handlers[task] = handler
        task.add_done_callback(lambda done: self._handlers.pop(done, None))
        _LOGGER.debug("%s: connected", client)
        return task

    async def _stop_handlers(self) -> None:
        """Let every connection finish the request in flight (one accepted while stopping too); cancel what
        is left after the grace time."""
        self._stopping = True
        for handler in self._handlers.values():
            handler.request_stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE_S
        while self._handlers and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._handlers), timeout=left)
        pending = list(self._handlers)
        for task in pending:
            task.cancel()
        if pending:
            _LOGGER.warning(
                "cancelled %s still busy after %.0f s", counted(len(pending), "connection"), SHUTDOWN_GRACE_S
            )
            await asyncio.wait(pending, timeout=5.0)
