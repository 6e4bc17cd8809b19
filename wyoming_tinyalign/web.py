"""The server's HTTP side (aiohttp, `--web-port`, 127.0.0.1 unless `--web-host` says otherwise).

    GET    /, /interactions, /learning           the household's page (`webui/`: server-rendered HTML)
    GET    /healthz                              liveness, served projector version and path
    GET    /metrics                              Prometheus text: requests, latency, adaptations, version
    GET    /api/interactions                     paged (page, per_page), filters: since, until (ISO date or
                                                 time, local; or unix seconds), labelled=true|false, kind,
                                                 corrected=true|false, failed=true|false (not recognized,
                                                 or Home Assistant reported a failure), withheld=true|false
                                                 (an intent heard too unsure to act on)
    GET    /api/interactions/{id}                one interaction
    GET    /api/interactions/{id}/audio          its audio (WAV), found by id only
    PUT    /api/interactions/{id}/correction     {"text": ..., "intent": {"name": ..., "slots": {...}}}
    DELETE /api/interactions/{id}/correction
    DELETE /api/interactions/{id}                the row, its audio file and its cached encoder features
    DELETE /api/interactions                     all of them (or those matching since/until)
    GET    /api/adaptations                      adaptation runs with their reports
    GET    /api/versions                         versions (rejected candidates too), metrics, `auto`'s path
    POST   /api/adapt                            run the adaptation now (202; 409 while one runs)
    POST   /api/rollback                         {"to": "v0002"}: serve it, a rejected one too (default:
                                                 the promoted version before the served one)

Everything under `/api/` needs the token (`Authorization: Bearer <token>` or a `token` cookie; with the
cookie, a cross-site `Origin` is refused): the log holds the household's voices. Requests through Home
Assistant ingress (an `X-Ingress-Path` header from 172.30.32.2, the supervisor's proxy) need none. A
change (POST, PUT, DELETE) made with the cookie or through ingress must also carry an
`X-Requested-With` header, which a cross-site form cannot send (the page's script does). The page
itself asks for the token with a login form, or takes it once from `?token=...` and sets the cookie.
`/healthz` and `/metrics` are open. The token is `--web-token`, else the one generated once into
`DATA_DIR/web-token` (mode 0600). Extend the app by adding routes in `build_app`; the auth middleware
covers every `/api/` route. A file or the log that cannot be read or written (a full disk) answers 500
with the reason (JSON `{"error": ...}` under `/api/`). Until the server is ready, the port serves the
start-up page instead (`starting.py`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from .labels import FAILED_OUTCOMES, parse_correction, validate_correction
from .store import InteractionStore
from .versions import VersionError, Versions
from .words import counted

_LOGGER = logging.getLogger(__name__)

TOKEN_FILE = "web-token"
INGRESS_PEER = "172.30.32.2"
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_PER_PAGE = 500
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_HEADER = "X-Requested-With"


class Control(Protocol):
    """What the API asks of the server's adaptation side (`scheduler.Nightly`)."""

    data_dir: Path
    served_name: str
    version: str | None
    adapted: bool  # the served version has Whisper decoder adapters

    @property
    def model_name(self) -> str: ...

    @property
    def demo(self) -> bool: ...  # the offline demo model answers (it knows synthetic speech only)

    @property
    def path(self) -> str: ...

    @property
    def requested_path(self) -> str: ...

    @property
    def next_run_at(self) -> datetime | None: ...

    @property
    def job_running(self) -> bool: ...

    async def start_job(self, now: bool = True) -> bool: ...

    async def rollback(self, to: str | None) -> str: ...


