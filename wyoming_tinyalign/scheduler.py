"""Household adaptation inside the server: the nightly timer, the job's child process, hot-swap, web API.

- At start-up the server serves the projector version the pointer names (`DATA_DIR/projectors/current`,
  see `versions.py`: a promoted one, or a rejected one the household chose to serve anyway) when it fits
  the bundle, and records its bundle in `DATA_DIR/model.json`.
- `--adapt-at HH:MM` (local time; `off` to disable) starts `wyoming-tinyalign adapt` as a child process
  (its own session, `nice` 10, torch threads on every core, output appended to `DATA_DIR/adapt/job.log`);
  the server keeps serving while it runs. `POST /api/adapt` starts it at once (with `--now`). A night
  missed because the server was not running then (no run has started since that time, and the log is
  older than it) is run `CATCH_UP_DELAY_S` after the server starts.
- The pointer file is polled every `POLL_S` seconds (and checked as soon as a child job exits). A new
  version is loaded off the event loop, checked against the bundle (encoder and LLM ids, sizes; a
  mismatch is refused with a logged error), then swapped in on the inference thread between requests.
  The new version shows in `info` (the programs' model `version`) and in the log rows' projector_version.
- The web API and the household's page (`web.py`, `webui/`) run on `--web-port`; the log shows a link
  that logs the browser in (`?token=...`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import signal
import sqlite3
import sys
from contextlib import suppress
from datetime import datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from aiohttp import web
from wyoming.event import Event
from wyoming.info import Info

from .adapt import ADAPT_DIR, CONTEXT_FILE, clean_up_killed_run
from .discovery import advertised_address
from .files import naming, write_atomic
from .model.bundle import BundleConfig, BundleError, ProjectorInfo, load_bundle_config, load_projector
from .model.decoder_adapter import ShapedAdapter
from .model.projector import Projector
from .models import ModelChoice
from .store import StoreError
from .versions import BASE, VersionError, Versions, check_fits, record_model
from .web import Metrics, WebContext, build_app, load_token
from .worker import InferenceWorker

_LOGGER = logging.getLogger(__name__)

POLL_S = 2.0
DEFAULT_ADAPT_AT = "03:00"
DEFAULT_WEB_PORT = 8099  # the Home Assistant add-on's ingress port
JOB_LOG = "job.log"
JOB_LOG_MAX_BYTES = 5 << 20
STOP_GRACE_S = 5.0
# A missed night starts this long after the server is ready (Home Assistant reconnects first).
CATCH_UP_DELAY_S = 10.0


def parse_adapt_at(value: str) -> dtime | None:
    """`HH:MM` (24 h, local time) or `off`."""
    if value.strip().lower() in ("off", "none", "no", ""):
        return None
    try:
        hours, minutes = (int(part) for part in value.strip().split(":"))
        return dtime(hours, minutes)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HH:MM (local time) or off, got {value!r}") from err


def parse_port(value: str) -> int | None:
    """A TCP port, 0 (any free port) or `off`."""
    if value.strip().lower() in ("off", "none", "no"):
        return None
    try:
        port = int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a port number or off, got {value!r}") from err
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range")
    return port


def add_adaptation_args(parser: argparse.ArgumentParser) -> None:
    """`serve` flags for the nightly adaptation and the web API."""
    parser.add_argument(
        "--adapt-at", type=parse_adapt_at, default=DEFAULT_ADAPT_AT, metavar="HH:MM|off",
        help=f"local time of the nightly adaptation (default {DEFAULT_ADAPT_AT}; off: never)",
    )  # fmt: skip
    parser.add_argument("--adapt-budget-minutes", type=float, default=10.0, help="time budget of a run")
    parser.add_argument("--adapt-min-new", type=int, default=20, help="new labels needed for a nightly run")
    parser.add_argument("--adapt-threads", type=int, default=0, help="torch threads of the job (0: all)")
    parser.add_argument("--adapt-args", default="", help="more `adapt` flags for the job (one string)")
    parser.add_argument(
        "--web-port", type=parse_port, default=DEFAULT_WEB_PORT, metavar="PORT|off",
        help=f"HTTP API port (default {DEFAULT_WEB_PORT}; 0: any free port; off: no API)",
    )  # fmt: skip
    parser.add_argument(
        "--web-host", default="127.0.0.1", help="HTTP API address (default: this machine only)"
    )
    parser.add_argument("--web-token", help="API token (default: generated once into DATA_DIR/web-token)")


def next_run(now: datetime, at: dtime) -> datetime:
    """The next local `at` strictly after `now` (naive local times)."""
    target = datetime.combine(now.date(), at)
    return target if target > now else datetime.combine(now.date() + timedelta(days=1), at)


def missed_night(conn: sqlite3.Connection, now: datetime, at: dtime) -> datetime | None:
    """The last nightly time before `now` if no run has started since it while the log is older than it
    (the server was not running then, or could not start the job); None otherwise. Runs the store's
    thread (`conn`: the interaction log)."""
    last = datetime.combine(next_run(now, at).date() - timedelta(days=1), at)
    (since,) = conn.execute(
        "SELECT COALESCE((SELECT MAX(started_at) FROM adaptations), "
        "(SELECT MIN(created_at) FROM interactions))"
    ).fetchone()
    return last if since is not None and datetime.fromtimestamp(since) < last else None


def page_link(host: str, port: int, token: str) -> str:
    """The link that opens the household's page logged in (its `?token=` becomes a cookie)."""
    if host in ("", "0.0.0.0", "::"):
        host = advertised_address(host) or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/?token={quote(token)}"


