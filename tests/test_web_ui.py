"""The household's page in headless Chromium (Debian's `chromium`, driven by Playwright), against a real
server whose utterances were logged through Wyoming: the dashboard, audio playing in the page, a
correction made with the keyboard and kept by the API, delete one, "run now" listing the run, a rejected
candidate served anyway and rolled back, an intent withheld as unsure confirmed with one key, the page
under Home Assistant ingress's base path, the token outside ingress, delete all. A screenshot of each
page goes to $TINYALIGN_SCREENSHOTS (or the test's temporary folder)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import aiohttp
import playwright.sync_api as playwright
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from serving import CHROMIUM, PAGE_LINK, TIMEOUT, ServerProcess, say_all, serve_args

from wyoming_tinyalign.intents import INTENT_SLOTS
from wyoming_tinyalign.model.bundle import load_projector
from wyoming_tinyalign.store import Interaction, InteractionStore
from wyoming_tinyalign.versions import VersionError, Versions
from wyoming_tinyalign.web import INGRESS_PEER, Metrics, WebContext, build_app

PREFIX = "/api/hassio_ingress/abc123"  # what Home Assistant's ingress puts before the add-on's paths
SAID = [  # (text, satellite), oldest first
    ("turn on the porch light", "porch"),
    ("set the kitchen light to fifty percent", "kitchen"),
    ("what is the temperature in the bedroom", "bedroom"),
    ("start a timer for five minutes", "kitchen"),
]
VIEWPORT = {"width": 960, "height": 720}
UNSURE_LINK = 'main a[href="interactions?filter=unsure"]'  # the dashboard's count of withheld answers
SERVING = "name => document.querySelector('.lead b')?.textContent === name"  # the learning page's "Serving"


# ------------------------------------------------------------------- ingress from the right address
@dataclass
class FakeControl:
    """What the page asks of the server's adaptation side, without a model."""

    data_dir: Path
    served_name: str = "base"
    adapted: bool = False
    version: str | None = "f2305ef185a8"
    model_name: str = "micro"
    demo: bool = False
    path: str = "cascade"
    requested_path: str = "auto"
    next_run_at: None = None
    job_running: bool = False
    started: list[bool] = field(default_factory=list)

    async def start_job(self, now: bool = True) -> bool:
        self.started.append(now)
        return True

    async def rollback(self, to: str | None) -> str:
        raise VersionError("already serving the bundle's own projector (base); nothing to roll back")