# ---------------------------------------------------------------------------------------------- metrics
@dataclass
class Metrics:
    """Request counters and a latency histogram, written in Prometheus' text format by hand."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    answers: dict[tuple[str, str], int] = field(default_factory=dict)
    buckets: dict[str, list[int]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def observe(self, kind: str, path: str, latency_ms: float, answer: str) -> None:
        self.requests[(kind, path)] = self.requests.get((kind, path), 0) + 1
        self.answers[(kind, answer)] = self.answers.get((kind, answer), 0) + 1
        seconds = latency_ms / 1000
        row = self.buckets.setdefault(kind, [0] * len(LATENCY_BUCKETS_S))
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                row[i] += 1
        self.sums[kind] = self.sums.get(kind, 0.0) + seconds
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def render(self, control: Control, runs: dict[str, int]) -> str:
        lines = [
            "# HELP tinyalign_requests_total Requests answered, by kind (audio/text) and model path.",
            "# TYPE tinyalign_requests_total counter",
        ]
        for (kind, path), n in sorted(self.requests.items()):
            lines.append(f'tinyalign_requests_total{{kind="{kind}",path="{path}"}} {n}')
        lines += [
            "# HELP tinyalign_answers_total Answers by kind and what they were: an intent, one withheld as "
            "unsure (--min-confidence), or none.",
            "# TYPE tinyalign_answers_total counter",
        ]
        for (kind, answer), n in sorted(self.answers.items()):
            lines.append(f'tinyalign_answers_total{{kind="{kind}",answer="{answer}"}} {n}')
        lines += [
            "# HELP tinyalign_request_latency_seconds End of speech (or text) to result, queueing included.",
            "# TYPE tinyalign_request_latency_seconds histogram",
        ]
        for kind in sorted(self.counts):
            for bound, n in zip(LATENCY_BUCKETS_S, self.buckets[kind], strict=True):
                lines.append(f'tinyalign_request_latency_seconds_bucket{{kind="{kind}",le="{bound}"}} {n}')
            lines.append(
                f'tinyalign_request_latency_seconds_bucket{{kind="{kind}",le="+Inf"}} {self.counts[kind]}'
            )
            lines.append(f'tinyalign_request_latency_seconds_sum{{kind="{kind}"}} {self.sums[kind]:.6f}')
            lines.append(f'tinyalign_request_latency_seconds_count{{kind="{kind}"}} {self.counts[kind]}')
        lines += [
            "# HELP tinyalign_adaptation_runs_total Nightly adaptation runs, by outcome.",
            "# TYPE tinyalign_adaptation_runs_total counter",
        ]
        for status in ("promoted", "rejected", "skipped", "failed", "running"):
            lines.append(f'tinyalign_adaptation_runs_total{{status="{status}"}} {runs.get(status, 0)}')
        number = int(control.served_name[1:]) if control.served_name.startswith("v") else 0
        lines += [
            "# HELP tinyalign_adaptation_running 1 while an adaptation job runs.",
            "# TYPE tinyalign_adaptation_running gauge",
            f"tinyalign_adaptation_running {int(control.job_running)}",
            "# HELP tinyalign_projector_version Number of the served projector version (0: the bundle's).",
            "# TYPE tinyalign_projector_version gauge",
            f"tinyalign_projector_version {number}",
            "# HELP tinyalign_projector_info The served projector version and model path.",
            "# TYPE tinyalign_projector_info gauge",
            f'tinyalign_projector_info{{version="{control.version or "none"}",path="{control.path}"}} 1',
        ]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ token
def load_token(data_dir: Path, given: str | None) -> str:
    """`--web-token`, else the token stored in `DATA_DIR/web-token` (generated once, mode 0600)."""
    if given:
        return given
    path = Path(data_dir) / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        os.replace(tmp, path)
    except OSError as err:  # a full disk: this run's token is not kept
        tmp.unlink(missing_ok=True)
        _LOGGER.warning(
            "cannot store the web token in %s (%s): it changes at every start until it can", path, err
        )
    return token


# ---------------------------------------------------------------------------------------------- the app
CONTEXT = web.AppKey("tinyalign", object)


@dataclass
class WebContext:
    control: Control
    store: InteractionStore | None
    metrics: Metrics
    token: str
    log_off: str = ""  # why the interaction log is off: "--no-log", or why it cannot be used


def build_app(ctx: WebContext) -> web.Application:
    """The aiohttp application: the JSON API and the household's page (`webui`)."""
    from .webui import page_routes

    app = web.Application(middlewares=[_storage_errors, _auth], client_max_size=64 * 1024)
    app[CONTEXT] = ctx
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/api/interactions", list_interactions),
            web.delete("/api/interactions", delete_interactions),
            web.get("/api/interactions/{id:\\d+}", get_interaction),
            web.delete("/api/interactions/{id:\\d+}", delete_interaction),
            web.get("/api/interactions/{id:\\d+}/audio", get_audio),
            web.put("/api/interactions/{id:\\d+}/correction", put_correction),
            web.delete("/api/interactions/{id:\\d+}/correction", delete_correction),
            web.get("/api/adaptations", list_adaptations),
            web.get("/api/versions", list_versions),
            web.post("/api/adapt", post_adapt),
            web.post("/api/rollback", post_rollback),
            *page_routes(),
        ]
    )
    return app