def with_model_version(info: Event, version: str) -> Event:
    """`info` with every program's model `version` replaced."""
    parsed = Info.from_event(info)
    for program in [*parsed.asr, *parsed.intent, *parsed.handle]:
        for model in program.models:
            model.version = version
    return parsed.event()


class Nightly:
    """The served projector version, the adaptation job and the web API of one server."""

    def __init__(
        self,
        *,
        args: argparse.Namespace,
        choice: ModelChoice,
        worker: InferenceWorker,
        base_version: str | None,
    ) -> None:
        self.data_dir = Path(args.data_dir)
        self.choice = choice
        self.bundle_cfg: BundleConfig = load_bundle_config(choice.folder)
        self.worker = worker
        self.base_version = base_version
        self.versions = Versions(self.data_dir)
        self.adapt_at: dtime | None = args.adapt_at
        self.web_port: int | None = args.web_port
        self.web_host: str = args.web_host
        self.web_token: str | None = args.web_token
        self.job_args = [
            "--budget-minutes", str(args.adapt_budget_minutes), "--min-new", str(args.adapt_min_new),
            "--threads", str(args.adapt_threads), "--device", args.device, "--dtype", args.dtype,
            *shlex.split(args.adapt_args),
        ]  # fmt: skip
        self.served_name = BASE
        self.version = base_version
        self.adapted = False  # the served version has Whisper decoder adapters (it serves the cascade too)
        self.app: Any = None
        self.metrics = Metrics()
        self._refused: str | None = None
        self._catch_up_at: datetime | None = None  # a missed night waits to start (`_timer`)
        self._job: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._starting = asyncio.Lock()  # one job start at a time
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------------------ start-up (no loop)
    @classmethod
    def setup(
        cls, args: argparse.Namespace, choice: ModelChoice, worker: InferenceWorker, base_version: str | None
    ) -> Nightly:
        """Record the bundle for the job and serve the promoted version, if any (before serving)."""
        nightly = cls(args=args, choice=choice, worker=worker, base_version=base_version)
        try:
            record_model(nightly.data_dir, choice.folder, choice.name)
        except OSError as err:  # a full disk: serve anyway; a night would use the bundle recorded before
            _LOGGER.error("cannot record the served bundle for the nightly job: %s", err)
        try:
            name = nightly.versions.current()
            if name != BASE:
                projector, info, adapter = nightly._load(name)
                worker.replace_projector(projector, info, adapter)
                nightly.served_name, nightly.version = name, name
                nightly.adapted = adapter is not None
                _LOGGER.info(
                    "serving household version %s (path %s%s)",
                    name, worker.path, ", with Whisper decoder adapters" if adapter else "",
                )  # fmt: skip
        except (VersionError, BundleError, ValueError) as err:
            _LOGGER.error("projector version refused, serving the bundle's own projector: %s", err)
        return nightly

    def _load(self, name: str) -> tuple[Projector | None, ProjectorInfo | None, ShapedAdapter | None]:
        """A version (or `base`: the bundle's projector, no decoder adapters), checked against the
        served bundle."""
        model = self.worker.model
        adapter = None
        if name == BASE:
            if not self.bundle_cfg.projector:
                return None, None, None
            projector, info = load_projector(self.choice.folder / self.bundle_cfg.projector, "cpu")
        else:
            projector, info = self.versions.load(name)
            adapter = self.versions.adapter(name)
        check_fits(info, self.bundle_cfg, model.encoder.dim, model.llm.config.hidden_size)
        return projector.to(model.device), info, adapter

    # --------------------------------------------------------------------------------- serving life
    @property
    def model_name(self) -> str:
        return self.choice.name

    @property
    def demo(self) -> bool:
        """The offline demo model answers (it knows synthetic speech only)."""
        return self.choice.demo

    @property
    def path(self) -> str:
        return self.worker.path

    @property
    def requested_path(self) -> str:
        return self.worker.requested_path

    @property
    def next_run_at(self) -> datetime | None:
        """When the nightly timer starts the next run: a missed night's, or the next `--adapt-at` (None:
        `--adapt-at off`)."""
        if self._catch_up_at is not None:
            return self._catch_up_at
        return next_run(datetime.now(), self.adapt_at) if self.adapt_at is not None else None

    @property
    def job_running(self) -> bool:
        return self._job is not None and self._job.returncode is None

    async def start(self, app: Any) -> None:
        """Called once the server listens: hot-swap watcher, nightly timer, web API."""
        self.app = app
        app.assistant.observers.append(self.metrics.observe)
        self._spawn(self._watch())
        if self.adapt_at is not None:
            self._spawn(self._timer())
        if self.web_port is not None:
            await self._start_web(app)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.job_running:
            assert self._job is not None
            _LOGGER.info("stopping the adaptation job (safe at any moment: it is atomic)")
            with suppress(ProcessLookupError):
                os.killpg(self._job.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._job.wait(), STOP_GRACE_S)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    os.killpg(self._job.pid, signal.SIGKILL)
                await self._job.wait()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_GRACE_S)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_web(self, app: Any) -> None:
        ctx = WebContext(
            control=self,
            store=app.assistant.store,
            metrics=self.metrics,
            token=load_token(self.data_dir, self.web_token),
            log_off=app.log_off,
        )
        runner = web.AppRunner(build_app(ctx), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.web_host, self.web_port)
        try:
            await site.start()
        except OSError as err:  # the voice assistant matters more than its API: keep serving
            _LOGGER.error(
                "web: cannot listen on %s:%s (%s); the HTTP API is off", self.web_host, self.web_port, err
            )
            await runner.cleanup()
            return
        self._runner = runner
        host, port = runner.addresses[0][:2]
        where = (
            "the token from --web-token" if self.web_token else f"the token in {self.data_dir / 'web-token'}"
        )
        _LOGGER.info("web: serving the HTTP API on http://%s:%d (%s)", host, port, where)
        _LOGGER.info("web: the household's page: %s", page_link(self.web_host, port, ctx.token))

    # ------------------------------------------------------------------------------------- hot-swap
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.sync()
            except Exception:  # keep watching whatever happens
                _LOGGER.exception("projector watch failed")

    async def sync(self) -> str:
        """Serve what the pointer names, if it is not served yet; returns the served name."""
        async with self._lock:
            try:
                name = await asyncio.to_thread(self.versions.current)
            except VersionError as err:
                if self._refused != str(err):
                    _LOGGER.error("%s; still serving %s", err, self.served_name)
                    self._refused = str(err)
                return self.served_name
            if name in (self.served_name, self._refused):
                return self.served_name
            try:
                projector, info, adapter = await asyncio.to_thread(self._load, name)
                path = await self.worker.swap_projector(projector, info, adapter)
            except (VersionError, BundleError, ValueError, OSError) as err:
                _LOGGER.error("projector %s refused: %s; still serving %s", name, err, self.served_name)
                self._refused = name
                return self.served_name
            # No await from here on: an answer that reaches the event loop after the swap came from a
            # request run after it (one FIFO inference thread), so it is logged with the new version.
            self._refused = None
            self.served_name = name
            self.version = self.base_version if name == BASE else name
            self.adapted = adapter is not None
            if self.app is not None:
                self.app.assistant.projector_version = self.version
                self.app.assistant.cascade_version = self.version if self.adapted else None
                self.app.set_info(with_model_version(self.app.info, self.version or ""))
            _LOGGER.info("projector %s now serving (path %s), without a restart", self.version, path)
            return name

    async def rollback(self, to: str | None) -> str:
        """Point at `to` (default: the version before) and serve it before answering."""
        await asyncio.to_thread(self.versions.rollback, to)
        return await self.sync()

    # ------------------------------------------------------------------------------------ the job
    async def _timer(self) -> None:
        assert self.adapt_at is not None
        at = self.adapt_at.strftime("%H:%M")
        if (missed := await self._missed_night()) is None:
            _LOGGER.info(
                "nightly adaptation at %s local time: the next run is at %s", at,
                f"{next_run(datetime.now(), self.adapt_at):%Y-%m-%d %H:%M}",
            )  # fmt: skip
        else:
            _LOGGER.info(
                "nightly adaptation at %s local time: the run of %s was missed (none has started since); "
                "starting it in %.0f s", at, missed.strftime("%Y-%m-%d %H:%M"), CATCH_UP_DELAY_S,
            )  # fmt: skip
            self._catch_up_at = datetime.now() + timedelta(seconds=CATCH_UP_DELAY_S)
            await asyncio.sleep(CATCH_UP_DELAY_S)
            self._catch_up_at = None
            await self._start_nightly()
        while True:
            target = next_run(datetime.now(), self.adapt_at)
            while (left := (target - datetime.now()).total_seconds()) > 0:
                await asyncio.sleep(min(left, 60.0))  # re-read the clock: suspend, DST, clock changes
            await self._start_nightly()

    async def _missed_night(self) -> datetime | None:
        """`missed_night` on the interaction log (None without a log, or one that cannot be read)."""
        assert self.adapt_at is not None
        store = self.app.assistant.store if self.app is not None else None
        if store is None:
            return None
        try:
            return await store.async_call(missed_night, store.conn, datetime.now(), self.adapt_at)
        except (StoreError, sqlite3.Error) as err:
            _LOGGER.warning("cannot tell whether a nightly run was missed: %s", err)
            return None

    async def _start_nightly(self) -> None:
        """Start the night's job (`--now` not given: unchanged or too few new labels skip it)."""
        try:
            if not await self.start_job(now=False):
                _LOGGER.info("nightly adaptation: one is already running")
        except OSError as err:  # a full disk: tonight is skipped, the timer and the server go on
            _LOGGER.error("nightly adaptation not started: %s", err)

    async def start_job(self, now: bool = True) -> bool:
        """Start `wyoming-tinyalign adapt` as a child process; False if one is running. An `OSError`
        (its log or the household context cannot be written: a full disk) starts nothing."""
        async with self._starting:
            if self.job_running:
                return False
            cmd = [
                sys.executable, "-m", "wyoming_tinyalign", "adapt", "--data-dir", str(self.data_dir),
                "--model", str(self.choice.folder), *self.job_args, *(["--now"] if now else []),
            ]  # fmt: skip
            context = self.app.assistant.household() if self.app is not None else None
            log = await asyncio.to_thread(self._open_job_log, cmd, context)
            with log:
                self._job = await asyncio.create_subprocess_exec(
                    *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
                )
        _LOGGER.info(
            "adaptation job started (pid %d%s); its log: %s", self._job.pid, ", now" if now else "", log.name
        )
        self._spawn(self._wait_job(self._job))
        return True

    def _open_job_log(self, cmd: list[str], context: str | None) -> BinaryIO:
        """The job's log (rotated past `JOB_LOG_MAX_BYTES`) opened for appending, with the command on top;
        first the household context the server uses right now, for the job to read."""
        work = self.data_dir / ADAPT_DIR
        work.mkdir(parents=True, exist_ok=True)
        if context is not None:
            write_atomic(work / CONTEXT_FILE, context.encode("utf-8"))
        log_path = work / JOB_LOG
        if log_path.is_file() and log_path.stat().st_size > JOB_LOG_MAX_BYTES:
            log_path.replace(work / f"{JOB_LOG}.1")
        log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - the caller closes it once the child has it
        try:
            log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} {shlex.join(cmd)}\n".encode())
        except OSError as err:
            log.close()
            raise naming(err, log_path) from err
        return log

    async def _wait_job(self, job: asyncio.subprocess.Process) -> None:
        code = await job.wait()
        _LOGGER.info("adaptation job finished (exit %d)", code)
        store = self.app.assistant.store if self.app is not None else None
        if code < 0 and store is not None:  # killed: it could record nothing, nor clean up
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            reason = f"killed ({name}{': out of memory?' if -code == signal.SIGKILL else ''})"
            _LOGGER.error("the adaptation job was %s", reason)
            try:
                await store.async_call(clean_up_killed_run, self.data_dir, store.conn, reason)
            except (OSError, sqlite3.Error) as err:  # the next run records it as interrupted
                _LOGGER.error("could not record the killed adaptation job: %s", err)
        await self.sync()  # a promoted version goes live at once