@web.middleware
async def peer_from_header(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Test only: the peer address a request claims (a test client cannot connect from 172.30.32.2)."""
    peer = request.headers.get("X-Test-Peer")
    return await handler(request.clone(remote=peer) if peer else request)


async def test_ingress_needs_no_token_but_changes_need_the_header(
    tmp_path: Path, store: InteractionStore
) -> None:
    report = {
        "before": {"household": {"intent_accuracy": 0.5, "wer": 0.4}, "general": {"intent_accuracy": 0.93}},
        "after": {"household": {"intent_accuracy": 0.7, "wer": 0.25}, "general": {"intent_accuracy": 0.9}},
        "train": {"loss_curve": [[10.0, 1.2], [20.0, 0.8], [30.0, 0.6]]},
        "data": {"train": 24, "heldout": 6, "new": 24, "sources": {"correction": 30}},
        "duration_s": 95.0,
        "peak_rss_mb": 812.0,
        "peak_cuda_mb": 1370.6,  # a night on CUDA
        # its decoder adapters' phase failed (the projector's verdict stands)
        "decoder": {
            "error": "ValueError: no transcripts to train Whisper's decoder adapters on",
            "promoted": False,
        },
    }
    store.conn.execute(
        "INSERT INTO adaptations (started_at, finished_at, status, reason, version, report) "
        "VALUES (?, ?, 'promoted', 'better for the household', 'v0001', ?)",
        (time.time() - 3600, time.time() - 3500, json.dumps(report)),
    )
    control = FakeControl(tmp_path)
    app = build_app(WebContext(control=control, store=store, metrics=Metrics(), token="secret"))
    app.middlewares.insert(0, peer_from_header)
    ingress = {"X-Ingress-Path": PREFIX, "X-Test-Peer": INGRESS_PEER}
    async with TestClient(TestServer(app)) as http:
        for page in ("/", "/interactions", "/learning"):
            answer = await http.get(page, headers=ingress)
            assert answer.status == 200, page
            assert 'name="token"' not in await answer.text()
        learning = await (await http.get("/learning", headers=ingress)).text()
        assert learning.count('<svg class="chart"') == 2  # accuracy over the nights, loss curve
        assert "50% &rarr; 70%" in learning and "1 min 35 s" in learning
        assert "93% &rarr; 90%" in learning  # other voices
        assert "812 MB peak &middot; 1371 MB on the GPU" in learning
        sizes = "".join(f'<div class="nowrap">{part}</div>' for part in ("24 train", "6 held out", "24 new"))
        labels = '<div class="small"><div class="nowrap">correction 30</div></div>'  # by source, under them
        assert f'<td data-label="Data">{sizes}{labels}</td>' in learning
        assert "promoted v0001 (no longer kept)" in learning  # pruned: not in this data dir
        assert "Whisper's decoder (not kept): ValueError: no transcripts" in learning.replace("&#x27;", "'")
        # The header alone, from any other address, is no way in.
        answer = await http.get("/", headers={"X-Ingress-Path": PREFIX})
        assert answer.status == 401 and 'name="token"' in await answer.text()
        # A change through ingress needs the header a cross-site form cannot send.
        assert (await http.post("/api/adapt", headers=ingress)).status == 403
        changed = await http.post("/api/adapt", headers={**ingress, "X-Requested-With": "tinyalign"})
        assert changed.status == 202 and control.started == [True]


def _figures(intent_accuracy: float) -> dict:
    return {"household": {"n": 16, "intent_accuracy": intent_accuracy, "wer": 0.3}, "general": {}}


async def test_the_learning_page_shows_what_answered_the_household(
    tmp_path: Path, store: InteractionStore
) -> None:
    """The nights' figures on the path the server serves: with `auto`, the cascade until a night moves it
    to the aligned path; with a fixed `--path`, that path's. Three nights: the first keeps decoder
    adapters (the cascade 40% -> 56%, the aligned path stays at 20%), the second a projector whose
    aligned path beats that cascade (60%), the third is rejected (its candidate's 65% is not served).
    The last night trained only the decoder adapters (a real-size night on 2 cores leaves the projector
    as it is): its loss per epoch is the last training shown."""
    nights = [  # status, (aligned before, after), (cascade before, after), auto's path before and after
        ("promoted", (0.2, 0.2), (0.4, 0.56), ("cascade", "cascade")),
        ("promoted", (0.2, 0.6), (0.56, 0.56), ("cascade", "aligned")),
        ("rejected", (0.6, 0.6), (0.56, 0.56), ("aligned", "aligned")),
    ]
    for i, (status, aligned, cascade, auto) in enumerate(nights):
        report = {
            "before": _figures(aligned[0]),
            "after": _figures(0.65 if status == "rejected" else aligned[1]),  # the projector's candidate
            "served": {
                "path_auto": dict(zip(("before", "after"), auto, strict=True)),
                "aligned": {"before": _figures(aligned[0]), "after": _figures(aligned[1])},
                "cascade": {"before": _figures(cascade[0]), "after": _figures(cascade[1])},
            },
            "train": {"skipped": "its share holds 0.5 of a pass"}
            if i == 2
            else {"loss_curve": [[5, 2], [9, 1]]},
            "decoder": {"loss_curve": [1.2, 0.8, 0.5]} if i == 2 else {},
        }
        store.conn.execute(
            "INSERT INTO adaptations (started_at, finished_at, status, reason, report) "
            "VALUES (?, ?, ?, '', ?)",
            (time.time() - 86400 * (3 - i), time.time() - 86400 * (3 - i) + 60, status, json.dumps(report)),
        )

    def cell(before: int, after: int, path: str) -> str:
        return f'{before}% &rarr; {after}%<div class="small">{path}</div>'

    expected = {  # per --path: each night's intent accuracy cell, newest first, and the chart's points
        "auto": (
            [cell(60, 60, "aligned"), cell(56, 60, "cascade &rarr; aligned"), cell(40, 56, "cascade")],
            ["56%", "60%", "60%"],
        ),
        "cascade": ([cell(56, 56, "cascade"), cell(56, 56, "cascade"), cell(40, 56, "cascade")], ["56%"] * 3),
    }
    for requested, (cells, points) in expected.items():
        control = replace(FakeControl(tmp_path), requested_path=requested)
        app = build_app(WebContext(control=control, store=store, metrics=Metrics(), token="secret"))
        async with TestClient(TestServer(app)) as http:
            page = await (await http.get("/learning", headers={"Authorization": "Bearer secret"})).text()
        shown = [
            cell.split("</td>")[0]
            for cell in page.split('<td data-label="Intent accuracy" class="nowrap">')[1:]
        ]
        assert shown == cells, requested
        others = [
            cell.split("</td>")[0] for cell in page.split('<td data-label="Other voices" class="nowrap">')[1:]
        ]
        assert others == ['<span title="not measured by this night">-</span>'] * 3  # (no general figures)
        charted = [title.split(" (")[0] for title in page.split("<title>intent accuracy: ")[1:]]
        assert charted == points, requested
        assert page.count('<svg class="chart"') == 2 and "<title>projector:" not in page
        assert "<title>Whisper&#x27;s decoder adapters, by epoch: 0.5 (3)</title>" in page


async def test_a_log_that_keeps_nothing_is_shown_until_it_keeps_an_utterance_again(
    tmp_path: Path, store: InteractionStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A card remounted read-only (SQLite's `query_only` here) still reads, so the dashboard said "log OK"
    while nothing was kept. Now it and /healthz say why until an utterance is logged again; the server's
    log gives the traceback once, then a line per utterance lost."""
    caplog.set_level(logging.INFO, logger="wyoming_tinyalign.store")
    app = build_app(WebContext(control=FakeControl(tmp_path), store=store, metrics=Metrics(), token="secret"))
    bearer = {"Authorization": "Bearer secret"}
    readonly = "attempt to write a readonly database"
    async with TestClient(TestServer(app)) as http:
        assert (await (await http.get("/healthz")).json())["log_error"] is None
        await store.async_call(store.conn.execute, "PRAGMA query_only = ON")
        for _ in range(2):
            with pytest.raises(sqlite3.OperationalError, match=readonly):
                await store.async_add(Interaction(kind="audio", transcript="lost"))
        refused = await (await http.get("/", headers=bearer)).text()
        health = await (await http.get("/healthz")).json()
        await store.async_call(store.conn.execute, "PRAGMA query_only = OFF")
        await store.async_add(Interaction(kind="audio", transcript="kept"))
        taken = await (await http.get("/", headers=bearer)).text()
        assert (await (await http.get("/healthz")).json())["log_error"] is None
    assert f'<li class="bad">log error: the last utterance could not be logged: {readonly}</li>' in refused
    assert health["log_error"] == readonly and health["log"] is True
    assert '<li class="ok">log OK</li>' in taken
    said = [r for r in caplog.records if r.name == "wyoming_tinyalign.store"]
    assert [r.getMessage() for r in said] == [f"could not log the interaction: {readonly}"] * 2 + [
        "the interaction log keeps utterances again"
    ]
    assert said[0].exc_info and not said[1].exc_info


async def test_one_of_a_thing_is_counted_as_one(tmp_path: Path, store: InteractionStore) -> None:
    """The page counts in words: one utterance nobody has checked, one recording to delete (not "all 1
    recordings")."""
    await store.async_add(Interaction(kind="audio", transcript="turn on the lamp"))
    app = build_app(WebContext(control=FakeControl(tmp_path), store=store, metrics=Metrics(), token="secret"))
    bearer = {"Authorization": "Bearer secret"}
    async with TestClient(TestServer(app)) as http:
        dashboard = await (await http.get("/", headers=bearer)).text()
        listing = await (await http.get("/interactions", headers=bearer)).text()
    assert ">1 utterance nobody has checked</a>" in dashboard
    assert ">Delete 1 recording</button>" in listing


async def test_the_dashboard_says_when_the_demo_model_answers(
    tmp_path: Path, store: InteractionStore
) -> None:
    """`--model dev` (the add-on's default) serves the demo model, which knows synthetic speech only: the
    dashboard says so where it names the model, and says nothing of it for any other model."""
    bearer = {"Authorization": "Bearer secret"}
    pages = []
    for demo in (True, False):
        control = replace(FakeControl(tmp_path), model_name="dev-small" if demo else "mine", demo=demo)
        app = build_app(WebContext(control=control, store=store, metrics=Metrics(), token="secret"))
        async with TestClient(TestServer(app)) as http:
            pages.append(await (await http.get("/", headers=bearer)).text())
    assert "<dt>Model</dt><dd>dev-small<div" in pages[0] and "synthetic speech only" in pages[0]
    assert "<dt>Model</dt><dd>mine</dd>" in pages[1] and "synthetic" not in pages[1]


# -------------------------------------------------------------------------------------- the server
@dataclass
class Site:
    process: ServerProcess
    url: str  # the page, http://127.0.0.1:PORT/
    link: str  # the link the server logged, with ?token=
    token: str
    data: Path


@pytest.fixture(scope="module")
def site(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A real server (cascade path, so the job's teacher is the logged transcript) with SAID logged through
    Wyoming; its job labels nothing but corrections, so "run now" with one correction is skipped."""
    work = tmp_path_factory.mktemp("web-ui")
    data = work / "data"
    job = "--teacher-min-confidence 1 --outcome-window 100000"
    extra = [
        "--uri", "tcp://127.0.0.1:0", "--path", "cascade", "--web-port", "0", "--adapt-at", "03:00",
        "--adapt-args", job,
    ]  # fmt: skip
    process = ServerProcess(serve_args(micro_model, data, *extra), work / "server.log")
    try:
        process.wait_ready()
        link = process.wait_log(PAGE_LINK).group(1)
        say_all(*process.host_port, work, SAID)
        site = Site(process, link.split("?")[0], link, (data / "web-token").read_text().strip(), data)
        deadline = time.monotonic() + TIMEOUT
        while api(site, "GET", "api/interactions")[1]["total"] < len(SAID):  # logged in the background
            assert time.monotonic() < deadline, process.text[-2000:]
            time.sleep(0.1)
        yield site
    finally:
        process.stop()


def api(site: Site, method: str, path: str) -> tuple[int, dict]:
    """The JSON API with the token, as a script would call it: (status, JSON body or {})."""
    request = Request(site.url + path, method=method, headers={"Authorization": f"Bearer {site.token}"})
    try:
        with urlopen(request, timeout=TIMEOUT) as answer:
            body = answer.read()
            return answer.status, json.loads(
                body
            ) if answer.headers.get_content_type() == "application/json" else {}
    except HTTPError as err:
        return err.code, {}


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: $TINYALIGN_SCREENSHOTS, or a temporary folder of the test run."""
    folder = Path(os.environ.get("TINYALIGN_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def chromium() -> Iterator[playwright.Browser]:
    if not Path(CHROMIUM).is_file():  # CI installs it (script/setup): there, a missing browser fails
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "no chromium: script/setup installs Debian's chromium package"
        )
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--autoplay-policy=no-user-gesture-required"]
        )
        yield browser
        browser.close()


@pytest.fixture
def fresh(chromium: playwright.Browser) -> Iterator[playwright.Page]:
    """A page in a browser context of its own (no cookie); fails the test on a script error."""
    context = chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture
def page(fresh: playwright.Page, site: Site) -> playwright.Page:
    """A page logged in with the link the server logged."""
    fresh.goto(site.link)
    return fresh


def rows(page: playwright.Page) -> list[str]:
    return page.locator("tr.row").evaluate_all("rows => rows.map(r => r.dataset.id)")


# --------------------------------------------------------------------------------------- the page
def test_the_link_logs_in_and_the_dashboard_shows_the_server(page, site: Site, shots: Path) -> None:
    assert page.url == site.url  # the token left the address bar
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "token" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # no script can read it
    text = page.inner_text("main")
    for expected in (
        "Dashboard",
        "micro",
        "Path in use\ncascade",
        "not adapted yet",
        f"{len(SAID)} ({len(SAID)} spoken)",
        "Not sure, not acted on",
    ):
        assert expected in text, expected
    for health in ("model loaded", "log OK", "free", "logging on"):
        assert health in text, health
    assert "tomorrow at 03:00" in text or "today at 03:00" in text
    assert " ms / " in text  # latency p50 / p95
    withheld = api(site, "GET", f"api/interactions?withheld=true&since={date.today()}")[1]["total"]
    assert page.inner_text(UNSURE_LINK) == f"{withheld} today"
    unchecked = api(site, "GET", "api/interactions?labelled=false&kind=audio")[1]["total"]
    review = page.inner_text('main a[href="interactions?filter=unlabelled"]')
    assert review == f"{unchecked} utterance{'' if unchecked == 1 else 's'} nobody has checked"
    page.screenshot(path=shots / "dashboard.png", full_page=True)


def test_audio_plays_in_the_page(page, site: Site) -> None:
    page.goto(site.url + "interactions")
    row = page.locator("tr.row").first
    row.focus()
    page.keyboard.press("p")  # the page's key for play
    audio = row.locator("audio")
    page.wait_for_function(
        "a => !a.paused && a.readyState >= 2 && a.duration > 0", arg=audio.element_handle(), timeout=20_000
    )
    _, item = api(site, "GET", f"api/interactions/{row.get_attribute('data-id')}")
    assert abs(audio.evaluate("a => a.duration") - item["duration_s"]) < 0.05


def test_a_correction_typed_in_the_page_is_kept(page, site: Site, shots: Path) -> None:
    page.goto(site.url + "interactions?filter=unlabelled")
    ids = rows(page)
    assert len(ids) == len(SAID)
    first = page.locator("tr.row").first
    first.focus()
    page.keyboard.press("Enter")
    form = page.locator("tr.editing form")
    names = form.locator("select[name=intent] option").evaluate_all("os => os.map(o => o.value)")
    assert names == ["", *INTENT_SLOTS]  # "not a command", then intents.py's catalogue
    form.locator("input[name=text]").fill("start a timer for five minutes")
    form.locator("select[name=intent]").select_option("HassStartTimer")
    shown = form.locator("[data-slot]:not([hidden])").evaluate_all("ls => ls.map(l => l.dataset.slot)")
    assert shown == list(INTENT_SLOTS["HassStartTimer"])  # the slots of that intent, and only those
    form.locator("input[name=slot-minutes]").fill("5")
    page.screenshot(path=shots / "interactions.png", full_page=True)
    form.locator("input[name=text]").press("Enter")
    form.wait_for(state="detached")
    assert first.locator(".label").inner_text() == "correction"
    assert page.evaluate("document.activeElement.dataset.id") == ids[1]  # on to the next one

    status, item = api(site, "GET", f"api/interactions/{ids[0]}")
    assert status == 200 and item["label_source"] == "correction"
    assert item["correction"]["text"] == "start a timer for five minutes"
    assert item["correction"]["intent"] == {"name": "HassStartTimer", "slots": {"minutes": "5"}}
    page.goto(site.url + "interactions?filter=corrected")
    assert rows(page) == [ids[0]]
    assert "HassStartTimer | minutes=5" in page.locator("tr.row .fixed-intent").inner_text()


def test_delete_one(page, site: Site) -> None:
    page.goto(site.url + "interactions")
    before = rows(page)
    last = page.locator(f'tr.row[data-id="{before[-1]}"]')  # the oldest; not the corrected one
    last.locator("button.delete").click()
    last.wait_for(state="detached")
    assert rows(page) == before[:-1]
    assert api(site, "GET", f"api/interactions/{before[-1]}")[0] == 404
    assert api(site, "GET", f"api/interactions/{before[-1]}/audio")[0] == 404


def test_run_now_lists_the_run(page, site: Site, shots: Path) -> None:
    page.goto(site.url + "learning")
    assert "No adaptation has run yet" in page.inner_text("main")
    assert re.search(r"; next nightly run \d{4}-\d\d-\d\d 03:00\.$", page.inner_text(".lead")), (
        page.inner_text(".lead")
    )
    page.click("#run-now")
    # The page polls while the job runs and reloads when it is done. One correction cannot be split into
    # a training and a held-out set, so the run is skipped, saying why.
    run = page.locator("tr.run").first
    run.wait_for(timeout=120_000)
    assert "skipped" in run.inner_text() and "not enough labelled utterances" in run.inner_text()
    assert "correction 1" in run.inner_text()
    _, runs = api(site, "GET", "api/adaptations")
    assert not runs["running"] and runs["items"][0]["status"] == "skipped"
    page.screenshot(path=shots / "learning.png", full_page=True)
    page.click("nav >> text=Dashboard")
    assert "skipped" in page.inner_text("main")  # the last run, on the dashboard too


def test_a_rejected_candidate_is_served_anyway_and_rolled_back(page, site: Site, micro_model: Path) -> None:
    """A night's rejected candidate (here the bundle's projector, kept as one) is listed with its reason;
    the household serves it anyway with a click, and "Roll back" passes over it to the promoted one before
    (none here: the model's own)."""
    projector, info = load_projector(micro_model / "projector.safetensors")
    reason = "no better for the household: intent accuracy 0.2 -> 0.3 on 10 utterances could be chance"
    rejected = {
        "household": {"intent_accuracy": 0.3, "wer": 0.4},
        "rejected": {"reason": reason, "at": time.time()},
    }
    name = Versions(site.data).add(projector, replace(info, trained=True, metrics=rejected))
    page.goto(site.url + "learning")
    row = page.locator("table.versions tr", has_text=name)
    assert "rejected" in row.inner_text() and reason in row.inner_text()
    page.once("dialog", lambda dialog: dialog.accept() if "anyway" in dialog.message else dialog.dismiss())
    row.locator("button", has_text="Serve anyway").click()
    page.wait_for_function(SERVING, arg=name)
    assert api(site, "GET", "api/versions")[1]["served"] == name
    page.click("nav >> text=Dashboard")
    assert f"{name}, rejected" in page.inner_text("main") and "served anyway" in page.inner_text("main")
    page.click("nav >> text=Learning")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button.rollback:not([data-to])")
    page.wait_for_function(SERVING, arg="base")
    assert api(site, "GET", "api/versions")[1]["served"] == "base"


def test_an_intent_withheld_as_unsure_is_confirmed_with_one_key(page, site: Site) -> None:
    """The micro model hears SAID too unsure to act on (`--min-confidence`, default): the dashboard counts
    those answers, *unsure* lists them with the intent that was not acted on, and `y` (heard right) makes
    that intent the correction the night learns from."""
    _, listing = api(site, "GET", f"api/interactions?withheld=true&since={date.today()}")
    withheld = listing["items"]
    assert withheld and all(item["intent"] is None and item["withheld"] for item in withheld)
    page.goto(site.url)
    assert page.inner_text(UNSURE_LINK) == f"{len(withheld)} today"
    page.click(UNSURE_LINK)
    assert page.url.endswith("interactions?filter=unsure")
    assert rows(page) == [str(item["id"]) for item in withheld]

    item = next(item for item in withheld if item["correction"] is None)
    row = page.locator(f'tr.row[data-id="{item["id"]}"]')
    assert "not sure: not acted on" in row.inner_text()
    assert row.locator(".intent").inner_text().startswith(item["withheld"]["name"])
    row.focus()
    page.keyboard.press("y")
    row.locator(".label", has_text="correction").wait_for()
    _, after = api(site, "GET", f"api/interactions/{item['id']}")
    fix = after["correction"]
    assert (fix["text"], fix["intent"]) == (item["transcript"], item["withheld"])
    assert after["label_source"] == "correction"


# -------------------------------------------------------------------------------------------- ingress
class IngressProxy:
    """A stand-in for Home Assistant's ingress: the page under PREFIX, forwarded without the prefix and
    with `X-Ingress-Path`. The real ingress is trusted by its address (172.30.32.2, which a test cannot
    connect from; see test_ingress_needs_no_token_but_changes_need_the_header): this one brings the token.
    It answers 404 to, and remembers, any request outside PREFIX: an absolute URL in the page."""

    def __init__(self, target: str, token: str) -> None:
        self.target, self.token = target.rstrip("/"), token
        self.seen: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.path_qs)
        if not request.path.startswith(PREFIX + "/"):
            return web.Response(status=404, text="outside the ingress path")
        drop = {"host", "content-length", "transfer-encoding", "cookie", "accept-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        headers |= {"X-Ingress-Path": PREFIX, "Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                request.method,
                self.target + request.path_qs[len(PREFIX) :],
                headers=headers,
                data=await request.read(),
                allow_redirects=False,
            ) as answer,
        ):
            body = await answer.read()
            keep = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in {"content-length", "transfer-encoding"}
            }
            return web.Response(status=answer.status, body=body, headers=keep)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        return runner

    def __enter__(self) -> IngressProxy:
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT)