def web_context(request: web.Request) -> WebContext:
    """What the app was built with."""
    return request.app[CONTEXT]  # type: ignore[return-value]


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def same_token(given: str, token: str) -> bool:
    """Constant-time comparison of a token given by a client with the server's."""
    return hmac.compare_digest(given.encode(), token.encode())


def bearer(request: web.Request, token: str) -> bool:
    """An `Authorization: Bearer` header with the token (scripts; a browser never adds it by itself)."""
    header = request.headers.get("Authorization", "")
    return header.startswith("Bearer ") and same_token(header[7:].strip(), token)


def ingress(request: web.Request) -> bool:
    """A request through Home Assistant ingress: the header, from the supervisor's proxy only."""
    return bool(request.headers.get("X-Ingress-Path")) and request.remote == INGRESS_PEER


def same_origin(request: web.Request) -> bool:
    """No `Origin` header, or one naming this server."""
    origin = request.headers.get("Origin")
    return not origin or urlsplit(origin).netloc == request.host


def authorized(request: web.Request, token: str) -> bool:
    """Bearer header, or `token` cookie (same-origin for changes), or Home Assistant ingress."""
    if ingress(request) or bearer(request, token):
        return True
    cookie = request.cookies.get("token")
    if cookie and same_token(cookie, token):
        return request.method not in UNSAFE or same_origin(request)
    return False


@web.middleware
async def _auth(request: web.Request, handler: Callable) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        token = web_context(request).token
        if not authorized(request, token):
            return _error(
                401, "this needs the API token: 'Authorization: Bearer <token>' (see DATA_DIR/web-token)"
            )
        if request.method in UNSAFE and not bearer(request, token) and not request.headers.get(CSRF_HEADER):
            return _error(403, f"a change from a browser must carry an {CSRF_HEADER} header (cross-site?)")
    return await handler(request)


@web.middleware
async def _storage_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """A file or the log that cannot be read or written (a full disk) answers 500 with the reason."""
    try:
        return await handler(request)
    except ConnectionError:
        raise  # the client left: nobody to answer
    except (OSError, sqlite3.Error) as err:
        _LOGGER.exception("%s %s failed", request.method, request.path)
        text = f"the server could not do this: {err}"
        return _error(500, text) if request.path.startswith("/api/") else web.Response(status=500, text=text)


