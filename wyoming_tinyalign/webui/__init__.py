"""The household's page: what the assistant heard (listen, correct, delete) and how it learns.

Served by the same aiohttp app as the JSON API (`web.py`) as server-rendered HTML, with one small script
(`app.js`: the buttons, the correction form, the keys) and one style sheet (`style.css`), both shipped in
this package; charts are inline SVG drawn here (`charts.py`). Every URL in the page is relative, so it
works at the server's root and under Home Assistant ingress (`/api/hassio_ingress/<token>/`) alike.

    GET  /                  dashboard: model and served version, path, today's requests and latency, the next
                            nightly run, health (model, log, disk, logging)
    GET  /interactions      the log, newest first, paged; filter=unlabelled|corrected|failed; audio,
                            inline corrections (intent names and slots from `intents.INTENT_SLOTS`), deletes
    GET  /learning          adaptation runs, accuracy over the nights, the last run's loss curve, versions;
                            run now, roll back
    POST /login, /logout    the token form (outside ingress); sets or clears the `token` cookie
    GET  /static/{name}     app.js, style.css

Outside ingress a page needs the token: the login form, or `?token=...` once (Jupyter-style; the server
logs such a link at start), which sets an HttpOnly, SameSite=Strict cookie and redirects to the same page
without it. Changes go through the JSON API with the `X-Requested-With` header that `web.py` requires of
browsers, so a cross-site form cannot make them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from datetime import time as dtime
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import numpy as np
from aiohttp import web

from ..intents import INTENT_SLOTS, Intent
from ..store import MIN_FREE_BYTES, NO_LOG, InteractionStore
from ..versions import BASE, VersionError, Versions
from ..web import (
    adaptation_runs,
    authorized,
    count_interactions,
    ingress,
    interaction_filters,
    interaction_page,
    same_origin,
    same_token,
    web_context,
)
from ..words import counted
from .charts import Series, line_chart

PER_PAGE = 25
DEMO_NOTE = (
    '<div class="small warn">The demo model: it knows synthetic speech only, not your voices. Choose a real '
    "model for use (the add-on's <i>model</i> option, or <code>--model preset:...</code>).</div>"
)
RUNS_SHOWN = 30
COOKIE_MAX_AGE = 30 * 86400
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
PAGES = {"": "Dashboard", "interactions": "Interactions", "learning": "Learning"}
FILTERS: dict[str, dict[str, str]] = {
    "all": {},
    "unlabelled": {"labelled": "false", "kind": "audio"},  # only utterances can teach the projector
    "corrected": {"corrected": "true"},
    "failed": {"failed": "true"},
    "unsure": {"withheld": "true"},  # heard, but not acted on: "Heard right" confirms the intent
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; media-src 'self'; frame-ancestors 'self'; "
        "form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "SAMEORIGIN",  # Home Assistant's iframe is same-origin (ingress)
    "Referrer-Policy": "same-origin",  # "no-referrer" would make form posts send "Origin: null"
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def page_routes() -> list[web.RouteDef]:
    """The page's routes, for `web.build_app`."""
    return [
        web.get("/", _page(dashboard)),
        web.get("/interactions", _page(interactions)),
        web.get("/learning", _page(learning)),
        web.post("/login", login),
        web.post("/logout", logout),
        web.get("/static/{name}", static),
    ]