def test_the_page_works_under_the_ingress_base_path(fresh, site: Site) -> None:
    with IngressProxy(site.url, site.token) as proxy:
        base = f"http://127.0.0.1:{proxy.port}{PREFIX}/"
        assert fresh.goto(base).status == 200 and "Dashboard" in fresh.inner_text("h1")
        fresh.click("nav >> text=Interactions")
        assert fresh.url == base + "interactions"
        row_id = rows(fresh)[-1]
        row = fresh.locator(f'tr.row[data-id="{row_id}"]')
        row.focus()
        fresh.keyboard.press("p")
        fresh.wait_for_function(
            "a => a.readyState >= 2 && a.duration > 0",
            arg=row.locator("audio").element_handle(),
            timeout=20_000,
        )
        row.locator("button.right").click()  # "heard right": a change through the prefix
        fresh.wait_for_function(
            "r => r.querySelector('.label').textContent === 'correction'", arg=row.element_handle()
        )
        fresh.click("nav >> text=Learning")
        assert fresh.url == base + "learning" and fresh.locator("tr.run").count() >= 1
        fresh.click("nav >> text=Dashboard")
        assert fresh.url == base
        outside = [path for path in proxy.seen if not path.startswith(PREFIX + "/")]
    assert not outside, outside  # every URL the page used was relative to the ingress path
    assert any("/audio" in path for path in proxy.seen) and any("/correction" in path for path in proxy.seen)
    _, item = api(site, "GET", f"api/interactions/{row_id}")
    assert item["label_source"] == "correction"