# ------------------------------------------------------------------------------------------ health, metrics
async def healthz(request: web.Request) -> web.Response:
    ctx = web_context(request)
    return web.json_response(
        {
            "status": "ok",
            "projector_version": ctx.control.version,
            "served": ctx.control.served_name,
            "path": ctx.control.path,
            "adaptation_running": ctx.control.job_running,
            "log": ctx.store is not None,
            "log_off": ctx.log_off or None,
            "log_error": ctx.store.write_error if ctx.store is not None else None,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    ctx = web_context(request)
    runs: dict[str, int] = {}
    if ctx.store is not None:
        rows = await ctx.store.async_call(
            lambda: ctx.store.conn.execute(
                "SELECT status, COUNT(*) FROM adaptations GROUP BY status"
            ).fetchall()
        )
        runs = {status: n for status, n in rows}
    text = ctx.metrics.render(ctx.control, runs)
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Version": "0.0.4"})


# ---------------------------------------------------------------------------------------- interactions
def log_store(request: web.Request) -> InteractionStore:
    """The interaction log, or a 409 answer when logging is off."""
    ctx = web_context(request)
    if ctx.store is None:
        raise web.HTTPConflict(
            text=json.dumps({"error": f"interaction logging is off ({ctx.log_off})"}),
            content_type="application/json",
        )
    return ctx.store


def _time_bound(value: str, end: bool) -> float:
    """A filter bound: unix seconds, or an ISO date (a whole local day) or date-time (local if naive)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        if len(value) == 10:
            day = datetime.fromisoformat(value)
            return day.timestamp() + (86400 if end else 0)
        return datetime.fromisoformat(value).timestamp()
    except ValueError as err:
        raise web.HTTPBadRequest(
            text=json.dumps(
                {"error": f"bad time {value!r}: use YYYY-MM-DD, an ISO date-time or unix seconds"}
            ),
            content_type="application/json",
        ) from err


def interaction_filters(query: Any) -> tuple[str, list[Any]]:
    """The SQL condition (and its arguments) of the interaction filters in a query string."""
    where, args = ["1"], []
    if "since" in query:
        where.append("created_at >= ?")
        args.append(_time_bound(query["since"], end=False))
    if "until" in query:
        where.append("created_at < ?")
        args.append(_time_bound(query["until"], end=True))
    if "labelled" in query:
        labelled = "(correction IS NOT NULL OR label_source IS NOT NULL)"
        where.append(labelled if _flag(query["labelled"]) else f"NOT {labelled}")
    if "kind" in query:
        where.append("kind = ?")
        args.append(query["kind"])
    if "corrected" in query:
        where.append("correction IS NOT NULL" if _flag(query["corrected"]) else "correction IS NULL")
    if "withheld" in query:
        where.append("withheld IS NOT NULL" if _flag(query["withheld"]) else "withheld IS NULL")
    if "failed" in query:
        marks = ",".join("?" * len(FAILED_OUTCOMES))
        failed = f"(intent IS NULL OR COALESCE(lower(trim(ha_outcome)), '') IN ({marks}))"
        where.append(failed if _flag(query["failed"]) else f"NOT {failed}")
        args.extend(sorted(FAILED_OUTCOMES))
    return " AND ".join(where), args


def _flag(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def row_json(row: sqlite3.Row) -> dict[str, Any]:
    """One interaction as the API shows it."""

    def loads(raw: str | None) -> Any:
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    return {
        "id": row["id"],
        "created_at": row["created_at"],
        "time": datetime.fromtimestamp(row["created_at"]).astimezone().isoformat(timespec="seconds"),
        "kind": row["kind"],
        "client": row["client"],
        "satellite_id": row["satellite_id"],
        "device_id": row["device_id"],
        "conversation_id": row["conversation_id"],
        "context": loads(row["context"]),
        "language": row["language"],
        "duration_s": row["duration_s"],
        "path": row["path"],
        "transcript": row["transcript"],
        "intent": loads(row["intent"]),
        "withheld": loads(row["withheld"]),
        "confidence": row["confidence"],
        "latency_ms": row["latency_ms"],
        "projector_version": row["projector_version"],
        "audio": f"/api/interactions/{row['id']}/audio" if row["audio_path"] else None,
        "correction": parse_correction(row["correction"]),
        "teacher": (
            {"text": row["teacher_transcript"], "confidence": row["teacher_confidence"]}
            if row["teacher_transcript"] is not None
            else None
        ),
        "ha_outcome": row["ha_outcome"],
        "label_source": row["label_source"],
        "labelled_at": row["labelled_at"],
    }


def select_rows(store: InteractionStore, sql: str, args: list[Any]) -> list[sqlite3.Row]:
    """Rows with named columns (call it on the store's thread)."""
    cursor = store.conn.cursor()
    cursor.row_factory = sqlite3.Row
    return cursor.execute(sql, args).fetchall()


def count_interactions(store: InteractionStore, where: str, args: list[Any]) -> int:
    """How many interactions match an `interaction_filters` condition (store's thread)."""
    return store.conn.execute(f"SELECT COUNT(*) FROM interactions WHERE {where}", args).fetchone()[0]


def interaction_page(
    store: InteractionStore, where: str, args: list[Any], page: int, per_page: int
) -> list[dict[str, Any]]:
    """One page of matching interactions, newest first, as the API shows them (store's thread)."""
    rows = select_rows(
        store,
        f"SELECT * FROM interactions WHERE {where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
        [*args, per_page, (page - 1) * per_page],
    )
    return [row_json(r) for r in rows]


async def list_interactions(request: web.Request) -> web.Response:
    store = log_store(request)
    try:
        page = max(1, int(request.query.get("page", "1")))
        per_page = min(MAX_PER_PAGE, max(1, int(request.query.get("per_page", "50"))))
    except ValueError:
        return _error(400, "page and per_page must be whole numbers")
    where, args = interaction_filters(request.query)

    def query() -> tuple[int, list[dict[str, Any]]]:
        return count_interactions(store, where, args), interaction_page(store, where, args, page, per_page)

    total, items = await store.async_call(query)
    return web.json_response({"items": items, "page": page, "per_page": per_page, "total": total})


async def _one(store: InteractionStore, row_id: int) -> sqlite3.Row | None:
    rows = await store.async_call(select_rows, store, "SELECT * FROM interactions WHERE id = ?", [row_id])
    return rows[0] if rows else None


async def get_interaction(request: web.Request) -> web.Response:
    store = log_store(request)
    row = await _one(store, int(request.match_info["id"]))
    return web.json_response(row_json(row)) if row is not None else _error(404, "no such interaction")


async def get_audio(request: web.Request) -> web.StreamResponse:
    store = log_store(request)
    row = await _one(store, int(request.match_info["id"]))
    if row is None or not row["audio_path"]:
        return _error(404, "no audio for this interaction")
    root = store.folder.resolve()
    path = (root / row["audio_path"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():  # only files of the log, found by id
        return _error(404, "the audio file is gone")
    return web.FileResponse(path, headers={"Content-Type": "audio/wav", "Cache-Control": "no-store"})


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        return None
    try:
        return await request.json()
    except ValueError as err:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"the body is not JSON: {err}"}), content_type="application/json"
        ) from err


async def put_correction(request: web.Request) -> web.Response:
    store = log_store(request)
    row_id = int(request.match_info["id"])
    try:
        correction = validate_correction(await _json_body(request))
    except ValueError as err:
        return _error(400, str(err))
    if not await store.async_call(store.correct, row_id, correction):
        return _error(404, "no such interaction")
    row = await _one(store, row_id)
    assert row is not None
    return web.json_response(row_json(row))


async def delete_correction(request: web.Request) -> web.Response:
    store = log_store(request)
    if not await store.async_call(store.correct, int(request.match_info["id"]), None):
        return _error(404, "no such interaction")
    return web.Response(status=204)


async def _delete(request: web.Request, where: str, args: list[Any]) -> int:
    """Delete the interactions that match, with their audio and what the nights derived from it."""
    store = log_store(request)
    rows = await store.async_call(select_rows, store, f"SELECT id FROM interactions WHERE {where}", args)
    return await store.async_call(store.delete, [r["id"] for r in rows])


async def delete_interaction(request: web.Request) -> web.Response:
    deleted = await _delete(request, "id = ?", [int(request.match_info["id"])])
    return web.Response(status=204) if deleted else _error(404, "no such interaction")


async def delete_interactions(request: web.Request) -> web.Response:
    where, args = interaction_filters(request.query)
    deleted = await _delete(request, where, args)
    _LOGGER.info("web: deleted %s with their audio", counted(deleted, "interaction"))
    if where == "1":  # all of them: damaged logs set aside too (they hold recordings)
        store = log_store(request)
        if removed := await store.async_call(store.remove_set_aside):
            _LOGGER.info("web: deleted %s set aside", counted(removed, "damaged log"))
    return web.json_response({"deleted": deleted})


# ------------------------------------------------------------------------------------------- adaptation
async def list_adaptations(request: web.Request) -> web.Response:
    ctx = web_context(request)
    try:
        limit = min(500, max(1, int(request.query.get("limit", "20"))))
    except ValueError:
        return _error(400, "limit must be a whole number")
    items = await ctx.store.async_call(adaptation_runs, ctx.store, limit) if ctx.store is not None else []
    return web.json_response({"items": items, "running": ctx.control.job_running})


def adaptation_runs(store: InteractionStore, limit: int) -> list[dict[str, Any]]:
    """Adaptation runs, newest first, each with its report parsed (call it on the store's thread)."""
    rows = select_rows(store, "SELECT * FROM adaptations ORDER BY started_at DESC, id DESC LIMIT ?", [limit])
    items = []
    for row in rows:
        item = {k: row[k] for k in row.keys() if k != "report"}  # noqa: SIM118 (a Row)
        try:
            item["report"] = json.loads(row["report"]) if row["report"] else None
        except ValueError:
            item["report"] = None
        items.append(item)
    return items


async def list_versions(request: web.Request) -> web.Response:
    ctx = web_context(request)
    listing = await asyncio.to_thread(Versions(ctx.control.data_dir).describe)
    return web.json_response({**listing, "served": ctx.control.served_name, "version": ctx.control.version})


async def post_adapt(request: web.Request) -> web.Response:
    ctx = web_context(request)
    if not await ctx.control.start_job(now=True):
        return _error(409, "an adaptation is already running")
    return web.json_response({"started": True, "at": time.time()}, status=202)


async def post_rollback(request: web.Request) -> web.Response:
    ctx = web_context(request)
    body = await _json_body(request)
    to = None
    if body is not None:
        if not isinstance(body, dict) or set(body) - {"to"} or not isinstance(body.get("to", ""), str | None):
            return _error(400, 'expected {"to": "v0002"} (or no body: the version before)')
        to = body.get("to")
    try:
        served = await ctx.control.rollback(to)
    except VersionError as err:
        return _error(400, str(err))
    return web.json_response({"served": served, "version": ctx.control.version})