# ------------------------------------------------------------------------------------------- access
def _page(render: Callable[[web.Request], Awaitable[str]]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        token = web_context(request).token
        given = request.query.get("token")
        if given is not None:  # a link with the token: log in, then the same page without it
            if not same_token(given, token):
                return _login_page(request.path, wrong=True)
            rest = {k: v for k, v in request.query.items() if k != "token"}
            answer = web.Response(status=303, headers={"Location": _here(request) + _query(rest)})
            _set_cookie(answer, request, token)
            return answer
        if not authorized(request, token):
            return _login_page(request.path)
        return web.Response(text=await render(request), content_type="text/html", headers=HEADERS)

    return handler


def _here(request: web.Request) -> str:
    """This page as a relative URL (pages sit at the top level)."""
    return request.path.rsplit("/", 1)[-1] or "./"


def _query(params: dict[str, Any]) -> str:
    return f"?{urlencode(params)}" if params else ""


def _set_cookie(answer: web.Response, request: web.Request, token: str) -> None:
    secure = request.secure
    answer.set_cookie(
        "token", token, max_age=COOKIE_MAX_AGE, path="/", httponly=True, samesite="Strict", secure=secure
    )


async def login(request: web.Request) -> web.Response:
    """The login form's POST: the right token sets the cookie and goes back to the page asked for."""
    form = await request.post()
    back = str(form.get("next", ""))
    back = back if back in PAGES else ""
    if not same_origin(request):
        return web.Response(status=403, text="cross-site login refused")
    if not same_token(str(form.get("token", "")), web_context(request).token):
        return _login_page(back, wrong=True)
    answer = web.Response(status=303, headers={"Location": back or "./"})
    _set_cookie(answer, request, web_context(request).token)
    return answer


async def logout(request: web.Request) -> web.Response:
    """Forget the cookie; the next page asks for the token again."""
    if not same_origin(request):
        return web.Response(status=403, text="cross-site logout refused")
    answer = web.Response(status=303, headers={"Location": "./"})
    answer.del_cookie("token", path="/")
    return answer


def _login_page(page: str, wrong: bool = False) -> web.Response:
    """The token form (401); after it, back to `page` (one of PAGES, with or without its slash)."""
    back = page.strip("/") if page.strip("/") in PAGES else ""
    body = f"""<form class="login card" method="post" action="login">
<h1>TinyAlign</h1>
<p>This page shows what the voice assistant heard in your home. Enter its access token: the file
<code>web-token</code> in the server's data folder, or open the link the server printed when it started.</p>
<label>Access token
<input type="password" name="token" autocomplete="current-password" required autofocus></label>
<input type="hidden" name="next" value="{escape(back)}">
<button type="submit">Open</button>
{'<p class="bad" role="alert">That token is not right.</p>' if wrong else ""}
</form>"""
    return web.Response(
        text=_layout("Log in", None, body, nav=False), content_type="text/html", status=401, headers=HEADERS
    )


@functools.cache
def _asset(name: str) -> tuple[bytes, str]:
    """A static file of this package and a short hash of it (the URL changes when the file does)."""
    data = (resources.files(__package__) / name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:12]


async def static(request: web.Request) -> web.Response:
    """app.js and style.css (by name from a fixed list: no path from the request reaches the disk)."""
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    data, _ = _asset(name)
    return web.Response(
        body=data,
        content_type=STATIC[name],
        charset="utf-8",
        headers={"Cache-Control": "public, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"},
    )


# ------------------------------------------------------------------------------------------- layout
def _current(yes: bool) -> str:
    return ' aria-current="page"' if yes else ""


def _layout(
    title: str,
    active: str | None,
    body: str,
    *,
    nav: bool = True,
    logout: bool = False,
    running: bool = False,
    refresh_s: int | None = None,
) -> str:
    """The whole page around `body`: header with the links between pages, the style sheet and script
    (`refresh_s`: the browser loads the page again after so many seconds)."""
    links = "".join(
        f'<a href="{href or "./"}"{_current(href == active)}>{name}</a>' for href, name in PAGES.items()
    )
    out = (
        '<form method="post" action="logout"><button class="link" type="submit">Log out</button></form>'
        if logout
        else ""
    )
    header = f'<header><span class="brand">TinyAlign</span><nav>{links}</nav>{out}</header>' if nav else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<link rel="icon" href="data:,">{f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""}
<title>{escape(title)} - TinyAlign</title>
<link rel="stylesheet" href="static/style.css?v={_asset("style.css")[1]}">
<script src="static/app.js?v={_asset("app.js")[1]}" defer></script>
</head><body data-running="{int(running)}">
{header}<main>
{body}
<p id="status" role="status" aria-live="polite"></p>
</main></body></html>
"""


def _logged_in_by_cookie(request: web.Request) -> bool:
    cookie = request.cookies.get("token")
    return not ingress(request) and bool(cookie) and same_token(cookie or "", web_context(request).token)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _short(ts: float) -> str:
    """`09:41` today, `Tue 09:41` within the week, else `Nov 20 09:41` (the log keeps weeks, not years)."""
    when = datetime.fromtimestamp(ts)
    days = (date.today() - when.date()).days
    return when.strftime("%H:%M" if days == 0 else "%a %H:%M" if 0 < days < 7 else "%b %d %H:%M")


def _lines(parts: list[str]) -> str:
    """One part a line, none broken inside ("22 held out", "teacher 49")."""
    return "".join(f'<div class="nowrap">{part}</div>' for part in parts)


def _pct(value: Any) -> str:
    return f"{value * 100:.0f}%" if isinstance(value, int | float) else "-"


def _ms(value: float | None) -> str:
    return f"{value:.0f} ms" if value is not None else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return "under 1 s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _intent_text(intent: dict[str, Any] | None) -> str:
    if not intent:
        return "not recognized"
    try:
        return Intent.from_json(intent).to_text()
    except (KeyError, TypeError, AttributeError):
        return "?"


def _breakable(text: str) -> str:
    """Escaped, with line-break chances inside CamelCase names (`Hass<wbr>Light<wbr>Set`)."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "<wbr>", escape(text))


def _intent_title(name: str) -> str:
    """`HassLightSet` -> `Light set`: the intent name as words."""
    words = "".join(f" {c}" if c.isupper() else c for c in name.removeprefix("Hass")).split()
    return " ".join([words[0], *(w.lower() for w in words[1:])]) if words else name


# ---------------------------------------------------------------------------------------- dashboard
def _overview(store: InteractionStore) -> dict[str, Any]:
    """Today's requests, latency and answers withheld as unsure, what is left to review, the last run
    (on the store's thread)."""
    midnight = datetime.combine(date.today(), dtime()).timestamp()
    today = store.conn.execute(
        "SELECT kind, latency_ms, withheld IS NOT NULL FROM interactions WHERE created_at >= ?", (midnight,)
    ).fetchall()
    to_review = count_interactions(store, *interaction_filters(FILTERS["unlabelled"]))
    latencies = [ms for kind, ms, _ in today if kind == "audio" and ms is not None]
    return {
        "requests": len(today),
        "audio": sum(kind == "audio" for kind, _, _ in today),
        "unsure": sum(bool(withheld) for _, _, withheld in today),
        "p50": float(np.percentile(latencies, 50)) if latencies else None,
        "p95": float(np.percentile(latencies, 95)) if latencies else None,
        "to_review": to_review,
        "last_run": next(iter(adaptation_runs(store, 1)), None),
        "set_aside": [path.name for path in store.set_aside_logs()],
    }


def _made(metrics: dict[str, Any], why: bool = False) -> str:
    """How a version came to be: promoted by its night, or rejected by it (`why`: with the reason)."""
    rejected = metrics.get("rejected")
    if not rejected:
        return f"promoted {_when(metrics.get('promoted_at'))}"
    reason = f'<div class="small">{escape(rejected.get("reason") or "")}</div>' if why else ""
    return f"rejected {_when(rejected.get('at'))}{reason}"


def _served_metrics(versions: Versions, name: str) -> dict[str, Any]:
    if name == BASE:
        return {}
    try:
        return versions.info(name).metrics
    except VersionError:
        return {}


def _why_log_off(log_off: str) -> str:
    """Why logging is off, for a page: the household's choice, or what keeps the log from being used."""
    if log_off == NO_LOG:
        return f"<code>{NO_LOG}</code>"
    return f"{escape(log_off)}; fix it, then restart the assistant"


async def dashboard(request: web.Request) -> str:
    """Model and version, path, today's requests and latency, the next run, health."""
    ctx = web_context(request)
    control, store = ctx.control, ctx.store
    overview: dict[str, Any] | None = None
    store_state = "off"
    if store is not None:
        try:
            overview = await store.async_call(_overview, store)
            store_state = "ok"
        except sqlite3.Error as err:
            store_state = f"error: {err}"
    served = await asyncio.to_thread(_served_metrics, Versions(control.data_dir), control.served_name)
    disk = await asyncio.to_thread(shutil.disk_usage, control.data_dir)

    if control.served_name == BASE:
        version = f"the model's own projector ({escape(control.version or 'none')}), not adapted yet"
    else:
        anyway = ", served anyway" if served.get("rejected") else ""
        adapters = ", with Whisper decoder adapters" if control.adapted else ""
        version = f"{escape(control.served_name)}{adapters}, {_made(served)}{anyway}"
    path = escape(control.path) + (" (auto)" if control.requested_path == "auto" else "")
    nxt = control.next_run_at
    if control.job_running:
        next_text = "running now"
    elif nxt is None:
        next_text = "off"
    else:
        day = "today" if nxt.date() == date.today() else "tomorrow"  # the timer's next is within a day
        next_text = f"{day} at {nxt.strftime('%H:%M')}"
    if overview is not None:
        today = (
            f"<dt>Requests today</dt><dd>{overview['requests']} ({overview['audio']} spoken)</dd>"
            f"<dt>Latency (p50 / p95)</dt><dd>{_ms(overview['p50'])} / {_ms(overview['p95'])}</dd>"
            f'<dt>Not sure, not acted on</dt><dd><a href="interactions?filter=unsure">{overview["unsure"]} '
            "today</a></dd>"
        )
        review = (
            f'<dt>To review</dt><dd><a href="interactions?filter=unlabelled">'
            f"{counted(overview['to_review'], 'utterance')} nobody has checked</a></dd>"
        )
        last = overview["last_run"]
        last_text = (
            f'<a href="learning">{escape(last["status"])}</a> {_when(last["started_at"])}'
            f'<div class="small">{escape(last["reason"] or "")}</div>'
            if last
            else "none yet"
        )
    else:
        today = "<dt>Requests today</dt><dd>- (logging is off)</dd>"
        review, last_text = "", "-"
    logging_class = "ok"
    if store is None:
        logging_class = "warn" if ctx.log_off == NO_LOG else "bad"  # a log that cannot be used: fix it
        logging_text, store_item = f"logging off ({_why_log_off(ctx.log_off)})", ""
    else:
        paused = " (recordings paused: the disk is low)" if store.disk_low else ""
        logging_text = "logging on" + (" (without audio)" if not store.log_audio else paused)
        if store_state == "ok" and store.write_error is not None:  # it reads, but keeps nothing
            store_state = f"error: the last utterance could not be logged: {store.write_error}"
        ok = store_state == "ok"
        store_item = f'<li class="{"ok" if ok else "bad"}">log {"OK" if ok else escape(store_state)}</li>'
        for name in overview["set_aside"] if overview else []:
            store_item += (
                f'<li class="warn">a damaged log was set aside in {escape(name)}, with its recordings '
                "(<i>Delete all recordings</i> deletes it)</li>"
            )
    disk_ok = disk.free >= MIN_FREE_BYTES  # below it the log keeps no recordings (by default)
    health = (
        '<ul class="health"><li class="ok">model loaded</li>'
        f"{store_item}"
        f'<li class="{"ok" if disk_ok else "bad"}">disk: {disk.free / (1 << 30):.1f} GB free</li>'
        f'<li class="{logging_class}">{logging_text}</li></ul>'
    )
    body = f"""<h1>Dashboard</h1>
{health}
<div class="cards">
<section class="card"><h2>Model</h2><dl>
<dt>Model</dt><dd>{escape(control.model_name)}{DEMO_NOTE if control.demo else ""}</dd>
<dt>Version</dt><dd>{version}</dd>
<dt>Path in use</dt><dd>{path}</dd></dl></section>
<section class="card"><h2>Today</h2><dl>{today}{review}</dl></section>
<section class="card"><h2>Learning</h2><dl>
<dt>Next nightly run</dt><dd>{next_text}</dd>
<dt>Last run</dt><dd>{last_text}</dd></dl></section>
</div>"""
    return _layout("Dashboard", "", body, logout=_logged_in_by_cookie(request))


# ------------------------------------------------------------------------------------- interactions
def _page_of(store: InteractionStore, name: str, page: int) -> dict[str, Any]:
    """One page of the log under a filter, and how many rows each filter has (store's thread)."""
    counts = {key: count_interactions(store, *interaction_filters(params)) for key, params in FILTERS.items()}
    items = interaction_page(store, *interaction_filters(FILTERS[name]), page, PER_PAGE)
    return {"counts": counts, "items": items, "set_aside": len(store.set_aside_logs())}


def _where(item: dict[str, Any]) -> str:
    if item["satellite_id"] or item["device_id"]:
        return item["satellite_id"] or item["device_id"]
    client = item["client"] or ""
    return client.rsplit(":", 1)[0] if client.count(":") == 1 else client or "-"


def _answered(item: dict[str, Any]) -> str:
    """What the server did with the request (when Home Assistant reported no outcome)."""
    if item["withheld"]:
        return "not sure: not acted on"
    return "answered" if item["intent"] else "not understood"


def _row(item: dict[str, Any]) -> str:
    correction = item["correction"] or {}
    # What it heard: the intent answered, or the one withheld as unsure (what "Heard right" confirms).
    heard_text, heard_intent = item["transcript"] or "", item["intent"] or item["withheld"]
    text = correction.get("text") or heard_text
    intent = correction.get("intent", heard_intent)
    fixed_text = correction.get("text") if correction.get("text") not in (None, heard_text) else ""
    fixed_intent = (
        _intent_text(correction["intent"])
        if "intent" in correction and _intent_text(correction["intent"]) != _intent_text(heard_intent)
        else ""
    )
    outcome = item["ha_outcome"] or _answered(item)
    spoken = item["kind"] == "audio"
    audio = (
        f'<audio controls preload="none" src="api/interactions/{item["id"]}/audio"></audio>'
        if item["audio"]
        else ""
    )
    buttons = (
        '<button type="button" class="fix">Correct</button>'
        '<button type="button" class="right" title="What it heard was right">Heard right</button>'
        if spoken
        else ""
    ) + '<button type="button" class="delete danger">Delete</button>'
    attrs = {
        "data-id": item["id"],
        "data-text": text,
        "data-intent": json.dumps(intent),
        "data-heard-text": heard_text,
        "data-heard-intent": json.dumps(heard_intent),
    }
    data = " ".join(f'{k}="{escape(str(v))}"' for k, v in attrs.items())
    label = item["label_source"]
    return f"""<tr class="row{" labelled" if label else ""}" tabindex="0" {data}>
<td data-label="Time" class="nowrap">
<time datetime="{escape(item["time"])}">{_short(item["created_at"])}</time></td>
<td data-label="Where">{escape(_where(item))}</td>
<td data-label="Length">{f"{item['duration_s']:.1f} s" if item["duration_s"] else "text"}</td>
<td data-label="Heard" class="heard">{escape(heard_text) or "<i>nothing</i>"}
<div class="fixed fixed-text">{escape(fixed_text)}</div></td>
<td data-label="Intent" class="intent"><code>{_breakable(_intent_text(heard_intent))}</code>
<div class="fixed fixed-intent">{_breakable(fixed_intent)}</div></td>
<td data-label="Outcome">{escape(outcome)}</td>
<td data-label="Label" class="label">{escape(label or "-")}</td>
<td class="actions">{audio}<span class="buttons">{buttons}</span></td>
</tr>"""


def _editor() -> str:
    """The correction form (cloned under a row by app.js): intents and their slots from INTENT_SLOTS."""
    options = "".join(
        f'<option value="{name}" data-slots="{" ".join(slots)}">{_intent_title(name)} ({name})</option>'
        for name, slots in INTENT_SLOTS.items()
    )
    slot_names = list(dict.fromkeys(slot for slots in INTENT_SLOTS.values() for slot in slots))
    fields = "".join(
        f'<label data-slot="{s}">{s} <input name="slot-{s}" autocomplete="off"></label>' for s in slot_names
    )
    return f"""<template id="editor"><form class="editor">
<label class="wide">What was said <input name="text" required maxlength="1000" autocomplete="off"></label>
<label>Intent <select name="intent"><option value="">not a command</option>{options}</select></label>
<div class="slots">{fields}</div>
<div class="buttons"><button type="submit">Save</button>
<button type="button" class="cancel">Cancel</button></div>
<p class="error bad" role="alert"></p>
</form></template>"""


async def interactions(request: web.Request) -> str:
    """The log, newest first, with filters, audio, corrections and deletes."""
    ctx = web_context(request)
    logout = _logged_in_by_cookie(request)
    if ctx.store is None:
        body = f"<h1>Interactions</h1><p>Logging is off ({_why_log_off(ctx.log_off)}): nothing is kept.</p>"
        return _layout("Interactions", "interactions", body, logout=logout)
    name = request.query.get("filter", "all")
    name = name if name in FILTERS else "all"
    try:
        page = max(1, int(request.query.get("page", "1")))
    except ValueError:
        page = 1
    data = await ctx.store.async_call(_page_of, ctx.store, name, page)
    total = data["counts"][name]
    pages = max(1, -(-total // PER_PAGE))
    tabs = "".join(
        f'<a href="interactions{_query({"filter": key} if key != "all" else {})}"'
        f"{_current(key == name)}>{key} ({data['counts'][key]})</a>"
        for key in FILTERS
    )
    rows = "".join(_row(item) for item in data["items"])
    table = (
        f"""<div class="scroll"><table class="log"><thead>
<tr><th>Time</th><th>Where</th><th>Length</th><th>Heard</th>
<th>Intent</th><th>Outcome</th><th>Label</th><th>Listen and fix</th></tr></thead>
<tbody>{rows}</tbody></table></div>"""
        if rows
        else '<p class="empty">Nothing here.</p>'
    )
    base = {"filter": name} if name != "all" else {}
    newer = f'<a href="interactions{_query({**base, "page": page - 1})}">&larr; newer</a>'
    older = f'<a href="interactions{_query({**base, "page": page + 1})}">older &rarr;</a>'
    pager = f"{newer if page > 1 else ''}<span>page {page} of {pages}</span>{older if page < pages else ''}"
    everything = data["counts"]["all"]
    doomed = [f"{'all ' if everything > 1 else ''}{counted(everything, 'recording')}"] if everything else []
    doomed += [f"{counted(data['set_aside'], 'damaged log')} set aside"] if data["set_aside"] else []
    delete_all = (
        f'<button type="button" id="delete-all" class="danger">Delete {" and ".join(doomed)}</button>'
        if doomed
        else ""
    )
    body = f"""<h1>Interactions</h1>
<nav class="tabs">{tabs}</nav>
<p class="keys">Keys: <kbd>j</kbd>/<kbd>k</kbd> next/previous, <kbd>p</kbd> play, <kbd>Enter</kbd> correct,
<kbd>y</kbd> heard right, <kbd>Esc</kbd> close. Corrections teach the assistant tonight.</p>
{table}
<nav class="pager">{pager}</nav>
<p class="danger-zone">{delete_all}</p>
{_editor()}"""
    return _layout("Interactions", "interactions", body, logout=logout)


# ------------------------------------------------------------------------------------------ learning
def _figure(report: dict[str, Any] | None, when: str, metric: str, where: str = "household") -> Any:
    """A figure of a run's report: `when` before or after, on the household's held-out set (or `general`:
    other voices)."""
    return (((report or {}).get(when) or {}).get(where) or {}).get(metric)


PATHS_SCORED = ("aligned", "cascade")  # the paths a night scores (`adapt`: the report's `served`)


def _served(report: dict[str, Any], requested: str) -> tuple[tuple[str, str], dict[str, Any]]:
    """What answered the household before a night and what answers after it: the two paths, and their
    figures as `{"before": {"household": ..., "general": ...}, "after": ...}`. The path is the server's
    `--path` (`aligned`, `cascade`), or with `auto` (and `readout`, which a night does not score) the
    one each version chose. A report from before the nights recorded both paths gives the projector's."""
    served = report.get("served")
    if served is None:
        return ("aligned", "aligned"), report
    auto = served["path_auto"]
    before, after = (requested if requested in PATHS_SCORED else auto[when] for when in ("before", "after"))
    return (before, after), {"before": served[before]["before"], "after": served[after]["after"]}


def _accuracy_chart(runs: list[dict[str, Any]], requested: str) -> str:
    """Held-out intent accuracy and WER of what answered the household after each night that validated."""
    nights = [r for r in reversed(runs) if (r["report"] or {}).get("before") and r["report"].get("after")]
    accuracy, wer = Series("intent accuracy", "s1", []), Series("word error rate", "s2", [])
    ticks = []
    for i, run in enumerate(nights):
        promoted = run["status"] == "promoted"
        _, figures = _served(run["report"], requested)
        for series, metric in ((accuracy, "intent_accuracy"), (wer, "wer")):
            value = _figure(figures, "after" if promoted else "before", metric)
            if value is not None:
                if not promoted:
                    series.hollow.add(len(series.points))
                series.points.append((i, min(float(value), 1.0)))
        ticks.append((i, datetime.fromtimestamp(run["started_at"]).strftime("%m-%d")))
    step = max(1, -(-len(ticks) // 8))
    return line_chart(
        [accuracy, wer],
        label="Intent accuracy and word error rate over the nights",
        y_range=(0.0, 1.0),
        y_format=lambda v: f"{v * 100:.0f}%",
        x_ticks=ticks[::step],
        x_format=lambda v: ticks[int(v)][1] if 0 <= int(v) < len(ticks) else "",
    )


def _loss_charts(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
    """The training losses of the newest run that trained, and that run: the projector's over the
    seconds, Whisper's decoder adapters' per epoch (a night trains either or both)."""
    for run in runs:
        report = run["report"] or {}
        projector = (report.get("train") or {}).get("loss_curve") or []
        decoder = (report.get("decoder") or {}).get("loss_curve") or []
        curves = [  # (name, colour, points, the x axis's labels)
            ("projector", "s1", [(float(s), float(loss)) for s, loss in projector], lambda v: f"{v:.0f} s"),
            (
                "Whisper's decoder adapters, by epoch",
                "s2",
                [(float(epoch), float(loss)) for epoch, loss in enumerate(decoder, 1)],
                lambda v: f"{v:.0f}",
            ),
        ]
        charts = [
            line_chart(
                [Series(name, css, points)],
                label=f"Training loss in the last run: {name}",
                y_format=lambda v: f"{v:.3g}",
                x_format=x_format,
            )
            for name, css, points, x_format in curves
            if len(points) >= 2
        ]
        if charts:
            return "".join(charts), run
    return "", None


def _change(figures: dict[str, Any], metric: str, where: str) -> str:
    """`40% &rarr; 56%`; a figure the night did not measure (the cascade on other voices, unless it
    judged decoder adapters) is `-`."""
    before, after = (_figure(figures, when, metric, where) for when in ("before", "after"))
    if before is None and after is None:
        return '<span title="not measured by this night">-</span>'
    return f"{_pct(before)} &rarr; {_pct(after)}"


def _run_row(run: dict[str, Any], kept: set[str], requested: str) -> str:
    """One adaptation run: what the night did, and what answered the household before and after it
    (`requested`: the server's `--path`); `kept`: the versions still on disk (pruning removes older ones)."""
    report = run["report"] or {}
    data = report.get("data") or {}
    sizes = [f"{data[k]} {label}" for k, label in (("train", "train"), ("heldout", "held out")) if k in data]
    if "new" in data:
        sizes.append(f"{data['new']} new")
    sources = _lines([f"{k} {v}" for k, v in (data.get("sources") or {}).items() if v])
    version = run.get("version")
    status = escape(run["status"])
    if version:
        status += f" {escape(version)}" + ("" if version in kept else " (no longer kept)")
    paths, served = _served(report, requested)
    before_after = [
        _change(served, m, where) if report.get("after") else "-"
        for m, where in (
            ("intent_accuracy", "household"),
            ("wer", "household"),
            ("intent_accuracy", "general"),
        )
    ]
    if report.get("after"):  # which path answered: the cascade, the aligned path, or one then the other
        before_after[0] += f'<div class="small">{" &rarr; ".join(dict.fromkeys(paths))}</div>'
    took = report.get("duration_s")
    if took is None and run["finished_at"]:
        took = run["finished_at"] - run["started_at"]
    peaks = []
    if peak := report.get("peak_rss_mb"):
        peaks.append(f"{peak:.0f} MB peak")
    if gpu := report.get("peak_cuda_mb"):  # a night on CUDA
        peaks.append(f"{gpu:.0f} MB on the GPU")
    memory = f'<div class="small">{" &middot; ".join(peaks)}</div>' if peaks else ""
    ear = ""
    if decoder := report.get("decoder"):  # Whisper's decoder adapters: the cascade before -> with them
        if "error" in decoder:
            said = f"(not kept): {escape(decoder['error'])}"
        elif "skipped" in decoder:
            said = f"(not trained): {escape(decoder['skipped'])}"
        else:
            # the served cascade on the adapters' own held-out set (older reports: on the whole set)
            start = decoder if "before" in decoder else {"before": report.get("cascade")}
            figures = [
                f"{_pct(_figure(start, 'before', m))} &rarr; {_pct(_figure(decoder, 'after', m))} {label}"
                for m, label in (("intent_accuracy", "intents"), ("wer", "WER"))
            ]
            if too_long := (decoder.get("examples") or {}).get("too_long"):
                figures.append(f"{counted(too_long, 'transcript')} longer than it writes left out")
            if remembered := (decoder.get("memory") or {}).get("transcripts"):
                figures.append(f"remembering {counted(remembered, 'corrected transcript')}")
            said = f"({'kept' if decoder.get('promoted') else 'not kept'}): {', '.join(figures)}"
        ear = f'<div class="small">Whisper\'s decoder {said}</div>'
    day, _, clock = _when(run["started_at"]).partition(" ")  # (a narrow column breaks before the time)
    return f"""<tr class="run {escape(run["status"])}">
<td data-label="Started"><span class="nowrap">{day}</span> {clock}</td>
<td data-label="Result"><b>{status}</b><div class="small">{escape(run["reason"] or "")}</div>{ear}</td>
<td data-label="Data">{_lines(sizes) or "-"}{f'<div class="small">{sources}</div>' if sources else ""}</td>
<td data-label="Intent accuracy" class="nowrap">{before_after[0]}</td>
<td data-label="WER" class="nowrap">{before_after[1]}</td>
<td data-label="Other voices" class="nowrap">{before_after[2]}</td>
<td data-label="Took" class="nowrap">{_duration(took)}{memory}</td>
</tr>"""


def _adapters(remembers: int | None) -> str:
    """What a version holds besides its projector: Whisper decoder adapters, with the memory's size."""
    memory = f", remembering {counted(remembers, 'corrected transcript')}" if remembers else ""
    return f'<div class="small">and Whisper decoder adapters{memory}</div>'


def _version_rows(listing: dict[str, Any], served: str, requested: str) -> str:
    """The kept versions, each with its held-out figures on the path it would answer on (`requested`:
    the server's `--path`; with `auto`, the version's own choice)."""
    rows = []
    for entry in [*listing["versions"], {"name": BASE}]:
        name = entry["name"]
        metrics = entry.get("metrics") or {}
        path = requested if requested in PATHS_SCORED else entry.get("path_auto", "aligned")
        household = (metrics if path == "aligned" else metrics.get("cascade") or {}).get("household") or {}
        on_path = f'<div class="small">{path}</div>' if household else ""
        rejected = bool(metrics.get("rejected"))
        label, flag = ("Serve anyway", ' data-rejected="1"') if rejected else ("Serve this", "")
        button = (
            "<b>serving</b>"
            if name == served
            else f'<button type="button" class="rollback" data-to="{escape(name)}"{flag}>{label}</button>'
        )
        what = (
            "the model's own projector and Whisper as built"
            if name == BASE
            else _made(metrics, why=True)
            + (_adapters(entry.get("remembers")) if entry.get("decoder") else "")
            if "error" not in entry
            else escape(entry["error"])
        )
        rows.append(
            f'<tr><td data-label="Version">{escape(name)}</td><td data-label="">{what}</td>'
            f'<td data-label="Intent accuracy">{_pct(household.get("intent_accuracy"))}{on_path}</td>'
            f'<td data-label="WER">{_pct(household.get("wer"))}</td><td>{button}</td></tr>'
        )
    return "".join(rows)


async def learning(request: web.Request) -> str:
    """Adaptation runs, charts, versions; run now and roll back."""
    ctx = web_context(request)
    control = ctx.control
    runs = await ctx.store.async_call(adaptation_runs, ctx.store, RUNS_SHOWN) if ctx.store is not None else []
    listing = await asyncio.to_thread(Versions(control.data_dir).describe)
    running = control.job_running
    accuracy = _accuracy_chart(runs, control.requested_path)
    loss, loss_run = _loss_charts(runs)
    charts = (
        '<section class="card"><h2>Accuracy over the nights</h2>'
        + (
            accuracy
            + '<p class="small">On the household\'s held-out utterances, what answered after each night: the '
            "cascade or the aligned path, as served (hollow: the night's candidate was rejected).</p>"
            if accuracy
            else "<p>No night has been validated yet.</p>"
        )
        + "</section>"
        + '<section class="card"><h2>Last training</h2>'
        + (
            loss + f'<p class="small">Loss while training, run of {_when(loss_run["started_at"])}: the '
            "projector's over the seconds, Whisper's decoder adapters' per epoch.</p>"
            if loss_run
            else "<p>No training yet.</p>"
        )
        + "</section>"
    )
    kept = {entry["name"] for entry in listing["versions"]}
    rows = "".join(_run_row(run, kept, control.requested_path) for run in runs)
    table = (
        f"""<div class="scroll"><table class="runs"><thead>
<tr><th>Started</th><th>Result</th>
<th title="utterances trained on, held out, new since the last run; under them, their labels">Data</th>
<th title="of what answered the household: before the night and after it">Intent accuracy</th>
<th title="of what answered the household: before the night and after it">WER</th>
<th title="intent accuracy on other voices: before the night and after it">Other voices</th>
<th title="and the peak memory">Took</th></tr></thead>
<tbody>{rows}</tbody></table></div>"""
        if rows
        else '<p class="empty">No adaptation has run yet.</p>'
    )
    nxt = control.next_run_at
    schedule = f"next nightly run {_when(nxt.timestamp())}" if nxt else "the nightly run is off"
    state = "An adaptation is running now; this page updates when it is done." if running else schedule
    disabled = " disabled" if running else ""
    back_disabled = " disabled" if control.served_name == BASE else ""
    body = f"""<h1>Learning</h1>
<p class="lead">Every night the assistant practises on what it heard in this home, and keeps the result only
if it understands the household better. Serving: <b>{escape(control.served_name)}</b>; {escape(state)}.</p>
<p class="buttons"><button type="button" id="run-now"{disabled}>Run now</button>
<button type="button" class="rollback"{back_disabled}>Roll back</button></p>
<div class="cards charts">{charts}</div>
<h2>Runs</h2>
{table}
<h2>Versions</h2>
<table class="versions"><thead><tr><th>Version</th><th></th><th>Intent accuracy</th><th>WER</th><th></th></tr>
</thead>
<tbody>{_version_rows(listing, control.served_name, control.requested_path)}</tbody></table>"""
    return _layout("Learning", "learning", body, logout=_logged_in_by_cookie(request), running=running)


# ------------------------------------------------------------------------------------------- starting
LogLine = tuple[float, int, str]  # when (unix seconds), logging level, message


def starting_page(since: float, lines: list[LogLine], refresh_s: int) -> str:
    """The page the web port shows while the server starts (`starting.py`): for how long, and what the
    start-up logged (in time order; warnings and errors marked)."""
    items = "".join(
        f"<li{_marked(level)}>"
        f'<span class="small">{datetime.fromtimestamp(when):%H:%M:%S}</span> {escape(message)}</li>'
        for when, level, message in lines
    )
    body = f"""<h1>Starting</h1>
<p class="lead">The voice assistant is getting ready and does not answer yet: since {_short(since)}
({_duration(time.time() - since)}). Its pages take this one's place when it is ready; this page reloads
itself every {refresh_s} s.</p>
<h2>What it is doing</h2>
<ul class="startup">{items or "<li>loading</li>"}</ul>"""
    return _layout("Starting", None, body, nav=False, refresh_s=refresh_s)


def _marked(level: int) -> str:
    """The class of a log line of `level` (none for information)."""
    return ' class="bad"' if level >= logging.ERROR else ' class="warn"' if level >= logging.WARNING else ""