# ---------------------------------------------------------------------------------------- the token
def test_the_token_is_needed_outside_ingress(fresh, site: Site, shots: Path) -> None:
    for page in ("", "interactions", "learning"):
        answer = fresh.goto(site.url + page)
        assert answer.status == 401 and fresh.locator("input[name=token]").is_visible(), page
        assert fresh.locator("tr.row").count() == 0 and "Requests today" not in fresh.content()
    assert fresh.request.get(site.url + "api/interactions").status == 401
    fresh.screenshot(path=shots / "login.png")
    assert fresh.goto(site.url + "learning?token=wrong").status == 401
    assert "not right" in fresh.inner_text("main")
    fresh.fill("input[name=token]", "still wrong")
    fresh.click("button[type=submit]")
    assert "not right" in fresh.inner_text("main")
    fresh.fill("input[name=token]", site.token)
    fresh.click("button[type=submit]")
    assert fresh.url == site.url + "learning" and fresh.inner_text("h1") == "Learning"  # back where it was
    # Logged in by the cookie, a change without the page's header is refused (a cross-site form).
    status = fresh.evaluate("fetch('api/interactions', {method: 'DELETE'}).then(r => r.status)")
    assert status == 403 and api(site, "GET", "api/interactions")[1]["total"] > 0
    fresh.click("text=Log out")
    assert fresh.locator("input[name=token]").is_visible() and not fresh.context.cookies()


def test_delete_all_asks_first_and_takes_a_damaged_log_set_aside_too(page, site: Site) -> None:
    """The dashboard tells of a damaged log the server set aside (it holds recordings); *Delete all*
    asks first, then deletes the log's rows, their audio, and the damaged log."""
    aside = site.data / "log" / "damaged-20261201T030000Z"  # as `InteractionStore.set_aside` names it
    (aside / "audio" / "2026-11-30").mkdir(parents=True)
    (aside / "audio" / "2026-11-30" / "0123.wav").write_bytes(b"RIFF what was said before")
    page.goto(site.url)
    assert f"a damaged log was set aside in {aside.name}, with its recordings" in page.inner_text("main")
    page.goto(site.url + "interactions")
    total = api(site, "GET", "api/interactions")[1]["total"]
    assert page.inner_text("#delete-all") == f"Delete all {total} recordings and 1 damaged log set aside"
    before = rows(page)
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click("#delete-all")
    page.wait_for_timeout(300)
    assert asked == [
        f"Delete all {total} recordings and 1 damaged log set aside, with what was heard? "
        "This cannot be undone."
    ]
    assert rows(page) == before and api(site, "GET", "api/interactions")[1]["total"] == len(before)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-all")
    page.locator(".empty").wait_for()
    assert api(site, "GET", "api/interactions")[1]["total"] == 0
    assert not list((site.data / "log" / "audio").rglob("*.wav")) and not aside.exists()
    assert page.locator("#delete-all").count() == 0  # nothing left to delete
    page.goto(site.url)
    assert "damaged" not in page.inner_text("main")


def test_the_learning_page_fits_a_phone(chromium: playwright.Browser, site: Site) -> None:
    """On a phone (390 px wide, where Home Assistant's app opens the page) the charts scale into their
    cards: nothing scrolls sideways, the newest night's date is in view and the ticks stay legible. (They
    had a minimum width of 520 px: the newest nights sat off-screen, in a card that scrolled.)"""
    with sqlite3.connect(site.data / "log" / "interactions.sqlite3") as db:
        for day, accuracy in enumerate((0.4, 0.56, 0.62)):
            figures = {"household": {"intent_accuracy": accuracy, "wer": 0.3}, "general": {}}
            report = {"before": figures, "after": figures, "train": {"loss_curve": [[5, 2.0], [9, 1.0]]}}
            started = time.time() - 86400 * (3 - day)
            db.execute(
                "INSERT INTO adaptations (started_at, finished_at, status, reason, report) "
                "VALUES (?, ?, 'promoted', '', ?)",
                (started, started + 60, json.dumps(report)),
            )
    context = chromium.new_context(viewport={"width": 390, "height": 844})
    try:
        phone = context.new_page()
        phone.goto(site.link)
        phone.click("nav >> text=Learning")
        cards = phone.locator(".charts .card")
        assert cards.count() == 2  # accuracy over the nights, the last training
        for card in cards.all():
            assert card.evaluate("c => c.scrollWidth <= c.clientWidth"), "the card scrolls sideways"
            box = card.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        newest = phone.locator(
            "svg.chart text.tick", has_text=time.strftime("%m-%d", time.localtime(started))
        )
        tick = newest.bounding_box()
        assert tick is not None and tick["x"] + tick["width"] <= 390, tick
        assert tick["height"] >= 12, tick  # px (13 here; 10 when drawn at the desktop size, scaled down)
    finally:
        context.close()
